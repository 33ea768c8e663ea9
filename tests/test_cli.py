"""End to end through the `msae` command line: train, eval, report, export, kill-and-resume, demo."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from msae_ext.cli import main

REPORT_KEYS = {"l0_sparsity", "l0_active", "fvu", "evr", "cos_sim", "cknna", "decoder_orthogonality",
               "dead_neurons", "n_samples"}


def write_config(path: Path, train: Path, evalx: Path, **extra) -> Path:
    """A small run; an MSAE with k_min 4 unless `extra` names another architecture (and its options)."""
    lines = [f"train_data: {train}", f"eval_data: {evalx}", "expansion_factor: 4", "batch_size: 128",
             "epochs: 2", "eval_every: 0", "checkpoint_every: 4"] + ([] if "architecture" in extra else ["k_min: 4"])
    lines += [f"{k}: {v}" for k, v in extra.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
def test_train_eval_report_export(tmp_path, embeddings, capsys):
    train, evalx, x = embeddings
    config = write_config(tmp_path / "run.yaml", train, evalx)
    assert main(["train", str(config), "--set", "weighting=uw", "--out", str(tmp_path / "uw"), "--no-progress"]) == 0
    topk_config = write_config(tmp_path / "topk.yaml", train, evalx, architecture="topk", k=4)
    assert main(["train", str(topk_config), "--out", str(tmp_path / "topk"), "--no-progress"]) == 0
    labels = tmp_path / "labels.npy"
    np.save(labels, (x[2048:, 0] > np.median(x[2048:, 0])).astype(np.int64))
    assert main(["eval", "--sae", str(tmp_path / "uw"), "--data", str(evalx), "--labels", str(labels),
                 "--figures", str(tmp_path / "fig"), "--out", str(tmp_path / "uw.json")]) == 0
    report = json.loads((tmp_path / "uw.json").read_text())
    assert REPORT_KEYS | {"lp_kl", "lp_acc"} <= set(report)
    assert report["n_samples"] == 552 and report["protocol"] == "paper"
    assert (tmp_path / "fig" / "activation_histogram.png").stat().st_size > 1000
    assert main(["eval", "--sae", str(tmp_path / "topk"), "--data", str(evalx), "--protocol", "both",
                 "--out", str(tmp_path / "topk.json")]) == 0
    topk = json.loads((tmp_path / "topk.json").read_text())
    assert topk["native"]["l0_active"] <= 4 < topk["l0_active"]  # top-k kept vs removed
    printed = capsys.readouterr().out  # both protocols' summaries, not only the first
    assert "paper protocol:" in printed and "native protocol:" in printed
    assert main(["report", str(tmp_path / "uw.json"), str(tmp_path / "topk.json"), "--names", "MSAE (UW)",
                 "TopK", "--out", str(tmp_path / "rep")]) == 0
    table = capsys.readouterr().out
    assert "| MSAE (UW) |" in table and "FVU" in table and "CKNNA" in table
    assert (tmp_path / "rep" / "sparsity_fidelity.png").exists()

    # export: a plain sae-lens `standard` SAE taking raw embeddings, loaded without msae_ext
    assert main(["export", "--sae", str(tmp_path / "uw"), "--format", "standard", "--modality", "image",
                 "--out", str(tmp_path / "std")]) == 0
    from msae_ext.loading import load_sae
    from msae_ext.normalization import get_stats

    sae = load_sae(tmp_path / "uw")
    stats = get_stats(sae, "image")
    raw = torch.from_numpy(x[2048:2100])
    with torch.no_grad():
        expected = stats.invert(sae.decode(sae.encode(stats.apply(raw)))).double()
    np.save(tmp_path / "raw.npy", raw.numpy())
    script = textwrap.dedent(f"""
        import sys, numpy as np, torch
        from sae_lens import SAE
        sae = SAE.load_from_disk({str(tmp_path / 'std')!r})
        assert sae.cfg.architecture() == "standard"
        with torch.no_grad():
            out = sae(torch.from_numpy(np.load({str(tmp_path / 'raw.npy')!r})))
        np.save({str(tmp_path / 'std_out.npy')!r}, out.numpy())
        assert not any(m.startswith("msae_ext") for m in sys.modules), "msae_ext was imported"
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    got = torch.from_numpy(np.load(tmp_path / "std_out.npy")).double()
    rel = float((got - expected).norm() / expected.norm())
    assert rel < 1e-5
    # the exported SAE evaluates as taking raw embeddings, to the same numbers
    assert main(["eval", "--sae", str(tmp_path / "std"), "--data", str(evalx), "--modality", "image",
                 "--out", str(tmp_path / "std.json")]) == 0
    std_report = json.loads((tmp_path / "std.json").read_text())
    assert std_report["architecture"] == "standard"
    for key in ("fvu", "cos_sim", "l0_active"):
        assert std_report[key] == pytest.approx(report[key], rel=1e-4, abs=1e-6)


def test_cli_errors_are_clear(tmp_path, embeddings, capsys):
    train, evalx, _ = embeddings
    np.save(tmp_path / "wide.npy", np.zeros((100, 5), np.float32))
    config = write_config(tmp_path / "run.yaml", train, evalx, epochs=1)
    assert main(["train", str(config), "--out", str(tmp_path / "m"), "--no-progress"]) == 0
    assert main(["eval", "--sae", str(tmp_path / "m"), "--data", str(tmp_path / "wide.npy"),
                 "--out", str(tmp_path / "r.json")]) == 2
    assert "dimension 5, the SAE expects d_in=16" in capsys.readouterr().err
    assert main(["eval", "--sae", str(tmp_path / "m"), "--data", str(evalx), "--modality", "text",
                 "--out", str(tmp_path / "r.json")]) == 2
    assert "no 'text' normalisation statistics" in capsys.readouterr().err
    assert main(["train", str(config), "--set", "architecture=gated", "--out", str(tmp_path / "x")]) == 2
    assert "unknown architecture 'gated'" in capsys.readouterr().err
    # a missing path is reported by the parser itself, before anything is imported
    for argv, message in ((["export", "--sae", str(tmp_path / "nothing"), "--modality", "image", "--out", "e"],
                           "nothing: no such SAE folder"),
                          (["eval", "--sae", str(tmp_path / "m"), "--data", str(tmp_path / "none.npy"), "--out", "r"],
                           "none.npy: no such file or directory"),
                          (["train", str(tmp_path / "none.yaml"), "--out", "o"], "none.yaml: no such file")):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    # damaged files name the file and what is wrong with it
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "cfg.json").write_text("{not json")
    (tmp_path / "broken" / "sae_weights.safetensors").write_bytes(b"")
    assert main(["eval", "--sae", str(tmp_path / "broken"), "--data", str(evalx), "--out", "r"]) == 2
    assert "broken/cfg.json: not valid JSON" in capsys.readouterr().err
    (tmp_path / "truncated").mkdir()
    (tmp_path / "truncated" / "cfg.json").write_text((tmp_path / "m" / "cfg.json").read_text())
    (tmp_path / "truncated" / "sae_weights.safetensors").write_bytes(
        (tmp_path / "m" / "sae_weights.safetensors").read_bytes()[:200])
    assert main(["eval", "--sae", str(tmp_path / "truncated"), "--data", str(evalx), "--out", "r"]) == 2
    assert "truncated/sae_weights.safetensors: not a readable safetensors file" in capsys.readouterr().err
    (tmp_path / "labels.npy").write_text("0\n1\n")  # a text file named .npy is not pickled data
    assert main(["eval", "--sae", str(tmp_path / "m"), "--data", str(evalx), "--labels", str(tmp_path / "labels.npy"),
                 "--out", "r"]) == 2
    err = capsys.readouterr().err
    assert "labels.npy: not an .npy file (it starts with b'0\\n1\\n')" in err and "pickle" not in err
    np.save(tmp_path / "negative.npy", np.array([0, 1, -1]))
    assert main(["eval", "--sae", str(tmp_path / "m"), "--data", str(evalx), "--labels", str(tmp_path / "negative.npy"),
                 "--out", "r"]) == 2
    assert "must be >= 0; row 2 holds -1" in capsys.readouterr().err
    # too few rows: a sentence, not a ZeroDivisionError or a silent NaN
    np.save(tmp_path / "one.npy", np.load(evalx)[:1])
    assert main(["eval", "--sae", str(tmp_path / "m"), "--data", str(tmp_path / "one.npy"), "--out", "r"]) == 2
    assert "do not vary (one row, or all identical)" in capsys.readouterr().err
    np.save(tmp_path / "six.npy", np.load(evalx)[:6])
    with pytest.warns(UserWarning, match="CKNNA with k = 10 needs at least 14 rows; the set has 6"):
        assert main(["eval", "--sae", str(tmp_path / "m"), "--data", str(tmp_path / "six.npy"),
                     "--out", str(tmp_path / "six.json")]) == 0
    six = json.loads((tmp_path / "six.json").read_text())
    assert six["cknna"] is None and "needs at least 14 rows" in six["cknna_undefined"]
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert main(["eval", "--sae", str(tmp_path / "m"), "--data", str(evalx), "--labels", str(tmp_path / "objects.npy"),
                 "--out", "r"]) == 2
    assert "objects.npy: an array of Python objects, which would run code when loaded" in capsys.readouterr().err


def test_import_is_light_and_registers_with_sae_lens_in_either_order(tmp_path, embeddings):
    """`import msae_ext` imports neither sae-lens nor torch; the architectures are registered when
    sae-lens is imported afterwards, or at once when it already was."""
    registered = textwrap.dedent("""
        import sys
        from sae_lens.registry import SAE_CLASS_REGISTRY
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
        assert {"msae", "msae_relu", "msae_topk", "msae_batchtopk"} <= set(SAE_CLASS_REGISTRY)
        assert "msae-clip-vitl14-rw" in get_pretrained_saes_directory()
        assert "open_clip" not in sys.modules
    """)
    light = textwrap.dedent("""
        import sys
        import msae_ext
        heavy = [m for m in ("sae_lens", "torch", "open_clip", "transformers", "wandb") if m in sys.modules]
        assert not heavy, heavy
    """)
    subprocess.run([sys.executable, "-c", light + registered], check=True)
    subprocess.run([sys.executable, "-c", "import sae_lens, msae_ext\n" + registered], check=True)


def test_help_is_fast_and_lists_commands():
    t = time.time()
    out = subprocess.run([sys.executable, "-m", "msae_ext.cli", "--help"], capture_output=True, text=True, check=True)
    assert time.time() - t < 5
    for cmd in ("train", "eval", "report", "export", "demo"):
        assert cmd in out.stdout


@pytest.mark.slow
def test_killed_process_resumes_to_the_same_weights(tmp_path, embeddings):
    """SIGKILL a real `msae train` after its first checkpoints; rerunning the command finishes the run."""
    from safetensors.torch import load_file

    train, evalx, x = embeddings
    big = np.concatenate([x[:2048]] * 4)
    np.save(tmp_path / "big.npy", big)
    config = write_config(tmp_path / "run.yaml", tmp_path / "big.npy", evalx, epochs=3, final_eval="false",
                          checkpoint_every=8)
    cmd = [sys.executable, "-m", "msae_ext.cli", "train", str(config), "--out", str(tmp_path / "killed"), "--no-progress"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not (ckpts.exists() and len(list(ckpts.glob("step_*"))) >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "sae_weights.safetensors").exists(), "the run finished before the kill"
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    subprocess.run(cmd[:-3] + ["--out", str(tmp_path / "clean"), "--no-progress"], env=env, check=True,
                   capture_output=True)
    a, b = load_file(tmp_path / "killed" / "sae_weights.safetensors"), load_file(tmp_path / "clean" / "sae_weights.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_demo_quick(tmp_path, capsys):
    """The main job on real text (WordNet definitions, wordllama): Table 1 of the four SAEs, named
    latents with their top texts, the concept browser's site and the command that serves it."""
    assert main(["demo", "--quick", "--out", str(tmp_path / "demo"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    for name in ("MSAE (RW)", "MSAE (UW)", "TopK", "ReLU"):
        assert f"| {name}" in out
    assert (tmp_path / "demo" / "sparsity_fidelity.png").exists()
    assert (tmp_path / "demo" / "table1.md").read_text().count("\n") == 6
    concepts = json.loads((tmp_path / "demo" / "runs" / "msae_rw" / "concepts.json").read_text())
    named = [line for line in out.splitlines() if line.startswith("  #")]
    assert len(named) == 6 and all(line.split()[1] in concepts["neurons"][int(line.split()[0][1:])]["label"]
                                   for line in named)
    assert len(list((tmp_path / "demo" / "dashboard" / "data" / "latent").glob("*.js"))) == 16
    assert f"msae serve --sae {tmp_path / 'demo' / 'runs' / 'msae_rw'}" in out


@pytest.mark.slow
def test_demo_quick_synthetic(tmp_path, capsys):
    assert main(["demo", "--synthetic", "--quick", "--out", str(tmp_path / "demo"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| MSAE (RW)" in out and "ground-truth feature recovery" in out
    assert (tmp_path / "demo" / "table1.md").read_text().count("\n") == 6
