"""Publishing offline: the authors' checkpoints against a re-implementation of their forward, the
release registry through a Hugging Face cache built here (HF_HUB_OFFLINE=1), bit-for-bit round
trips, a standard export loaded by a process that never imports msae_ext, and the model card."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import msae_ext.cli as msae_cli
import msae_ext  # noqa: F401  (registers the architectures and releases)
from msae_ext.architectures import PaperSAE
from msae_ext.architectures.msae import MSAEConfig
from msae_ext.loading import load_sae
from msae_ext.normalization import ModalityStats, attach_stats, get_stats
from msae_ext.publish import (
    AuthorsCheckpointError,
    load_authors_sae,
    load_registry,
    parse_authors_name,
    read_concept_matrix,
)

ROOT = Path(__file__).resolve().parents[1]
AUTHORS_NAME = "64_16_TopKReLU_4_RW_False_False_0.0_cc3m_ViT-L~14_train_image_1000_16.pth"


def authors_checkpoint(path: Path, d_in=16, d_sae=64, linear_keys=False, seed=0, layout="authors",
                       centered=True) -> dict[str, torch.Tensor]:
    """A checkpoint laid out as the authors' train.py saves it (`layout="authors"`: the state dict
    under "model", the statistics beside it, target_norm a numpy float64 as their np.sqrt gives),
    or as a flat state dict with the statistics inside ("flat"), or with none ("none")."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(500, d_in, generator=g) * 2 + 1
    mean = x.mean(0) if centered else torch.zeros(d_in)
    sq = (x - mean).norm(dim=1).pow(2).mean()
    target_norm = np.sqrt(d_in)
    state = {
        "pre_bias": torch.randn(d_in, generator=g) * 0.1,
        "encoder": torch.randn(d_in, d_sae, generator=g) / d_in ** 0.5,
        "latent_bias": torch.randn(d_sae, generator=g) * 0.1,
        "decoder": torch.nn.functional.normalize(torch.randn(d_sae, d_in, generator=g), dim=1),
    }
    stats = {"mean_center": mean, "scaling_factor": float(target_norm / sq), "target_norm": target_norm}
    model = dict(state)
    if linear_keys:  # nn.Linear layout: weight (out, in)
        model["encoder.weight"] = model.pop("encoder").T.contiguous()
        model["decoder.weight"] = model.pop("decoder").T.contiguous()
    if layout == "authors":
        model["latents_activation_frequency"] = torch.zeros(d_sae, dtype=torch.int64)  # their buffer
        torch.save({"model": model, **stats}, path)
    elif layout == "flat":
        torch.save({**model, "mean_center": mean, "scaling_factor": torch.tensor(stats["scaling_factor"]),
                    "target_norm": torch.tensor(target_norm)}, path)
    else:
        torch.save({"model": model}, path)
    return {**state, **stats}


def authors_forward(state: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Their inference, written out from the checkpoint's tensors: ReLU only, their statistics."""
    xn = (x - state["mean_center"]) * state["scaling_factor"]
    z = torch.relu((xn - state["pre_bias"]) @ state["encoder"] + state["latent_bias"])
    recon = (z @ state["decoder"] + state["pre_bias"]) / state["scaling_factor"] + state["mean_center"]
    return z, recon


@pytest.mark.parametrize("linear_keys,layout", [(False, "authors"), (True, "authors"), (False, "flat")])
def test_authors_checkpoint_matches_their_forward(tmp_path, linear_keys, layout):
    path = tmp_path / AUTHORS_NAME
    state = authors_checkpoint(path, linear_keys=linear_keys, layout=layout)
    sae = load_authors_sae(path)
    assert sae.cfg.architecture() == "msae" and sae.cfg.d_in == 16 and sae.cfg.d_sae == 64
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(5)) * 2 + 1
    z_ref, recon_ref = authors_forward(state, x)
    stats = get_stats(sae, "image")
    assert stats.scale == pytest.approx(float(state["scaling_factor"]))
    z = sae.encode(stats.apply(x))
    torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.invert(sae.decode(z)), recon_ref, rtol=1e-5, atol=1e-5)
    info = sae.cfg.metadata["msae_authors"]
    assert info["activation"] == "TopKReLU" and info["k"] == 4 and info["clip_model"] == "ViT-L/14"
    assert info["target_norm"] == pytest.approx(4.0)


def test_authors_file_without_statistics_is_refused(tmp_path, capsys):
    """Statistics nowhere in the file: refused, unless the user says the inputs come preprocessed."""
    path = tmp_path / AUTHORS_NAME
    state = authors_checkpoint(path, layout="none")
    with pytest.raises(AuthorsCheckpointError, match="no mean_center and scaling_factor"):
        load_authors_sae(path)
    assert msae_cli.main(["convert", "--from", "authors", str(path), "--out", str(tmp_path / "c")]) == 2
    assert "--preprocessed-inputs" in capsys.readouterr().err and not (tmp_path / "c").exists()
    assert msae_cli.main(["convert", "--from", "authors", str(path), "--out", str(tmp_path / "c"),
                          "--preprocessed-inputs"]) == 0
    sae = load_sae(tmp_path / "c")
    assert "msae_normalization" not in sae.cfg.metadata
    x = torch.randn(4, 16)
    z = torch.relu((x - state["pre_bias"]) @ state["encoder"] + state["latent_bias"])
    torch.testing.assert_close(sae.encode(x), z, rtol=1e-5, atol=1e-6)


def test_nothing_downloaded_is_unpickled_into_objects(tmp_path):
    """A .pth whose pickle would run code, and an .npy of Python objects, are refused by name."""
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    evil = tmp_path / AUTHORS_NAME
    torch.save({"model": {"pre_bias": torch.zeros(16)}, "mean_center": Payload()}, evil, pickle_module=pickle)
    with pytest.raises(AuthorsCheckpointError, match="refused"):
        load_authors_sae(evil)
    assert not (tmp_path / "pwned").exists()
    vocab = tmp_path / "words.txt"
    vocab.write_text("a\nb\n")
    objects = tmp_path / "matrix.npy"
    np.save(objects, np.array([[{"x": 1}], [{"y": 2}]], dtype=object), allow_pickle=True)
    with pytest.raises(AuthorsCheckpointError, match="an array of Python objects, which would run code"):
        read_concept_matrix(objects, vocab)
    np.save(tmp_path / "short.npy", np.zeros((3, 8), np.float32))
    with pytest.raises(AuthorsCheckpointError, match=r"shape \(3, 8\), expected \(2, d_sae\)"):
        read_concept_matrix(tmp_path / "short.npy", vocab)


def test_authors_checkpoint_errors(tmp_path):
    good = tmp_path / AUTHORS_NAME
    authors_checkpoint(good)
    wrong = tmp_path / AUTHORS_NAME.replace("64_16_", "128_16_")
    shutil.copy(good, wrong)
    with pytest.raises(AuthorsCheckpointError, match="d_sae=128"):
        load_authors_sae(wrong)
    truncated = tmp_path / "trunc" / AUTHORS_NAME
    truncated.parent.mkdir()
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(AuthorsCheckpointError, match="not a readable PyTorch checkpoint"):
        load_authors_sae(truncated)
    other = tmp_path / "other.pth"
    torch.save({"W_enc": torch.zeros(2, 2)}, other)
    with pytest.raises(AuthorsCheckpointError, match="missing"):
        load_authors_sae(other)
    assert parse_authors_name("6144_768_ReLU_0_x.pth")["activation"] == "ReLU"


def test_convert_cli(tmp_path, capsys):
    path = tmp_path / AUTHORS_NAME
    state = authors_checkpoint(path)
    assert msae_cli.main(["convert", "--from", "authors", str(path), "--out", str(tmp_path / "conv")]) == 0
    sae = load_sae(tmp_path / "conv")
    x = torch.randn(8, 16)
    stats = get_stats(sae, "image")
    torch.testing.assert_close(stats.invert(sae.decode(sae.encode(stats.apply(x)))), authors_forward(state, x)[1],
                               rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Hub: a cache layout built here, loaded with HF_HUB_OFFLINE=1 in fresh processes
# --------------------------------------------------------------------------------------------


def hf_cache_repo(cache: Path, repo: str, tree: Path) -> Path:
    """huggingface_hub's cache layout for `repo` at one commit holding the files of `tree`."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = cache / f"models--{repo.replace('/', '--')}"
    snap = base / "snapshots" / commit
    shutil.copytree(tree, snap, dirs_exist_ok=True)
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(commit)
    return snap


def run_offline(code: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(cache.parent / "hf_home"),
           "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def trained(tmp_path) -> Path:
    """An SAE folder as `msae train` leaves it: weights, config with both modalities' statistics,
    sparsity, eval report and the resolved config."""
    d_in, d_sae = 16, 128
    torch.manual_seed(0)
    sae = PaperSAE(MSAEConfig(d_in=d_in, d_sae=d_sae, k_list=[16, 32, 64, 128]))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    attach_stats(sae, "image", ModalityStats(mean=torch.randn(d_in), scale=1.7, n_rows=100, source="emb/cc3m_image"))
    attach_stats(sae, "text", ModalityStats(mean=torch.randn(d_in), scale=0.6, n_rows=50, source="emb/cc3m_text"))
    sae.cfg.metadata["modality"] = "image"
    sae.cfg.metadata["clip_model"] = "ViT-L-14@openai"
    out = tmp_path / "run"
    sae.save_model(out)
    save_file({"sparsity": torch.linspace(-5, -1, d_sae)}, out / "sparsity.safetensors")
    (out / "eval.json").write_text(json.dumps({"l0_sparsity": 0.8125, "l0_active": 24.0, "fvu": 0.0123,
                                               "cos_sim": 0.9951, "cknna": 0.7, "dead_neurons": 3}))
    (out / "train_config.yaml").write_text("architecture: msae\nweighting: rw\nlr: 0.0001\n")
    return out


def test_publish_dry_run_tree_and_card(trained, tmp_path, capsys):
    out = tmp_path / "release"
    assert msae_cli.main(["publish", "--sae", str(trained), "--repo", "someone/msae-test", "--dry-run",
                          "--out", str(out)]) == 0
    sae_dir = out / "image_x8"
    assert sorted(p.name for p in sae_dir.iterdir()) == ["cfg.json", "sae_weights.safetensors", "sparsity.safetensors"]
    cfg = json.loads((sae_dir / "cfg.json").read_text())
    assert set(cfg["metadata"]["msae_normalization"]) == {"image", "text"}
    for k, v in load_file(trained / "sae_weights.safetensors").items():
        assert torch.equal(load_file(sae_dir / "sae_weights.safetensors")[k], v)
    card = (out / "README.md").read_text()
    assert "library_name: saelens" in card and "| `image_x8` | msae | 16 | 128 | image | msae | 0.8125 | 24 | 0.0123" in card
    assert "weighting: rw" in card and "emb/cc3m_image" in card and "emb/cc3m_text" in card
    assert "CLIP ViT-L-14@openai" in card
    capsys.readouterr()
    # uploading without the network fails clearly (conftest sets HF_HUB_OFFLINE=1)
    assert msae_cli.main(["publish", "--sae", str(trained), "--repo", "someone/msae-test"]) == 2
    assert "upload to the Hugging Face Hub failed" in capsys.readouterr().err
    assert msae_cli.main(["publish", "--sae", str(trained), str(trained), "--repo", "x/y", "--dry-run",
                          "--out", str(tmp_path / "dup")]) == 2
    assert "two SAEs would be published" in capsys.readouterr().err
    assert not (tmp_path / "dup").exists()  # refused before anything was written
    bare = tmp_path / "bare"
    shutil.copytree(trained, bare)
    cfg = json.loads((bare / "cfg.json").read_text())
    del cfg["metadata"]["msae_normalization"]["text"]
    (bare / "cfg.json").write_text(json.dumps(cfg))
    assert msae_cli.main(["publish", "--sae", str(trained), str(bare), "--repo", "x/y", "--dry-run", "--sae-id",
                          "image_x8,text_x8", "--modality", "text", "--out", str(tmp_path / "half")]) == 2
    assert "no text statistics in cfg.json" in capsys.readouterr().err
    assert not (tmp_path / "half").exists()  # the first SAE was not staged before the second was refused
    # an id is a folder of the release, never a path out of it
    for bad in ("../../escaped", "a/b", "/abs", ".."):
        assert msae_cli.main(["publish", "--sae", str(trained), "--repo", "x/y", "--dry-run", "--sae-id", bad,
                              "--out", str(tmp_path / "deep" / "release")]) == 2
        assert "must be a plain name" in capsys.readouterr().err
    assert not (tmp_path / "deep").exists() and not (tmp_path / "escaped").exists()


def test_model_card_names_data_without_local_paths(trained, tmp_path):
    """The card names the training data by its cache's manifest (model, dataset, rows) and shows no
    absolute path of the publisher's machine, in the provenance or in the recipe."""
    cache = tmp_path / "home" / "someone" / "emb" / "cc3m_train"
    cache.mkdir(parents=True)
    (cache / "manifest.json").write_text(json.dumps({"model": "ViT-L-14", "pretrained": "openai", "n_rows": 2905936,
                                                     "source": f"cc3m:{tmp_path}/home/someone/data/cc3m"}))
    (trained / "train_config.yaml").write_text(f"architecture: msae\ntrain_data: {cache}\n"
                                               f"eval_data: {tmp_path}/home/someone/emb/imagenet.npy\n")
    sae = load_sae(trained)
    attach_stats(sae, "image", ModalityStats(mean=torch.zeros(16), scale=1.0, n_rows=9, source=str(cache)))
    sae.save_model(trained)
    out = tmp_path / "release"
    assert msae_cli.main(["publish", "--sae", str(trained), "--repo", "someone/msae-test", "--dry-run",
                          "--out", str(out)]) == 0
    card = (out / "README.md").read_text()
    assert str(tmp_path) not in card and "/home/" not in card
    assert "trained on cc3m:.../data/cc3m (2905936 rows)" in card and "eval_data: .../emb/imagenet.npy" in card
    assert "image: .../emb/cc3m_train" in card


def test_registry_from_pretrained_round_trips_bit_for_bit(trained, tmp_path):
    release = "msae-ext-clip-vitl14-rw"
    registry = load_registry()
    assert {"msae-ext-clip-vitl14-rw", "msae-ext-clip-vitl14-uw", "msae-ext-clip-vitb16-rw"} <= set(registry)
    staged = tmp_path / "staged"
    assert msae_cli.main(["publish", "--sae", str(trained), "--repo", registry[release]["repo_id"],
                          "--sae-id", "image_x8", "--dry-run", "--out", str(staged)]) == 0
    cache = tmp_path / "hub"
    hf_cache_repo(cache, registry[release]["repo_id"], staged)
    code = f"""
import torch, msae_ext, sae_lens
from safetensors.torch import save_file
a = sae_lens.SAE.from_pretrained({release!r}, "image_x8")
b = msae_ext.SAE.from_pretrained({release!r})   # the release's default SAE
assert type(a).__name__ == "PaperSAE" and b.cfg.metadata["modality"] == "image"
t = msae_ext.get_stats(a, "text")
save_file({{**{{k: v.contiguous() for k, v in a.state_dict().items()}}, "text_mean": t.mean,
           "text_scale": torch.tensor(t.scale, dtype=torch.float64)}}, {str(tmp_path / 'a.safetensors')!r})
save_file({{k: v.contiguous() for k, v in b.state_dict().items()}}, {str(tmp_path / 'b.safetensors')!r})
"""
    r = run_offline(code, cache)
    assert r.returncode == 0, r.stderr[-3000:]
    original = load_file(trained / "sae_weights.safetensors")
    for name in ("a", "b"):
        loaded = load_file(tmp_path / f"{name}.safetensors")
        for k, v in original.items():
            assert torch.equal(loaded[k], v), (name, k)  # bit for bit
    text = get_stats(load_sae(trained), "text")
    loaded = load_file(tmp_path / "a.safetensors")
    assert torch.equal(loaded["text_mean"], text.mean) and float(loaded["text_scale"]) == text.scale


def test_release_missing_offline_is_a_clear_error(tmp_path):
    """This project's unpublished release names the commands that would create it (through either
    from_pretrained); the authors' release with no cache and no network names the file."""
    code = """
import msae_ext, sae_lens
for load in (lambda: msae_ext.SAE.from_pretrained("msae-ext-clip-vitb16-rw"),
             lambda: sae_lens.SAE.from_pretrained("msae-ext-clip-vitl14-uw", "text_x16"),
             lambda: msae_ext.SAE.from_pretrained("msae-clip-vitl14-rw", "image_x8_not_centered")):
    try:
        load()
    except msae_ext.publish.ReleaseUnavailableError as e:
        print("ERR", e)
"""
    r = run_offline(code, tmp_path / "empty_hub")
    assert r.returncode == 0, r.stderr[-2000:]
    errs = r.stdout.splitlines()
    assert errs[0] == ("ERR msae-ext-clip-vitb16-rw / image_x8 is not on the Hugging Face Hub yet "
                       "(msae-ext/msae-clip-vitb16-rw has not been published): create it with `msae run "
                       "recipes/vitb16_msae_x8.yaml --out runs/vitb16_msae_x8` then `msae publish --sae "
                       "runs/vitb16_msae_x8/msae_rw --repo msae-ext/msae-clip-vitb16-rw --sae-id image_x8`.")
    assert "`msae run recipes/vitl14_msae_x16.yaml" in errs[1] and "--sae-id text_x16 --modality text`" in errs[1]
    assert errs[2].startswith("ERR msae-clip-vitl14-rw / image_x8_not_centered: the file ViT-L_14/not_centered/"
                              "6144_768_TopKReLU_64_RW_False_False_0.0_cc3m_ViT-L~14_train_image_2905936_768.pth "
                              "of WolodjaZ/MSAE is neither in the local Hugging Face cache nor reachable")
    for recipe in {e["recipe"] for v in load_registry().values() for e in v["saes"] if "recipe" in e}:
        assert (ROOT / recipe).is_file(), recipe  # every command the sentence names can run


def test_upload_hands_the_staged_tree_to_huggingface_hub(trained, tmp_path, monkeypatch):
    """The upload path, with HfApi replaced by a recorder (no network here): the repo is created and
    the folder handed to upload_folder is the same tree --dry-run writes."""
    import huggingface_hub

    calls = {}

    class RecordingApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls["create"] = (repo_id, private, exist_ok)

        def upload_folder(self, folder_path, repo_id, commit_message):
            calls["files"] = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
            calls["upload"] = (repo_id, commit_message)
            return type("Info", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    from msae_ext.publish import publish

    url = publish([trained], "someone/msae-test", private=True)
    assert url == "https://huggingface.co/someone/msae-test/commit/abc"
    assert calls["create"] == ("someone/msae-test", True, True)
    assert calls["files"] == ["README.md", "image_x8/cfg.json", "image_x8/sae_weights.safetensors",
                              "image_x8/sparsity.safetensors", "msae_release.json"]
    assert "image_x8" in calls["upload"][1]


def test_standard_export_loads_without_msae_ext(trained, tmp_path):
    staged = tmp_path / "staged"
    assert msae_cli.main(["publish", "--sae", str(trained), "--repo", "someone/plain", "--format", "standard",
                          "--dry-run", "--out", str(staged)]) == 0
    cache = tmp_path / "hub"
    hf_cache_repo(cache, "someone/plain", staged)
    x = torch.randn(20, 16, generator=torch.Generator().manual_seed(3)) * 2
    np.save(tmp_path / "x.npy", x.numpy())
    code = f"""
import sys, numpy as np, torch
from sae_lens import SAE
sae = SAE.from_pretrained("someone/plain", "image_x8")
assert "msae_ext" not in sys.modules, "msae_ext was imported"
assert sae.cfg.architecture() == "standard"
x = torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r}))
np.save({str(tmp_path / 'recon.npy')!r}, sae(x).detach().numpy())
"""
    r = run_offline(code, cache)
    assert r.returncode == 0, r.stderr[-3000:]
    sae = load_sae(trained)
    stats = get_stats(sae, "image")
    want = stats.invert(sae.decode(sae.encode(stats.apply(x)))).detach().numpy()
    np.testing.assert_allclose(np.load(tmp_path / "recon.npy"), want, rtol=1e-4, atol=1e-4)


def test_authors_loader_registered_with_sae_lens(tmp_path):
    """The 'msae_authors' named loader through sae-lens's from_pretrained, from the Hub cache."""
    tree = tmp_path / "tree"
    tree.mkdir()
    state = authors_checkpoint(tree / AUTHORS_NAME)
    cache = tmp_path / "hub"
    hf_cache_repo(cache, "authors/msae", tree)
    x = torch.randn(6, 16)
    np.save(tmp_path / "x.npy", x.numpy())
    code = f"""
import numpy as np, torch, msae_ext
from sae_lens import SAE
from sae_lens.loading.pretrained_sae_loaders import NAMED_PRETRAINED_SAE_LOADERS
sae = SAE.from_pretrained("authors/msae", {AUTHORS_NAME!r}, converter=NAMED_PRETRAINED_SAE_LOADERS["msae_authors"])
s = msae_ext.get_stats(sae, "image")
x = torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r}))
np.save({str(tmp_path / 'recon.npy')!r}, s.invert(sae.decode(sae.encode(s.apply(x)))).detach().numpy())
"""
    r = run_offline(code, cache)
    assert r.returncode == 0, r.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "recon.npy"), authors_forward(state, x)[1].numpy(),
                               rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# The authors' release under its exact Hub names (synthetic contents), offline
# --------------------------------------------------------------------------------------------

AUTHORS_RELEASE = "msae-clip-vitl14-rw"


@pytest.fixture(scope="module")
def authors_release(tmp_path_factory):
    """A Hugging Face cache of WolodjaZ/MSAE holding every file the registry names for the release,
    at full size (768 -> 6144), with a 400-word vocabulary (the real one has 20,000)."""
    root = tmp_path_factory.mktemp("authors_release")
    value = load_registry()[AUTHORS_RELEASE]
    tree = root / "tree"
    words = [w for w in (ROOT / "msae_ext/interpret/data/vocab_wordfreq_en_10k.txt").read_text().split()
             if not w.startswith("#") and w.isalpha()][100:500]
    (tree / value["vocabulary"]).parent.mkdir(parents=True, exist_ok=True)
    (tree / value["vocabulary"]).write_text("\n".join(words) + "\n")
    states, matrices = {}, {}
    for seed, entry in enumerate(value["saes"]):
        path = tree / entry["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        states[entry["id"]] = authors_checkpoint(path, d_in=768, d_sae=6144, seed=seed, centered=entry["centered"])
        rng = np.random.default_rng(seed)
        m = (rng.standard_normal((len(words), 6144)) * 0.08).astype(np.float32)
        m[rng.integers(0, len(words), 6144), np.arange(6144)] += 0.45  # a clear best word for most latents
        np.save(tree / entry["concepts"], m)
        matrices[entry["id"]] = m
    cache = root / "hub"
    hf_cache_repo(cache, value["repo_id"], tree)
    return {"cache": cache, "states": states, "matrices": matrices, "words": words, "root": root}


def readme_snippet() -> tuple[str, str]:
    """The README's from_pretrained code block and the output block printed under it."""
    text = (ROOT / "README.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    out = text.split("```python\n", 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    return code, out


def test_authors_release_loads_offline_under_its_hub_names(authors_release):
    """The release resolves to the right files; the SAE on raw embeddings equals the authors' forward
    (centered and not); concept names equal an independent argmax of the matrix; the README's
    lines print what the README shows."""
    rel, root = authors_release, authors_release["root"]
    x = torch.randn(8, 768, generator=torch.Generator().manual_seed(7)) * 0.5 + 0.3
    np.save(root / "x.npy", x.numpy())
    np.save(root / "index.npy", (x + 0.01 * torch.randn(8, 768)).numpy())
    code, printed = readme_snippet()
    script = f"""
import io, json, contextlib, numpy as np, torch, msae_ext, sae_lens
from safetensors.torch import save_file
x = torch.from_numpy(np.load({str(root / 'x.npy')!r}))
a = msae_ext.SAE.from_pretrained({AUTHORS_RELEASE!r})
b = sae_lens.SAE.from_pretrained({AUTHORS_RELEASE!r}, "image_x8")
c = sae_lens.SAE.from_pretrained({AUTHORS_RELEASE!r}, "image_x8_not_centered")
out = {{}}
for name, sae in (("a", a), ("b", b), ("c", c)):
    s = msae_ext.get_stats(sae, "image")
    z = sae.encode(s.apply(x))
    out[name + "_z"], out[name + "_recon"] = z.contiguous(), s.invert(sae.decode(z)).contiguous()
    out[name + "_W_enc"] = sae.W_enc.contiguous()
save_file(out, {str(root / 'out.safetensors')!r})
assert type(a).__name__ == "PaperSAE" and a.cfg.architecture() == "msae" and a.cfg.d_sae == 6144
from msae_ext.cli import main
assert main(["concepts", "--sae", {AUTHORS_RELEASE!r}, "--out", {str(root / 'concepts.json')!r}]) == 0
assert main(["search", "--sae", {AUTHORS_RELEASE + ':image_x8_not_centered'!r}, "--index", {str(root / 'index.npy')!r},
             "--query-row", "0", "--k", "2", "--out", {str(root / 'search.json')!r}]) == 0
clip_embedding = x[0]
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    exec({code!r})
open({str(root / 'readme_out.txt')!r}, "w").write(buf.getvalue())
"""
    r = run_offline(script, rel["cache"])
    assert r.returncode == 0, r.stderr[-3000:]
    got = load_file(root / "out.safetensors")
    for name, sae_id in (("a", "image_x8"), ("b", "image_x8"), ("c", "image_x8_not_centered")):
        state = rel["states"][sae_id]
        z_ref, recon_ref = authors_forward({k: torch.as_tensor(v, dtype=torch.float32) for k, v in state.items()}, x)
        torch.testing.assert_close(got[f"{name}_z"], z_ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got[f"{name}_recon"], recon_ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(got["a_W_enc"], got["b_W_enc"]) and not torch.equal(got["a_W_enc"], got["c_W_enc"])

    doc = json.loads((root / "concepts.json").read_text())
    m, words = rel["matrices"]["image_x8"], rel["words"]
    best = m.argmax(axis=0)  # the independent argmax: each latent's most similar word
    assert [n["concepts"][0][0] for n in doc["neurons"]] == [words[i] for i in best]
    np.testing.assert_allclose([n["concepts"][0][1] for n in doc["neurons"]], m.max(axis=0), rtol=1e-6)
    owners = m.argmax(axis=1)  # each word's best latent: validation 3 picks one word per latent
    for n in doc["neurons"][:200]:
        mine = [w for w in range(len(words)) if owners[w] == n["index"]]
        want = words[max(mine, key=lambda w: m[w, n["index"]])] if mine else words[best[n["index"]]]
        assert n["label"] == want and ("best_vector" in n["valid"]) == bool(mine)
    assert doc["counts"]["all"] > 0 and doc["sae"] == f"{AUTHORS_RELEASE}:image_x8"
    hits = json.loads((root / "search.json").read_text())
    assert hits["clip"][0]["row"] == 0 and len(hits["query_concepts"]) == 8
    assert all(c[0] in words for c in hits["query_concepts"])

    assert (root / "readme_out.txt").read_text() == printed, "README.md's printed lines differ from what they print"


def test_sae_lens_own_releases_still_load_after_import(tmp_path):
    """After `import msae_ext` (and registering twice), a sae-lens release resolves through
    sae-lens's own loader: a cache of gpt2-small-res-jb's repository holding a small standard SAE."""
    from sae_lens import StandardSAE, StandardSAEConfig

    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=768, d_sae=32))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p))
    tree = tmp_path / "tree"
    sae.save_model(tree / "blocks.0.hook_resid_pre")
    hf_cache_repo(tmp_path / "hub", "jbloom/GPT2-Small-SAEs-Reformatted", tree)
    code = f"""
import msae_ext, sae_lens
msae_ext.register_releases(); msae_ext.register_releases()
sae = sae_lens.SAE.from_pretrained("gpt2-small-res-jb", "blocks.0.hook_resid_pre")
assert type(sae).__name__ == "StandardSAE", type(sae)
from safetensors.torch import save_file
save_file({{k: v.contiguous() for k, v in sae.state_dict().items()}}, {str(tmp_path / 'got.safetensors')!r})
"""
    r = run_offline(code, tmp_path / "hub")
    assert r.returncode == 0, r.stderr[-3000:]
    got = load_file(tmp_path / "got.safetensors")
    for k, v in sae.state_dict().items():
        assert torch.equal(got[k], v), k
