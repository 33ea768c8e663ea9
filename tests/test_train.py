"""The paper's optimisation step, reproducibility, atomic checkpoints and exact resumption."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from msae_ext.config import TrainConfig, load_config
from msae_ext.store import EmbeddingDataError
from msae_ext.train import (
    _Interrupt,
    latest_checkpoint,
    lr_lambda,
    paper_optimizer,
    remove_parallel_decoder_grad,
    train,
)


def cfg(train_path, eval_path=None, **kw):
    base = dict(train_data=str(train_path), eval_data=str(eval_path) if eval_path else None, expansion_factor=4,
                k_min=4, k=4, batch_size=128, epochs=3, eval_every=0, checkpoint_every=5, eval_rows=300)
    base.update(kw)
    return TrainConfig(**base)


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
    c = load_config(p, ["k=128", "wandb.project=x", "k_list=[8, 16]", "soft_cap=null"])
    assert (c.architecture, c.k, c.wandb.mode, c.wandb.project, c.k_list, c.soft_cap) == (
        "topk", 128, "offline", "x", [8, 16], None)
    assert c.learning_rate == 5e-4  # the paper's TopK lr
    with pytest.raises(ValueError, match="unknown config key"):
        load_config(None, ["learning_rate=1"])
    with pytest.raises(ValueError, match="unknown architecture"):
        load_config(None, ["architecture=gated"])


@pytest.mark.parametrize("arch", ["msae", "topk", "batchtopk", "relu"])
def test_training_step_keeps_unit_decoder_and_is_reproducible(tmp_path, embeddings, arch):
    train_path, eval_path, _ = embeddings
    c = cfg(train_path, eval_path, architecture=arch, epochs=1, soft_cap=5.0 if arch == "msae" else None)
    a = train(c, tmp_path / "a", progress=False)
    train(c, tmp_path / "b", progress=False)
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # same seed, same weights
    norms = wa["W_dec"].norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    assert a.steps == 2048 // 128
    other = train(cfg(train_path, architecture=arch, epochs=1, seed=7), tmp_path / "c", progress=False)
    assert not torch.equal(weights(tmp_path / "c")["W_dec"], wa["W_dec"])
    assert other.eval_report is None
    report = a.eval_report
    assert report["n_samples"] == 552 and 0 <= report["fvu"] and report["dead_neurons"] >= 0


def test_training_reduces_loss(tmp_path, embeddings):
    train_path, eval_path, _ = embeddings
    r = train(cfg(train_path, eval_path, epochs=6, lr=3e-3, eval_every=16), tmp_path / "r", progress=False)
    evals = [json.loads(l) for l in (tmp_path / "r" / "training_log.jsonl").read_text().splitlines()]
    fvus = [e["fvu"] for e in evals if e["event"] == "eval"]
    assert len(fvus) == 6 and fvus[-1] < 0.5 * fvus[0]
    assert any(e["event"] == "epoch_end" and "dead_latents_epoch" in e for e in evals)
    assert r.eval_report["fvu"] == pytest.approx(fvus[-1], rel=0.3)


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


def test_bad_training_data_fails_before_training(tmp_path, embeddings):
    train_path, _, x = embeddings
    bad = x[:512].copy()
    bad[[3, 9]] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(EmbeddingDataError, match=r"2 row\(s\).*first is row 3"):
        train(cfg(tmp_path / "nan.npy"), tmp_path / "o", progress=False)
    np.save(tmp_path / "wide.npy", np.zeros((300, 17), np.float32))
    with pytest.raises(EmbeddingDataError, match="dimension 17, the SAE expects d_in=16"):
        train(cfg(train_path, tmp_path / "wide.npy"), tmp_path / "o2", progress=False)


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
    from msae_ext.evaluate import evaluate_sae, load_sae

    train_path, eval_path, x = embeddings
    r = train(cfg(train_path, eval_path, epochs=1, device="cuda", eval_every=8), tmp_path / "g", progress=False)
    labels = (x[2048:, 0] > np.median(x[2048:, 0])).astype(np.int64)
    sae = load_sae(tmp_path / "g", device="cuda")
    report = evaluate_sae(sae, str(eval_path), labels=labels)
    assert report["fvu"] == pytest.approx(r.eval_report["fvu"], rel=1e-4)
    assert 0 <= report["lp_acc"] <= 1
