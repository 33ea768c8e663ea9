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
from msae_ext.publish import AuthorsCheckpointError, load_authors_sae, load_registry, parse_authors_name

ROOT = Path(__file__).resolve().parents[1]
AUTHORS_NAME = "64_16_TopKReLU_4_RW_False_False_0.0_cc3m_ViT-L~14_train_image_1000_16.pth"


def authors_checkpoint(path: Path, d_in=16, d_sae=64, linear_keys=False, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(500, d_in, generator=g) * 2 + 1
    mean = x.mean(0)
    sq = (x - mean).norm(dim=1).pow(2).mean()
    target_norm = torch.tensor(d_in ** 0.5)
    state = {
        "pre_bias": torch.randn(d_in, generator=g) * 0.1,
        "encoder": torch.randn(d_in, d_sae, generator=g) / d_in ** 0.5,
        "latent_bias": torch.randn(d_sae, generator=g) * 0.1,
        "decoder": torch.nn.functional.normalize(torch.randn(d_sae, d_in, generator=g), dim=1),
        "mean_center": mean,
        "scaling_factor": target_norm / sq,  # their formula: no square root
        "target_norm": target_norm,
    }
    saved = dict(state)
    if linear_keys:  # nn.Linear layout: weight (out, in)
        saved["encoder.weight"] = saved.pop("encoder").T.contiguous()
        saved["decoder.weight"] = saved.pop("decoder").T.contiguous()
    torch.save(saved, path)
    return state


def authors_forward(state: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Their inference, written out from the checkpoint's tensors: ReLU only, their statistics."""
    xn = (x - state["mean_center"]) * state["scaling_factor"]
    z = torch.relu((xn - state["pre_bias"]) @ state["encoder"] + state["latent_bias"])
    recon = (z @ state["decoder"] + state["pre_bias"]) / state["scaling_factor"] + state["mean_center"]
    return z, recon


@pytest.mark.parametrize("linear_keys", [False, True])
def test_authors_checkpoint_matches_their_forward(tmp_path, linear_keys):
    path = tmp_path / AUTHORS_NAME
    state = authors_checkpoint(path, linear_keys=linear_keys)
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
    # an id is a folder of the release, never a path out of it
    for bad in ("../../escaped", "a/b", "/abs", ".."):
        assert msae_cli.main(["publish", "--sae", str(trained), "--repo", "x/y", "--dry-run", "--sae-id", bad,
                              "--out", str(tmp_path / "deep" / "release")]) == 2
        assert "must be a plain name" in capsys.readouterr().err
    assert not (tmp_path / "deep").exists() and not (tmp_path / "escaped").exists()


def test_registry_from_pretrained_round_trips_bit_for_bit(trained, tmp_path):
    release = "msae-clip-vitl14-rw"
    registry = load_registry()
    assert {"msae-clip-vitl14-rw", "msae-clip-vitl14-uw", "msae-clip-vitb16-rw"} <= set(registry)
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
    code = """
import msae_ext
try:
    msae_ext.SAE.from_pretrained("msae-clip-vitb16-rw")
except ValueError as e:
    print("ERR", e)
"""
    r = run_offline(code, tmp_path / "empty_hub")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ERR msae-clip-vitb16-rw / image_x8: the files are neither in the local Hugging Face cache" in r.stdout
    assert "msae-ext/msae-clip-vitb16-rw" in r.stdout


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
