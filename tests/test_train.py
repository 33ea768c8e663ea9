"""The paper's optimisation step, reproducibility, atomic checkpoints and exact resumption."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from msae_ext.config import ConfigError, TrainConfig, load_config
from msae_ext.recipes import train_and_evaluate
from msae_ext.store import EmbeddingDataError
from msae_ext.train import (
    CheckpointError,
    _Interrupt,
    latest_checkpoint,
    lr_lambda,
    paper_optimizer,
    remove_parallel_decoder_grad,
    train,
)

#: the small-data option of each architecture
SMALL = {"msae": {"k_min": 4}, "topk": {"k": 4}, "batchtopk": {"k": 4}, "relu": {}}


def cfg(train_path, eval_path=None, **kw):
    arch = kw.get("architecture", "msae")
    base = dict(train_data=str(train_path), eval_data=str(eval_path) if eval_path else None, expansion_factor=4,
                batch_size=128, epochs=3, eval_every=0, checkpoint_every=5, eval_rows=300, **SMALL[arch])
    base.update(kw)
    return TrainConfig.from_dict(base)


def trained(c, out, **kw):
    """train_and_evaluate's one result: the run, and its final held-out report when c has eval_data."""
    return train_and_evaluate(c, out, progress=False, **kw)[0]


def weights(out):
    return load_file(out / "sae_weights.safetensors")


def test_parallel_gradient_component_is_removed():
    W = torch.randn(10, 6, requires_grad=True)
    g = torch.randn(10, 6)
    W.grad = g.clone()
    remove_parallel_decoder_grad(W)
    unit = W.detach() / W.detach().norm(dim=1, keepdim=True)
    torch.testing.assert_close((W.grad * unit).sum(1), torch.zeros(10), atol=1e-6, rtol=0)
    torch.testing.assert_close(W.grad, g - (g * unit).sum(1, keepdim=True) * unit)


def test_paper_optimizer_is_adamw():
    """The trainer's optimiser (torch's fused AdamW on CPU float32) against AdamW written out in float64."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(7, 5)), torch.nn.Parameter(torch.randn(5))]
    lr, (b1, b2), wd, eps = 3e-2, (0.9, 0.999), 0.1, 1e-8
    opt = paper_optimizer(params, lr=lr, betas=(b1, b2), weight_decay=wd)
    assert opt.defaults["fused"] is True
    ref = [p.detach().double().clone() for p in params]
    m = [torch.zeros_like(r) for r in ref]
    v = [torch.zeros_like(r) for r in ref]
    for t in range(1, 6):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):
            g = g.double()
            ref[i] *= 1 - lr * wd
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            ref[i] -= lr * (m[i] / (1 - b1**t)) / ((v[i] / (1 - b2**t)).sqrt() + eps)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach().double(), r, rtol=1e-5, atol=1e-6)
    # float64 parameters take torch's default implementation
    assert not paper_optimizer([torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))], lr=lr).defaults["fused"]


def test_schedules():
    f = lr_lambda("constant_then_linear", 100, 0.8)
    assert [f(0), f(79), f(80), f(90), f(100)] == [1.0, 1.0, 1.0, 0.5, 0.0]
    c = lr_lambda("cosine", 100)
    assert c(0) == 1.0 and c(50) == pytest.approx(0.5) and c(100) == pytest.approx(0.0)
    assert lr_lambda("constant", 10)(9) == 1.0


def test_config_overrides_and_unknown_keys(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("architecture: topk\nk: 32\nwandb:\n  mode: offline\n")
    c = load_config(p, ["k=128", "wandb.project=x", "soft_cap=null", "epochs=2"])
    assert (c.architecture, c.options, c.wandb.mode, c.wandb.project, c.epochs) == (
        "topk", {"k": 128, "soft_cap": None}, "offline", "x", 2)
    assert c.learning_rate == 5e-4  # the paper's TopK lr
    assert c.to_dict()["k"] == 128 and TrainConfig.from_dict(c.to_dict()) == c  # a flat mapping, round trip
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['learning_rate'\]"):
        load_config(None, ["learning_rate=1"])
    # each architecture takes its own options only: k_list is the MSAE's, not TopK's
    with pytest.raises(ConfigError, match=r"\['k_list'\].*options of architecture 'topk' \(\['aux_loss_coefficient', 'k'"):
        load_config(p, ["k_list=[8, 16]"])
    assert load_config(None, ["k_list=[8, 16]"]).options == {"k_list": [8, 16]}
    with pytest.raises(ValueError, match="unknown architecture"):
        load_config(None, ["architecture=gated"])
    for bad, message in (("expansion_factor=0", "expansion_factor must be a positive integer, got 0"),
                         ("d_sae=-5", "d_sae must be a positive integer, got -5"),
                         ("batch_size=0", "batch_size must be >= 1"), ("lr=-1", "lr must be positive"),
                         ("dtype=float16", "dtype must be float32, float64 or bfloat16.*set autocast: true")):
        with pytest.raises(ConfigError, match=message):
            load_config(None, [bad])
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("arch", ["msae", "topk", "batchtopk", "relu"])
def test_training_step_keeps_unit_decoder_and_is_reproducible(tmp_path, embeddings, arch):
    train_path, eval_path, _ = embeddings
    c = cfg(train_path, eval_path, architecture=arch, epochs=1, soft_cap=5.0 if arch == "msae" else None)
    a = trained(c, tmp_path / "a")
    trained(c, tmp_path / "b")
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # same seed, same weights
    norms = wa["W_dec"].norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    assert a.steps == 2048 // 128
    other = trained(cfg(train_path, architecture=arch, epochs=1, seed=7), tmp_path / "c")
    assert not torch.equal(weights(tmp_path / "c")["W_dec"], wa["W_dec"])
    assert other.eval_report is None
    report = a.eval_report
    assert report["n_samples"] == 552 and 0 <= report["fvu"] and report["dead_neurons"] >= 0


def test_training_reduces_loss(tmp_path, embeddings):
    train_path, eval_path, _ = embeddings
    r = trained(cfg(train_path, eval_path, epochs=6, lr=3e-3, eval_every=16, k_min=2), tmp_path / "r")
    evals = [json.loads(l) for l in (tmp_path / "r" / "training_log.jsonl").read_text().splitlines()]
    fvus = [e["fvu"] for e in evals if e["event"] == "eval"]
    assert len(fvus) == 6 and fvus[-1] < 0.5 * fvus[0]
    assert r.eval_report["fvu"] == pytest.approx(fvus[-1], rel=0.3)
    # the training-time dead-latent count of the report is the last epoch's, as the log has it
    dead = [e["dead_latents_epoch"] for e in evals if e["event"] == "epoch_end"]
    assert len(dead) == 6 and r.eval_report["dead_neurons_train"] == dead[-1] < r.sae.cfg.d_sae
    saved = json.loads((tmp_path / "r" / "cfg.json").read_text())["metadata"]
    assert saved["dead_latents_train_last_epoch"] == dead[-1]


def test_interrupted_run_resumes_to_identical_weights(tmp_path, embeddings):
    train_path, _, _ = embeddings
    c = cfg(train_path, epochs=3, checkpoint_every=5)
    train(c, tmp_path / "full", progress=False)
    with pytest.raises(_Interrupt):
        train(c, tmp_path / "cut", progress=False, stop_after_steps=23)  # mid-epoch 2
    ckpt = latest_checkpoint(tmp_path / "cut")
    assert ckpt.name == "step_000000020"  # lost at most one checkpoint interval
    # a half-written checkpoint from the crash must not be picked up
    (tmp_path / "cut" / "checkpoints" / ".tmp-step_000000025-999").mkdir()
    resumed = train(c, tmp_path / "cut", progress=False)
    assert resumed.resumed_from == ckpt
    wf, wc = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert all(torch.equal(wf[k], wc[k]) for k in wf)
    kept = sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert len(kept) == 2 and kept[-1] == "step_000000048"
    with pytest.raises(ValueError, match=r"different config \(changed: \['k_min'\]\)"):
        train(cfg(train_path, epochs=3, checkpoint_every=5, k_min=8), tmp_path / "cut", progress=False)


def test_a_resumed_run_logs_each_step_once_and_its_time_continues(tmp_path, embeddings):
    train_path, eval_path, _ = embeddings
    c = cfg(train_path, eval_path, epochs=3, checkpoint_every=5, eval_every=4)
    train(c, tmp_path / "full", progress=False)
    with pytest.raises(_Interrupt):
        train(c, tmp_path / "cut", progress=False, stop_after_steps=23)  # evals at 4 ... 20 logged
    train(c, tmp_path / "cut", progress=False)  # resumes at step 20

    def records(folder):
        return [json.loads(line) for line in (folder / "training_log.jsonl").read_text().splitlines()]

    key = lambda r: (r["event"], r["step"])  # noqa: E731
    assert [key(r) for r in records(tmp_path / "cut")] == [key(r) for r in records(tmp_path / "full")]
    elapsed = [r["elapsed_s"] for r in records(tmp_path / "cut") if r["event"] == "epoch_end"]
    assert len(elapsed) == 3 and elapsed == sorted(elapsed) and elapsed[0] > 0


def test_the_final_files_are_replaced_as_a_set(tmp_path, embeddings, monkeypatch):
    """A kill while the final SAE is written leaves no SAE in the folder, never a new cfg.json beside
    old weights; the next run writes it whole."""
    import msae_ext.train as train_module

    train_path, _, _ = embeddings
    c = cfg(train_path, epochs=1)
    train(c, tmp_path / "r", progress=False)
    real_replace = os.replace

    def killed_midway(src, dst):
        if Path(dst).name == "sparsity.safetensors":
            raise KeyboardInterrupt  # stands in for a kill between two files
        return real_replace(src, dst)

    monkeypatch.setattr(train_module.os, "replace", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        train(c, tmp_path / "r", progress=False, resume=False)
    assert not (tmp_path / "r" / "cfg.json").exists()
    monkeypatch.setattr(train_module.os, "replace", real_replace)
    train(c, tmp_path / "r", progress=False)
    from msae_ext.loading import load_sae

    assert load_sae(tmp_path / "r").cfg.d_sae == 64


def test_bad_inputs_fail_before_training(tmp_path, embeddings):
    """NaN rows in the training or the held-out data, a held-out set of another width, options the
    data's width rules out and a device the machine lacks are all refused before a step is taken."""
    train_path, eval_path, x = embeddings
    bad = x[:512].copy()
    bad[[3, 9]] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(EmbeddingDataError, match=r"2 row\(s\).*first is row 3"):
        train(cfg(tmp_path / "nan.npy"), tmp_path / "o", progress=False)
    with pytest.raises(EmbeddingDataError, match=r"nan.npy: 2 row\(s\).*first is row 3"):
        train(cfg(train_path, tmp_path / "nan.npy"), tmp_path / "o1", progress=False)
    np.save(tmp_path / "wide.npy", np.zeros((300, 17), np.float32))
    with pytest.raises(EmbeddingDataError, match="dimension 17, the SAE expects d_in=16"):
        train(cfg(train_path, tmp_path / "wide.npy"), tmp_path / "o2", progress=False)
    for arch, option, message in (("topk", {"k": 100}, r"k must be an integer in \[1, d_sae=64\], got 100"),
                                  ("topk", {"k": 4.5}, r"k must be an integer in \[1, d_sae=64\], got 4.5"),
                                  ("msae", {"k_min": 100}, r"k_min 100 is above d_sae 64"),
                                  ("msae", {"k_list": [4.5, 64]}, r"k_list values must be integers")):
        with pytest.raises(ValueError, match=message):
            train(cfg(train_path, architecture=arch, **option), tmp_path / "o3", progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda': this machine has no CUDA device"):
            train(cfg(train_path, device="cuda"), tmp_path / "o4", progress=False)
    for out in ("o", "o1", "o2", "o3", "o4"):
        assert not (tmp_path / out / "checkpoints").exists()


def test_a_corrupt_latest_checkpoint_falls_back_to_an_older_one(tmp_path, embeddings):
    train_path, _, _ = embeddings
    c = cfg(train_path, epochs=2, checkpoint_every=5)
    train(c, tmp_path / "full", progress=False)
    with pytest.raises(_Interrupt):
        train(c, tmp_path / "cut", progress=False, stop_after_steps=12)
    latest = latest_checkpoint(tmp_path / "cut")
    assert latest.name == "step_000000010"
    weights_file = latest / "sae_weights.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:100])  # truncated
    with pytest.warns(UserWarning, match="step_000000010 cannot be read .*sae_weights.safetensors.*trying an older one"):
        resumed = train(c, tmp_path / "cut", progress=False)
    assert resumed.resumed_from.name == "step_000000005"
    wf, wc = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert all(torch.equal(wf[k], wc[k]) for k in wf)


class _RunsCode:
    """Unpickling this calls print: a stand-in for a pickle that runs code."""

    def __reduce__(self):
        return (print, ("this pickle ran code",))


@pytest.mark.parametrize("planted", ["trainer_state.pt", "rng_state.pt"])
def test_a_checkpoint_file_that_would_run_code_is_refused(tmp_path, embeddings, capsys, planted):
    train_path, _, _ = embeddings
    c = cfg(train_path, epochs=1, checkpoint_every=5)
    with pytest.raises(_Interrupt):
        train(c, tmp_path / "r", progress=False, stop_after_steps=6)
    torch.save({"state": _RunsCode()}, latest_checkpoint(tmp_path / "r") / planted)
    with pytest.warns(UserWarning, match=rf"step_000000005 cannot be read \(\S+/step_000000005/{planted}: "
                                         r"UnpicklingError: Weights only load failed"):
        with pytest.raises(CheckpointError, match="no checkpoint can be read"):
            train(c, tmp_path / "r", progress=False)
    assert "this pickle ran code" not in capsys.readouterr().out


def test_one_writer_per_run_folder(tmp_path, embeddings):
    """A run folder another live process holds is refused at once, naming that process; once the
    holder is gone (killed: the kernel drops its lock) the folder is taken over."""
    import subprocess
    import sys
    import textwrap

    from msae_ext.fileio import FolderBusyError

    train_path, _, _ = embeddings
    out = tmp_path / "r"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, sys, time
        f = open({str(out / ".msae.lock")!r}, "a+")
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(f"process {{os.getpid()}} (msae train)"); f.flush()
        print("held", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderBusyError, match=rf"is being written by process {holder.pid} \(msae train\)"):
            train(cfg(train_path, epochs=1), out, progress=False)
        assert not (out / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    assert train(cfg(train_path, epochs=1), out, progress=False).steps == 16


def test_no_resume_cannot_resume_the_old_run(tmp_path, embeddings):
    """A --no-resume run killed before its first checkpoint, then started again, trains its own config
    from the start: the old run's checkpoints were retired first."""
    train_path, _, _ = embeddings
    old, new = cfg(train_path, epochs=2, checkpoint_every=5), cfg(train_path, epochs=2, checkpoint_every=5, seed=7)
    with pytest.raises(_Interrupt):
        train(old, tmp_path / "r", progress=False, stop_after_steps=12)
    assert latest_checkpoint(tmp_path / "r") is not None
    with pytest.raises(_Interrupt):
        train(new, tmp_path / "r", progress=False, resume=False, stop_after_steps=3)
    assert latest_checkpoint(tmp_path / "r") is None
    rerun = train(new, tmp_path / "r", progress=False)
    assert rerun.resumed_from is None
    train(new, tmp_path / "clean", progress=False)
    a, b = weights(tmp_path / "r"), weights(tmp_path / "clean")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_rerunning_a_finished_run_keeps_its_folder(tmp_path, embeddings):
    """Statistics attached after training (`msae stats`) survive the same `msae train` run again."""
    from msae_ext.normalization import attach_stats_to_folder, compute_stats
    from msae_ext.store import open_embeddings

    train_path, eval_path, _ = embeddings
    c = cfg(train_path, eval_path, epochs=1)
    first = trained(c, tmp_path / "r")
    attach_stats_to_folder(tmp_path / "r", "text", compute_stats(open_embeddings(eval_path)))
    before = (tmp_path / "r" / "cfg.json").read_text()
    again = trained(c, tmp_path / "r")
    assert again.steps == first.steps and again.eval_report == json.loads((tmp_path / "r" / "eval.json").read_text())
    assert (tmp_path / "r" / "cfg.json").read_text() == before
    # a run trained afresh into the folder keeps the other modality's statistics too
    trained(c, tmp_path / "r", resume=False)
    metadata = json.loads((tmp_path / "r" / "cfg.json").read_text())["metadata"]
    assert set(metadata["msae_normalization"]) == {"image", "text"}


def test_the_trainer_override_relies_on_sae_lens_calling_train_step():
    """PaperTrainer overrides sae-lens's private `_train_step`: `SAETrainer.step` must hand it the SAE
    and the batch and return what it returns."""
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    calls = []

    class Recording(SAETrainer):
        def _train_step(self, sae, sae_in):
            calls.append((sae, sae_in))
            return "output"

    from sae_lens.config import LoggingConfig, SAETrainerConfig

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=4, d_sae=8, k=2))
    rec = Recording(SAETrainerConfig(total_training_samples=8, train_batch_size_samples=4, lr=1e-3, lr_end=0.0,
                                     device="cpu", logger=LoggingConfig(log_to_wandb=False)), sae, iter(()))
    batch = torch.randn(4, 4)
    assert rec.step(batch) == "output"
    assert calls[0][0] is sae and torch.equal(calls[0][1], batch) and rec.n_training_samples == 4


def test_wandb_offline_needs_no_network(tmp_path, embeddings, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    train_path, eval_path, _ = embeddings
    c = cfg(train_path, eval_path, epochs=1, eval_every=8, wandb={"mode": "offline", "project": "t", "log_every": 4})
    train(c, tmp_path / "w", progress=False)
    runs = list((tmp_path / "w" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_and_evaluation_on_cuda(tmp_path, embeddings):
    from msae_ext.evaluate import evaluate_sae
    from msae_ext.loading import load_sae

    train_path, eval_path, x = embeddings
    r = trained(cfg(train_path, eval_path, epochs=1, device="cuda", eval_every=8), tmp_path / "g")
    labels = (x[2048:, 0] > np.median(x[2048:, 0])).astype(np.int64)
    sae = load_sae(tmp_path / "g", device="cuda")
    report = evaluate_sae(sae, str(eval_path), labels=labels)
    assert report["fvu"] == pytest.approx(r.eval_report["fvu"], rel=1e-4)
    assert 0 <= report["lp_acc"] <= 1
