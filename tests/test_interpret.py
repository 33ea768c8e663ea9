"""Section 5 with the truth planted: concept naming and its validations, top-activating examples,
similarity search (CLIP, SAE and steered) and bias analysis, each checked against what was built
into the data or against the naive computation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import msae_ext.cli as msae_cli
from msae_ext.architectures import PaperSAE
from msae_ext.architectures.msae import MSAEConfig
from msae_ext.interpret import (
    ConceptSpace,
    ConceptTable,
    Edit,
    bias_analysis,
    load_vocabulary,
    name_concepts,
    open_rows,
    search_clip,
    search_sae,
    similarity_search,
    top_activating,
)
from msae_ext.interpret.bias import concept_association, f1_score
from msae_ext.interpret.concepts import concept_similarities, prepare_vocabulary
from msae_ext.interpret.vocab import VocabularyError
from msae_ext.normalization import ModalityStats, attach_stats


def make_sae(decoder: torch.Tensor, b_dec: torch.Tensor | None = None, stats: dict | None = None) -> PaperSAE:
    """An inference MSAE whose decoder rows are `decoder` (unit-normalised) and encoder its transpose."""
    m, d = decoder.shape
    sae = PaperSAE(MSAEConfig(d_in=d, d_sae=m, k_list=[m]))
    with torch.no_grad():
        sae.W_dec.copy_(torch.nn.functional.normalize(decoder, dim=-1))
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_enc.zero_()
        sae.b_dec.copy_(b_dec if b_dec is not None else torch.zeros(d))
    for modality, s in (stats or {}).items():
        attach_stats(sae, modality, s)
    return sae


def identity(d: int) -> ModalityStats:
    return ModalityStats(mean=torch.zeros(d), scale=1.0, n_rows=1, source="identity")


def save_sae(sae: PaperSAE, path: Path) -> Path:
    sae.save_model(path)
    return path


# --------------------------------------------------------------------------------------------
# Concept naming
# --------------------------------------------------------------------------------------------

D, N_WORDS = 128, 300


@pytest.fixture
def planted_concepts():
    """Random raw 'CLIP' vocabulary embeddings; text statistics with a real mean and scale; an SAE
    whose neuron 0 is word 7's preprocessed direction, neuron 1 the mix of words 20 and 21, and
    the rest random."""
    g = torch.Generator().manual_seed(0)
    words = [f"w{i}" for i in range(N_WORDS)]
    vocab = torch.randn(N_WORDS, D, generator=g) + 2.0
    stats = ModalityStats(mean=vocab.mean(0), scale=0.7, n_rows=N_WORDS, source="vocab")
    pre = torch.nn.functional.normalize(stats.apply(vocab), dim=-1)
    decoder = torch.randn(16, D, generator=g)
    decoder[0] = pre[7]
    decoder[1] = pre[20] + pre[21]
    sae = make_sae(decoder, stats={"text": stats, "image": identity(D)})
    return sae, vocab.numpy(), words, stats


def test_planted_word_is_named_and_passes_validations(planted_concepts):
    sae, vocab, words, _ = planted_concepts
    out = name_concepts(sae, vocab, words)
    n0, n1 = out["neurons"][0], out["neurons"][1]
    assert n0["label"] == "w7" and n0["concepts"][0][0] == "w7"
    assert n0["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert set(n0["valid"]) == {"above_threshold", "best_vector", "above_and_best", "ratio", "all"}
    # a near-tie between two words: similar enough, but fails the best/second-best ratio
    assert {n1["concepts"][0][0], n1["concepts"][1][0]} == {"w20", "w21"}
    assert "above_threshold" in n1["valid"] and "ratio" not in n1["valid"] and "all" not in n1["valid"]
    assert 0.9 < n1["ratio"] < 1.3
    # random directions are not above the threshold
    assert all("above_threshold" not in n["valid"] for n in out["neurons"][2:])
    assert out["counts"]["all"] == 1
    assert set(out["counts"]) == {"above_threshold", "best_vector", "above_and_best", "ratio", "all"}


def test_counts_match_the_naive_full_matrix(planted_concepts):
    sae, vocab, words, stats = planted_concepts
    threshold, ratio = 0.2, 1.5
    out = name_concepts(sae, vocab, words, threshold=threshold, ratio=ratio)
    v = prepare_vocabulary(vocab, stats, None)
    S = torch.nn.functional.normalize(sae.W_dec.detach(), dim=-1) @ v.T  # (d_sae, n_words), naive
    best_neuron = S.argmax(0)
    best_vectors = set(best_neuron.tolist())
    labels = {}
    for n in best_vectors:
        won = (best_neuron == n).nonzero().flatten()
        labels[n] = int(won[S[n, won].argmax()])
    expect = dict.fromkeys(out["counts"], 0)
    for n in range(S.shape[0]):
        label = labels.get(n, int(S[n].argmax()))
        others = torch.cat([S[n, :label], S[n, label + 1:]])
        r = S[n, label] / others.max() if others.max() > 0 else float("inf")
        ok = {"above_threshold": S[n].max() > threshold, "best_vector": n in best_vectors,
              "above_and_best": n in best_vectors and S[n, label] > threshold, "ratio": r > ratio}
        ok["all"] = ok["above_and_best"] and ok["ratio"]
        for k, flag in ok.items():
            expect[k] += int(bool(flag))
        assert out["neurons"][n]["label"] == words[label]
    assert out["counts"] == expect
    # blockwise similarities equal the full matrix
    sims = concept_similarities(sae.W_dec.detach(), v, top=5, block=3)
    torch.testing.assert_close(sims.top_values, S.topk(5, dim=1).values)
    assert torch.equal(sims.best_neuron, best_neuron)


def test_b_pre_is_kept_by_default_and_removable(planted_concepts):
    sae, vocab, words, stats = planted_concepts
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(D, generator=torch.Generator().manual_seed(1)) * 3)
    kept = name_concepts(sae, vocab, words)
    removed = name_concepts(sae, vocab, words, remove_b_pre=True)
    assert kept["settings"]["keep_b_pre"] and not removed["settings"]["keep_b_pre"]
    assert kept["neurons"][0]["similarity"] == pytest.approx(1.0, abs=1e-5)  # planted without b_pre
    v = torch.nn.functional.normalize(stats.apply(torch.tensor(vocab)) - sae.b_dec.detach(), dim=-1)
    S = torch.nn.functional.normalize(sae.W_dec.detach(), dim=-1) @ v.T
    for n in (0, 1, 5):
        want = S[n].topk(5)
        assert [c[0] for c in removed["neurons"][n]["concepts"]] == [words[i] for i in want.indices]
        np.testing.assert_allclose([c[1] for c in removed["neurons"][n]["concepts"]], want.values, atol=1e-5)
    assert removed["neurons"][0]["similarity"] < 0.9


def test_concept_errors_are_clear(planted_concepts):
    sae, vocab, words, _ = planted_concepts
    with pytest.raises(ValueError, match="dimension 64"):
        name_concepts(sae, vocab[:, :64], words)
    with pytest.raises(ValueError, match="words but"):
        name_concepts(sae, vocab, words[:-1])
    no_text = make_sae(sae.W_dec.detach(), stats={"image": identity(D)})
    with pytest.raises(ValueError, match="no 'text' normalisation statistics"):
        name_concepts(no_text, vocab, words)
    table = ConceptTable(name_concepts(sae, vocab, words))
    assert table.resolve("w7") == 0 and table.resolve("#3") == 3
    with pytest.raises(ValueError, match="neither a neuron index nor a word"):
        table.resolve("not-a-word")


def test_default_vocabulary_ships_and_rebuilds():
    words = load_vocabulary()
    assert len(words) == 10_000 and len(set(words)) == 10_000
    assert words[:3] == ["the", "to", "and"] and all(w.isalpha() and w.islower() for w in words)
    pytest.importorskip("wordfreq")
    from msae_ext.interpret.vocab import build_wordfreq_vocabulary

    from importlib.metadata import version

    if version("wordfreq") != "3.1.1":
        pytest.skip(f"the shipped list was built with wordfreq 3.1.1, not {version('wordfreq')}")
    assert build_wordfreq_vocabulary(10_000) == words  # the shipped file is what the recipe builds


def test_vocabulary_file_errors(tmp_path):
    p = tmp_path / "v.txt"
    p.write_text("# comment\ncat\ndog\ncat\n")
    with pytest.raises(VocabularyError, match="repeated words"):
        load_vocabulary(p)
    with pytest.raises(VocabularyError, match="no such vocabulary"):
        load_vocabulary(tmp_path / "missing.txt")


def test_concepts_cli_with_clip_tower(tmp_path, capsys):
    """The vocabulary embedded by a real open_clip text tower (tiny config, random weights), via the CLI
    and via precomputed embeddings: the same result."""
    from msae_ext.embed import load_clip
    from msae_ext.interpret import embed_vocabulary

    cfg = tmp_path / "tiny-clip-concepts.json"
    cfg.write_text(json.dumps({"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64,
                                                              "patch_size": 8, "head_width": 32},
                               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2,
                                            "layers": 1}}))
    words = ["cat", "dog", "sea", "red", "tree", "car", "city", "bird"]
    vocab_file = tmp_path / "words.txt"
    vocab_file.write_text("\n".join(words) + "\n")
    torch.manual_seed(0)
    clip = load_clip(str(cfg), None)
    ckpt = tmp_path / "tiny.pt"
    torch.save(clip.model.state_dict(), ckpt)
    emb = embed_vocabulary(words, clip, progress=False)
    direct = clip.model.encode_text(clip.tokenizer(words)).detach().numpy()
    np.testing.assert_allclose(emb, direct, rtol=1e-5, atol=1e-6)
    stats = ModalityStats(mean=torch.tensor(emb.mean(0)), scale=1.3, n_rows=8, source="t")
    decoder = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    decoder[2] = stats.apply(torch.tensor(emb[4]))  # "tree"
    sae_dir = save_sae(make_sae(decoder, stats={"text": stats}), tmp_path / "sae")
    out = tmp_path / "concepts.json"
    assert msae_cli.main(["concepts", "--sae", str(sae_dir), "--clip", str(cfg), "--pretrained", str(ckpt),
                          "--vocab", str(vocab_file), "--threshold", "0.9", "--ratio", "1.0",
                          "--save-vocab-embeddings", str(tmp_path / "v.npy"), "--figures", str(tmp_path / "f"),
                          "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["neurons"][2]["label"] == "tree" and "above_threshold" in result["neurons"][2]["valid"]
    assert (tmp_path / "f" / "concept_similarity.png").stat().st_size > 0
    out2 = tmp_path / "concepts2.json"
    assert msae_cli.main(["concepts", "--sae", str(sae_dir), "--vocab-embeddings", str(tmp_path / "v.npy"),
                          "--vocab", str(vocab_file), "--threshold", "0.9", "--ratio", "1.0", "--out", str(out2)]) == 0
    assert json.loads(out2.read_text())["counts"] == result["counts"]
    capsys.readouterr()
    assert msae_cli.main(["concepts", "--sae", str(sae_dir), "--vocab-embeddings", str(tmp_path / "v.npy"),
                          "--out", str(out2)]) == 2
    assert "needs --vocab" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# A planted concept world: orthonormal concept directions, rows = sparse sums of concepts
# --------------------------------------------------------------------------------------------

DW, M = 48, 12


@pytest.fixture
def world(tmp_path):
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(DW, DW, generator=g))
    dictionary = q[:M].contiguous()  # (M, DW) orthonormal concept directions
    sae = make_sae(dictionary, stats={"image": identity(DW)})
    return sae, dictionary, g


def test_top_activating_matches_naive_sort(world, tmp_path):
    sae, dictionary, g = world
    n = 700
    a = torch.rand(n, M, generator=g) * (torch.rand(n, M, generator=g) < 0.3)
    x = a @ dictionary
    np.save(tmp_path / "x.npy", x.numpy())
    (tmp_path / "caps.txt").write_text("\n".join(f"item {i}" for i in range(n)) + "\n")
    rows = open_rows(tmp_path / "x.npy", captions=tmp_path / "caps.txt")
    space = ConceptSpace(sae, "image")
    out = top_activating(space, rows, [0, 5, 11], n_top=7, n_intervals=4, per_interval=3, batch_size=64)
    z = torch.relu((x - sae.b_dec.detach()) @ sae.W_enc.detach() + sae.b_enc.detach()).numpy()  # naive
    np.testing.assert_allclose(z, a.numpy(), atol=1e-5)  # the planted magnitudes
    for e in out["neurons"]:
        c = e["index"]
        want = np.argsort(-z[:, c], kind="stable")[:7]
        assert [t["row"] for t in e["top"]] == want.tolist()
        np.testing.assert_allclose([t["value"] for t in e["top"]], z[want, c], rtol=1e-5, atol=1e-6)
        assert e["top"][0]["caption"] == f"item {want[0]}"
        assert e["frequency"] == pytest.approx((z[:, c] > 0).mean())
        assert sum(b["count"] for b in e["intervals"]) == int((z[:, c] > 0).sum())
        for b in e["intervals"]:
            lo, hi = b["range"]
            assert len(b["examples"]) == min(3, b["count"])
            for ex in b["examples"]:
                assert lo - 1e-5 <= ex["value"] <= hi + 1e-5 and ex["value"] > 0
                assert ex["value"] == pytest.approx(z[ex["row"], c], abs=1e-5)


def _clusters(dictionary, g, n_groups=40, magnitude=3.0):
    """Per group: a 'plain' row and a row carrying concept 0 at `magnitude`, around a random base
    built from concepts 1.. (so the SAE sees them), plus a held-out query near each plain row."""
    base = torch.rand(n_groups, M - 1, generator=g) * 2.0
    base_x = torch.cat([torch.zeros(n_groups, 1), base], 1) @ dictionary
    noise = lambda: 0.05 * torch.randn(n_groups, DW, generator=g)  # noqa: E731
    plain = base_x + noise()
    carrying = base_x + noise() + magnitude * dictionary[0]
    queries = base_x + noise()
    return torch.cat([plain, carrying]), queries


def test_search_matches_brute_force(world, tmp_path):
    sae, dictionary, g = world
    index, queries = _clusters(dictionary, g)
    np.save(tmp_path / "index.npy", index.numpy())
    rows = open_rows(tmp_path / "index.npy")
    nb = search_clip(rows, queries[:5], k=6, batch_size=7)
    cos = torch.nn.functional.normalize(queries[:5], dim=-1) @ torch.nn.functional.normalize(index, dim=-1).T
    want_d, want_r = (1 - cos).topk(6, dim=1, largest=False)
    assert torch.equal(nb.rows, want_r)
    torch.testing.assert_close(nb.distances, want_d.clamp_min(0), atol=1e-5, rtol=0)
    space = ConceptSpace(sae, "image")
    zq = space.encode(queries[:2])
    nb = search_sae(space, rows, zq, k=4, batch_size=9)
    want = torch.cdist(zq, space.encode(index), p=1).topk(4, dim=1, largest=False)
    assert torch.equal(nb.rows, want.indices)
    torch.testing.assert_close(nb.distances, want.values, atol=1e-4, rtol=0)


def test_steering_a_concept_up_moves_the_neighbour_to_items_carrying_it(world, tmp_path):
    sae, dictionary, g = world
    n_groups = 40
    index, queries = _clusters(dictionary, g, n_groups)
    np.save(tmp_path / "index.npy", index.numpy())
    rows = open_rows(tmp_path / "index.npy")
    space = ConceptSpace(sae, "image")
    table = None
    carrying = set(range(n_groups, 2 * n_groups))
    moved = 0
    for gi in range(10):
        res = similarity_search(rows, queries[gi], space=space, table=table, k=3, sae_space=True,
                                steer=[[Edit(0, 3.0, "set")], [Edit(5, 3.0, "add")]])
        assert res["clip"][0]["row"] == gi  # its own group's plain row
        assert res["sae"][0]["row"] == gi
        steered, control = res["steered"]
        moved += steered["hits"][0]["row"] == gi + n_groups  # the same group, carrying concept 0
        assert steered["hits"][0]["row"] in carrying
        assert steered["hits"][0]["steered_magnitudes"]["0"] > 2.5
        assert control["hits"][0]["row"] not in carrying  # steering another concept does not
        assert steered["distance_from_query"] > 0.01
    assert moved == 10
    # shared concepts: the query and its plain twin share their strongest concepts
    res = similarity_search(rows, queries[0], space=space, k=1, n_concepts=4)
    assert len(res["clip"][0]["concepts"]["shared"]) >= 3


def test_error_term_keeps_an_unedited_embedding(world):
    sae, dictionary, g = world
    space = ConceptSpace(sae, "image")
    x = torch.randn(5, DW, generator=g)  # not in the dictionary's span: reconstruction is lossy
    z = space.encode(x)
    kept = space.edit(x, [Edit(3, 0.0, "add")])
    torch.testing.assert_close(kept, x, atol=1e-5, rtol=0)
    plain = space.edit(x, [Edit(3, 0.0, "add")], error_term=False)
    torch.testing.assert_close(plain, space.decode(z))
    moved = space.edit(x, [Edit(3, 2.0, "add")])
    torch.testing.assert_close(moved - x, 2.0 * dictionary[3].expand(5, -1), atol=1e-5, rtol=0)


def test_search_cli(world, tmp_path, capsys):
    sae, dictionary, g = world
    index, queries = _clusters(dictionary, g)
    np.save(tmp_path / "index.npy", index.numpy())
    np.save(tmp_path / "q.npy", queries.numpy())
    sae_dir = save_sae(sae, tmp_path / "sae")
    out = tmp_path / "res.json"
    assert msae_cli.main(["search", "--index", str(tmp_path / "index.npy"), "--sae", str(sae_dir),
                          "--query-embedding", f"{tmp_path / 'q.npy'}:2", "--k", "2", "--sae-space",
                          "--steer", "#0=1,3", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert len(res["steered"]) == 2 and res["steered"][1]["edits"][0]["value"] == 3.0
    assert res["steered"][1]["hits"][0]["row"] == 2 + 40
    assert msae_cli.main(["search", "--index", str(tmp_path / "index.npy"), "--query-row", "3",
                          "--out", str(out)]) == 0
    assert json.loads(out.read_text())["clip"][0]["row"] == 3
    assert "index: not verified (it records no checksums)" in capsys.readouterr().out
    assert msae_cli.main(["search", "--index", str(tmp_path / "index.npy"), "--query-row", "3",
                          "--steer", "germany=20"]) == 2
    assert "need --sae" in capsys.readouterr().err
    # figures need rows whose images are known: a plain matrix is refused, not silently ignored
    assert msae_cli.main(["search", "--index", str(tmp_path / "index.npy"), "--query-row", "3",
                          "--figures", str(tmp_path / "fig")]) == 2
    assert "plain matrix whose rows' images are unknown" in capsys.readouterr().err
    assert not (tmp_path / "fig").exists()


# --------------------------------------------------------------------------------------------
# Bias analysis
# --------------------------------------------------------------------------------------------


def _biased(dictionary, g, n=3000, concept=0):
    a = torch.rand(n, M, generator=g) * 4.0 * (torch.rand(n, M, generator=g) < 0.5)
    x = a @ dictionary + 0.02 * torch.randn(n, DW, generator=g)
    y = (a[:, concept] + 0.3 * torch.randn(n, generator=g) > 1.0).long().numpy()
    return x, a, y


def test_rank_biserial_and_f1_by_hand():
    s = concept_association(np.array([1.0, 2.0, 3.0, 4.0]), np.array([0, 0, 1, 1]))
    assert s["u"] == 4 and s["rank_biserial"] == 1.0 and s["mean_1"] == 3.5 and s["mean_0"] == 1.5
    s = concept_association(np.array([3.0, 1.0, 4.0, 2.0]), np.array([0, 0, 1, 1]))  # U = 3 of 4 pairs
    assert s["u"] == 3 and s["rank_biserial"] == pytest.approx(0.5)
    assert f1_score(np.array([1, 1, 0, 0]), np.array([1, 0, 1, 0])) == pytest.approx(0.5)


def test_planted_bias_is_detected_and_absent_bias_is_not(world, tmp_path):
    sae, dictionary, g = world
    x, a, y = _biased(dictionary, g, concept=0)
    np.save(tmp_path / "x.npy", x.numpy())
    rows = open_rows(tmp_path / "x.npy")
    space = ConceptSpace(sae, "image")
    rep = bias_analysis(space, rows, y, concepts=[0, 1, 2], screen=3, examples=[0, 1], n_points=11)
    assert rep["probe"]["f1"] > 0.85
    by = {r["neuron"]: r for r in rep["concepts"]}
    assert by[0]["associated"] and by[0]["direction"] == "1" and by[0]["rank_biserial"] > 0.5
    assert not by[1]["associated"] and not by[2]["associated"]
    assert rep["screen"][0]["neuron"] == 0  # the screen finds it unprompted
    # counterfactual: raising concept 0 raises the probability of class 1, monotonically
    curves = [c for c in rep["counterfactuals"] if c["neuron"] == 0]
    assert len(curves) == 2
    for c in curves:
        p = np.array(c["probabilities"])
        assert np.all(np.diff(p) >= -1e-6) and p[-1] > 0.9 and p[0] < 0.5
    flat = [c for c in rep["counterfactuals"] if c["neuron"] == 1]
    assert all(np.ptp(c["probabilities"]) < 0.2 for c in flat)
    # the same concept with the label planted on another concept: not associated
    x2, a2, y2 = _biased(dictionary, g, concept=4)
    np.save(tmp_path / "x2.npy", x2.numpy())
    rep2 = bias_analysis(space, open_rows(tmp_path / "x2.npy"), y2, concepts=[0], screen=0, examples=[0])
    assert not rep2["concepts"][0]["associated"]


def test_bias_cli_with_figures(world, tmp_path, capsys):
    sae, dictionary, g = world
    x, a, y = _biased(dictionary, g, n=1500, concept=2)
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "y.npy", 1 - y)
    sae_dir = save_sae(sae, tmp_path / "sae")
    out = tmp_path / "bias.json"
    assert msae_cli.main(["bias", "--sae", str(sae_dir), "--data", str(tmp_path / "x.npy"),
                          "--labels", str(tmp_path / "y.npy"), "--invert-label", "--concept", "#2,#7",
                          "--screen", "0", "--examples", "5", "--figures", str(tmp_path / "figs"),
                          "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert [r["associated"] for r in rep["concepts"]] == [True, False]
    assert rep["concepts"][0]["direction"] == "1"  # inverted back to the planted label
    for f in rep["figures"].values():
        assert Path(f).stat().st_size > 0
    assert "associated with 1" in capsys.readouterr().out
    assert msae_cli.main(["bias", "--sae", str(sae_dir), "--data", str(tmp_path / "x.npy"), "--out", str(out)]) == 2
    assert "carry no labels" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# The worked example's path: a CelebA layout embedded by a real open_clip image tower
# --------------------------------------------------------------------------------------------


def test_celeba_cache_examples_search_and_bias_cli(tmp_path, capsys):
    """CelebA-shaped folder -> `msae embed` cache (tiny open_clip, random weights) -> image grids of
    top-activating examples, a search figure, and `msae bias --attribute` on the cache's labels."""
    from PIL import Image

    from msae_ext.embed import embed_dataset, load_clip, open_items
    from msae_ext.normalization import compute_stats
    from msae_ext.store import open_embeddings

    root = tmp_path / "celeba"
    (root / "img_align_celeba").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(60):
        male = i % 2
        colour = np.array([200, 40, 40]) if male else np.array([40, 40, 200])
        img = np.clip(colour + rng.integers(-30, 30, (36, 30, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / "img_align_celeba" / f"{i + 1:06d}.jpg")
        lines.append(f"{i + 1:06d}.jpg {1 if male else -1} {1 if i % 3 == 0 else -1}")
    (root / "list_attr_celeba.txt").write_text("60\nMale Eyeglasses\n" + "\n".join(lines) + "\n")
    cfg = tmp_path / "tiny-clip-celeba.json"
    cfg.write_text(json.dumps({"embed_dim": 24, "vision_cfg": {"image_size": 32, "layers": 1, "width": 48,
                                                              "patch_size": 8, "head_width": 24},
                               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 48, "heads": 2,
                                            "layers": 1}}))
    torch.manual_seed(0)
    clip = load_clip(str(cfg), None)
    cache = tmp_path / "emb"
    embed_dataset(open_items(f"celeba:{root}"), clip, cache, modality="image", batch_size=16, num_workers=0,
                  progress=False)
    stats = compute_stats(open_embeddings(cache))
    sae = make_sae(torch.randn(10, 24, generator=torch.Generator().manual_seed(0)), stats={"image": stats})
    sae_dir = save_sae(sae, tmp_path / "sae")

    ex = tmp_path / "examples.json"
    assert msae_cli.main(["examples", "--sae", str(sae_dir), "--data", str(cache), "--neurons", "0,3",
                          "--figures", str(tmp_path / "grids"), "--out", str(ex)]) == 0
    result = json.loads(ex.read_text())
    top = result["neurons"][0]["top"][0]
    assert top["image"].endswith(f"{top['id']}.jpg") and Path(top["image"]).exists()
    assert sorted(p.name for p in (tmp_path / "grids").iterdir()) == ["neuron_000000.png", "neuron_000003.png"]

    res = tmp_path / "search.json"
    assert msae_cli.main(["search", "--index", str(cache), "--sae", str(sae_dir), "--query-id", "000007",
                          "--k", "3", "--figures", str(tmp_path / "search"), "--out", str(res)]) == 0
    found = json.loads(res.read_text())
    assert found["clip"][0]["id"] == "000007" and found["clip"][0]["distance"] < 1e-5
    assert (tmp_path / "search" / "search.png").stat().st_size > 0
    assert found["index_verified_shards"] == len(json.loads((cache / "manifest.json").read_text())["shards"]) >= 1

    # a shard whose bytes changed after embedding (same shape, so it still opens) is refused by name
    shard = cache / json.loads((cache / "manifest.json").read_text())["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    search = ["search", "--index", str(cache), "--query-row", "0", "--k", "1"]
    assert msae_cli.main(search) == 2
    assert f"{shard}: its sha256 differs" in capsys.readouterr().err
    assert msae_cli.main(search + ["--no-verify"]) == 0
    assert "index: not verified (--no-verify)" in capsys.readouterr().out
    shard.write_bytes(bytes(data[:-1]) + bytes([data[-1] ^ 0xFF]))

    out = tmp_path / "bias.json"
    assert msae_cli.main(["bias", "--sae", str(sae_dir), "--data", str(cache), "--attribute", "Male",
                          "--invert-label", "--screen", "2", "--figures", str(tmp_path / "bias"),
                          "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["probe"]["f1"] == 1.0  # red vs blue images: separable even for random CLIP weights
    assert len(rep["concepts"]) == 2 and rep["counterfactuals"]
    capsys.readouterr()
    assert msae_cli.main(["bias", "--sae", str(sae_dir), "--data", str(cache), "--out", str(out)]) == 2
    assert "name one" in capsys.readouterr().err
