"""Hierarchy metrics against planted answers: a perfect SAE, one missing a parent latent, a
permuted dictionary, and the matching against brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from msae_ext.hierarchy import ORACLE, Forest, hierarchy_report, match_features


@pytest.fixture
def planted():
    """sae-lens's synthetic model with a two-level forest: its true directions and activations."""
    from sae_lens.synthetic import HierarchyConfig, SyntheticModel, SyntheticModelConfig, ZipfianFiringProbabilityConfig

    cfg = SyntheticModelConfig(num_features=48, hidden_dim=64,
                               firing_probability=ZipfianFiringProbabilityConfig(max_prob=0.4, min_prob=0.05),
                               hierarchy=HierarchyConfig(total_root_nodes=4, branching_factor=3, max_depth=2,
                                                         compensate_probabilities=True),
                               std_firing_magnitudes=0.1, seed=0)
    model = SyntheticModel(cfg)
    torch.manual_seed(0)
    _, acts = model.sample_with_features(3000)
    forest = Forest.from_roots(model.hierarchy.roots, 48)
    return model.feature_dict.feature_vectors.detach(), acts, forest


def test_the_forest_is_sae_lens_trees(planted):
    _, acts, forest = planted
    assert (forest.depth == 0).sum() == 4 and (forest.depth == 1).sum() == 12 and (forest.depth == 2).sum() == 32  # 48 features: the last 4 grandchildren are cut
    for c in np.flatnonzero(forest.parent >= 0):  # a child fires only with its parent
        p = forest.parent[c]
        assert not bool(((acts[:, c] > 0) & (acts[:, p] == 0)).any())


def test_a_perfect_sae_recovers_everything_and_absorbs_nothing(planted):
    D, acts, forest = planted
    r = hierarchy_report(acts, acts, D, D, forest, levels=[4, 8, 16, 48])
    assert r["mcc"] == pytest.approx(1.0) and r["recovered"] == 1.0 and r["matched_cosine"] == pytest.approx(1.0)
    assert r["recovered_by_depth"] == {"0": 1.0, "1": 1.0, "2": 1.0}
    assert r["absorption"] == 0.0 and r["parent_alone_miss"] == 0.0 and r["child_events"] > 0


def test_a_missing_parent_latent_is_absorption(planted):
    D, acts, forest = planted
    parent = int(forest.parent[np.flatnonzero(forest.depth == 2)[0]])  # a depth-1 feature with children
    z = acts.clone()
    z[:, parent] = 0  # its children still fire, its latent never does
    r = hierarchy_report(z, acts, D, D, forest)
    fires = (acts > 0).numpy()
    children = np.flatnonzero(forest.parent == parent)
    all_children = np.flatnonzero(forest.parent >= 0)
    want = fires[:, children].sum() / fires[:, all_children].sum()
    assert r["absorption"] == pytest.approx(want)
    assert r["absorption_by_depth"]["1"] == 0.0
    assert r["absorption_by_depth"]["2"] == pytest.approx(fires[:, children].sum()
                                                          / fires[:, np.flatnonzero(forest.depth == 2)].sum())
    alone = fires[:, parent] & ~fires[:, children].any(axis=1)
    all_alone = sum((fires[:, p] & ~fires[:, forest.parent == p].any(axis=1)).sum()
                    for p in set(forest.parent[all_children].tolist()))
    assert r["parent_alone_miss"] == pytest.approx(alone.sum() / all_alone)


def test_permuting_the_latents_changes_nothing(planted):
    D, acts, forest = planted
    noisy = D + 0.02 * torch.randn_like(D)
    z = acts * (torch.rand_like(acts) > 0.2) + torch.relu(0.3 * torch.randn_like(acts) - 0.2)  # misses and false fires
    perm = torch.randperm(48, generator=torch.Generator().manual_seed(1))
    a = hierarchy_report(z, acts, noisy, D, forest, levels=[4, 8, 16, 48])
    b = hierarchy_report(z[:, perm], acts, noisy[perm], D, forest, levels=[4, 8, 16, 48])
    assert 0 < a["absorption"] < 1 and 0 < a["recovered"]
    assert _flat(a) == pytest.approx(_flat(b))


def _flat(report: dict) -> dict:
    out = {}
    for k, v in report.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        elif isinstance(v, list):
            out.update({f"{k}.{i}": vv for i, vv in enumerate(v)})
        else:
            out[k] = v
    return out


def test_the_matching_is_the_best_one_to_one():
    g = torch.Generator().manual_seed(3)
    true, dec = torch.randn(4, 6, generator=g), torch.randn(6, 6, generator=g)
    latent, cos = match_features(dec, true)
    t = torch.nn.functional.normalize(true.double(), dim=-1)
    d = torch.nn.functional.normalize(dec.double(), dim=-1)
    full = (t @ d.T).numpy()
    best = max(sum(full[i, j] for i, j in enumerate(p)) for p in itertools.permutations(range(6), 4))
    assert cos.sum() == pytest.approx(best) and len(set(latent.tolist())) == 4
    with pytest.raises(ValueError, match="6 true features but only 4 latents"):
        match_features(dec[:4], torch.randn(6, 6))


def test_msae_bench_hierarchy_end_to_end(tmp_path, capsys):
    import json

    from msae_ext import cli as msae_cli

    out = tmp_path / "bench"
    assert msae_cli.main(["bench", "hierarchy", "--quick", "--out", str(out), "--l0", "4,8", "--seeds", "0",
                          "--families", "TopK,MSAE (RW)", "--depth", "1", "--hidden-dim", "24", "--no-progress"]) == 0
    doc = json.loads((out / "hierarchy.json").read_text())
    assert (doc["size"]["depth"], doc["size"]["hidden_dim"], doc["size"]["num_features"]) == (1, 24, 64)
    # TopK is trained per target; MSAE once, then read at each target's top-k; the true features'
    # reference once per target
    assert sorted((r["family"], r["l0"]) for r in doc["runs"]) == [("MSAE (RW)", 4), ("MSAE (RW)", 8),
                                                                   ("TopK", 4), ("TopK", 8),
                                                                   (ORACLE, 4), (ORACLE, 8)]
    ref = {r["l0"]: r for r in doc["runs"] if r["family"] == ORACLE}
    assert all(r["recovered"] == 1 and r["mcc"] == pytest.approx(1) for r in ref.values())
    assert ref[4]["absorption"] >= ref[8]["absorption"] and ref[4]["fvu"] > ref[8]["fvu"] > 0
    assert {p.name for p in (out / "runs").iterdir() if p.is_dir()} == {"topk_t4_s0", "topk_t8_s0", "msae_rw_t8_s0"}
    for r in doc["runs"]:
        assert 0 <= r["absorption"] <= 1 and 0 <= r["mcc"] <= 1 and set(r["recovered_by_depth"]) == {"0", "1"}
    assert (out / "hierarchy.png").stat().st_size > 0
    assert "| 8 | MSAE (RW) |" in capsys.readouterr().out
    assert msae_cli.main(["bench", "hierarchy", "--out", str(out), "--families", "Sparse PCA"]) == 2
    assert "unknown families ['Sparse PCA']" in capsys.readouterr().err
    assert msae_cli.main(["bench", "hierarchy", "--out", str(out), "--roots", "100"]) == 2
    assert "100 trees of branching 3 and depth 2 need 1300 features" in capsys.readouterr().err


def test_bench_help_names_every_family(capsys):
    from msae_ext import cli as msae_cli
    from msae_ext.hierarchy import FAMILY

    with pytest.raises(SystemExit):
        msae_cli.main(["bench", "hierarchy", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert [f for f in FAMILY if f not in text] == []


def test_wordnet_noun_depths_follow_hypernym_links():
    """Depth 0 at the root and one more per hypernym link along the top of the tree (entity >
    physical entity > object), growing down a chain of hypernyms (animal > dog > poodle)."""
    from msae_ext.embed.datasets import wordnet_noun_depths

    d = wordnet_noun_depths()
    assert (d["entity"], d["physical entity"], d["object"]) == (0, 1, 2)
    assert d["animal"] < d["dog"] < d["poodle"] and d["food"] < d["rice"]
    assert min(d.values()) == 0 and len(d) > 100_000


def test_entry_levels_against_ranks_by_hand():
    from msae_ext.hierarchy import entry_levels

    z = torch.tensor([[0.0, 5.0, 1.0, 3.0, 2.0]])  # ranks: latent 1 -> 0, 3 -> 1, 4 -> 2, 2 -> 3, 0 -> 4
    assert entry_levels(z, [1, 2, 4]).tolist() == [[4, 1, 4, 2, 4]]


def test_bench_hierarchy_text_on_real_wordnet_text(tmp_path, capsys):
    """The real pipeline on a small part of WordNet (adverb definitions, wordllama): every family's
    row, ranks of levels against depths, and the runs `msae serve` can open."""
    import json

    pytest.importorskip("wordllama")
    from msae_ext import cli as msae_cli
    from msae_ext.hierarchy_text import run_text_hierarchy

    doc = run_text_hierarchy(tmp_path, l0_targets=(4, 8), families=["TopK", "MSAE (UW)"], epochs=1,
                             train="wordnet:adv", eval="wordnet:adv", progress=False)
    assert sorted((r["family"], r["l0"]) for r in doc["runs"]) == [("MSAE (UW)", 4), ("MSAE (UW)", 8),
                                                                   ("TopK", 4), ("TopK", 8)]
    for r in doc["runs"]:
        assert 0 < r["fvu"] < 1 and 0 <= r["dead"] < 1 and r["named"] > 2 and -1 <= r["rho_level_depth"] <= 1
        assert 1 <= r["level_shallow"] <= 8 and len(r["examples"]["earliest"]) == 4
    # a lower L0 reconstructs worse than a higher one from the same MSAE
    msae = {r["l0"]: r["fvu"] for r in doc["runs"] if r["family"] == "MSAE (UW)"}
    assert msae[4] > msae[8]
    assert json.loads((tmp_path / "hierarchy_text.json").read_text())["runs"] == json.loads(json.dumps(doc["runs"]))
    assert "| 8 | MSAE (UW) |" in (tmp_path / "hierarchy_text.md").read_text()
    assert msae_cli.main(["bench", "hierarchy-text", "--out", str(tmp_path), "--families", "PCA"]) == 2
    assert "unknown families ['PCA']" in capsys.readouterr().err
