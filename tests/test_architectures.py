"""The paper's SAE family: configs, the nested loss against naive math, inference, registration."""

import json

import pytest
import torch

from msae_ext.architectures import (
    ARCHITECTURES,
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
    JumpReLUTrainingSAE,
    JumpReLUTrainingSAEConfig,
    MSAETrainingSAE,
    MSAETrainingSAEConfig,
    ReLUTrainingSAE,
    ReLUTrainingSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
    resolve_alphas,
    resolve_k_list,
)
from msae_ext.architectures.base import soft_cap
from sae_lens.saes.sae import TrainStepInput


TRAINED = sorted(n for n, a in ARCHITECTURES.items() if a.training_sae is not None)  # classical ones are fitted


def step_input(x):
    return TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=None, n_training_steps=0,
                          is_logging_step=False)


def test_k_list_powers_of_two_then_d_sae():
    assert resolve_k_list(6144, k_min=64) == [64, 128, 256, 512, 1024, 2048, 4096, 6144]
    assert resolve_k_list(4096, k_min=32) == [32, 64, 128, 256, 512, 1024, 2048, 4096]
    assert resolve_k_list(100, k_min=64) == [64, 100]
    assert resolve_k_list(64, k_min=64) == [64]
    assert resolve_k_list(512, k_list=[128, 256]) == [128, 256]
    with pytest.raises(ValueError, match="strictly increasing"):
        resolve_k_list(512, k_list=[256, 128])
    with pytest.raises(ValueError, match="d_sae"):
        resolve_k_list(512, k_list=[128, 1024])


def test_alphas():
    assert resolve_alphas(4, "rw") == [4.0, 3.0, 2.0, 1.0]  # alpha_i = h - i + 1
    assert resolve_alphas(3, "uw") == [1.0, 1.0, 1.0]
    assert resolve_alphas(2, "rw", [0.5, 2]) == [0.5, 2.0]
    with pytest.raises(ValueError, match="2 levels"):
        resolve_alphas(2, "rw", [1, 2, 3])
    with pytest.raises(ValueError, match="weighting"):
        resolve_alphas(2, "xw")


K_ARCHS = ("topk", "batchtopk", "matryoshka", "matryoshka_topk")


def make(arch_cls, cfg_cls, perturb=False, **kw):
    """A seeded 8 -> 32 SAE; `perturb`: its parameters moved off the paper's initialisation (tied
    weights, zero biases), so that every gradient is exercised."""
    torch.manual_seed(0)
    sae = arch_cls(cfg_cls(d_in=8, d_sae=32, **kw))
    if perturb:
        with torch.no_grad():
            for p in sae.parameters():
                p.add_(torch.randn_like(p) * 0.3)
    return sae


def assert_loss_and_grads_equal(loss, ref_loss, params):
    torch.testing.assert_close(loss, ref_loss)
    for g, e in zip(torch.autograd.grad(loss, params, retain_graph=True), torch.autograd.grad(ref_loss, params)):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("name", TRAINED)
def test_paper_initialisation(name):
    sae_cls, cfg_cls = ARCHITECTURES[name].training_sae, ARCHITECTURES[name].training_config
    sae = make(sae_cls, cfg_cls, **({"k": 4} if name in K_ARCHS else {}))
    norms = sae.W_dec.norm(dim=-1)
    torch.testing.assert_close(norms, torch.full_like(norms, 0.1))
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    assert torch.count_nonzero(sae.b_enc) == 0 and torch.count_nonzero(sae.b_dec) == 0


@pytest.mark.parametrize("name", TRAINED)
def test_encoder_gradients_equal_plain_autograd(name):
    """hidden_pre gives b_dec its gradient through the vector -b_dec W_enc (one vector-matrix product);
    every parameter's gradient of a full training loss equals autograd's through (x - b_dec) @ W_enc + b_enc."""
    sae_cls, cfg_cls = ARCHITECTURES[name].training_sae, ARCHITECTURES[name].training_config
    sae = make(sae_cls, cfg_cls, dtype="float64", **({"k": 4} if name in K_ARCHS else {}), perturb=True)
    x = torch.randn(6, 8, dtype=torch.float64)
    params = list(sae.parameters())
    loss = sae.training_forward_pass(step_input(x)).loss
    grads = torch.autograd.grad(loss, params)

    centered = sae.hidden_pre

    def autograd_path(v):
        return (v - sae.b_dec) @ sae.W_enc + sae.b_enc

    sae.hidden_pre = autograd_path
    expected = torch.autograd.grad(sae.training_forward_pass(step_input(x)).loss, params)
    for (pname, _), g, e in zip(sae.named_parameters(), grads, expected):
        torch.testing.assert_close(g, e, msg=lambda m, n=pname: f"{n}: {m}")
    assert grads[[n for n, _ in sae.named_parameters()].index("b_dec")].abs().sum() > 0

    # an input that needs a gradient takes autograd's path and gets it
    dx = {}
    for path in (centered, autograd_path):
        sae.hidden_pre = path
        xg = x.clone().requires_grad_()
        dx[path] = torch.autograd.grad(sae.training_forward_pass(step_input(xg)).loss, xg)[0]
    torch.testing.assert_close(dx[centered], dx[autograd_path])


def test_encoder_gradients_under_autocast():
    """Under bf16 autocast the encoder GEMMs run in bf16 in forward and backward, as autograd's
    would; b_dec's gradient (summed first, float32) is at least as close to the float32 one."""
    sae = make(ReLUTrainingSAE, ReLUTrainingSAEConfig, perturb=True)
    x = torch.randn(64, 8)
    params = list(sae.parameters())
    ref = torch.autograd.grad(sae.training_forward_pass(step_input(x)).loss, params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sae.training_forward_pass(step_input(x))
        pre = sae.hidden_pre(x)
    assert pre.dtype == torch.float32  # the bf16 GEMM plus the float32 bias, as before
    got = torch.autograd.grad(out.loss, params)
    for (pname, _), g, r in zip(sae.named_parameters(), got, ref):
        assert g.dtype == r.dtype
        assert (g - r).norm() <= 0.05 * r.norm(), pname


def naive_msae_loss(x, W_enc, b_enc, W_dec, b_dec, k_list, alphas, cap=None, nmse=False, norm_alpha=False):
    """Per-sample, per-level loop straight from eq. 2 of the paper."""
    total = 0.0
    for a, k in zip(alphas, k_list):
        level = 0.0
        for row in x:
            pre = (row - b_dec) @ W_enc + b_enc
            z = torch.zeros_like(pre)
            idx = torch.argsort(pre, descending=True, stable=True)[:k]
            z[idx] = pre[idx].clamp_min(0)
            if cap is not None:
                z = cap * torch.tanh(z / cap)
            err = ((z @ W_dec + b_dec - row) ** 2).sum()
            level = level + (err / (row**2).sum() if nmse else err)
        total = total + a * level / len(x)
    return total / sum(alphas) if norm_alpha else total


@pytest.mark.parametrize("kw", [
    dict(weighting="rw", k_min=4),
    dict(weighting="uw", k_min=4),
    dict(alphas=[3.0, 0.5, 1.0], k_list=[2, 5, 32]),
    dict(k_list=[7]),
    dict(weighting="rw", k_min=4, soft_cap=0.7),
    dict(weighting="rw", k_min=4, recon_loss="nmse", normalize_by_alpha_sum=True),
])
def test_msae_loss_matches_naive_math(kw):
    sae = make(MSAETrainingSAE, MSAETrainingSAEConfig, dtype="float64", **kw, perturb=True)
    x = torch.randn(6, 8, dtype=torch.float64)
    out = sae.training_forward_pass(step_input(x))
    expected = naive_msae_loss(
        x, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, sae.cfg.k_list, sae.cfg.alphas,
        cap=kw.get("soft_cap"), nmse=kw.get("recon_loss") == "nmse", norm_alpha=kw.get("normalize_by_alpha_sum", False),
    )
    torch.testing.assert_close(out.loss, expected)
    grads = torch.autograd.grad(out.loss, list(sae.parameters()))
    sae.zero_grad()
    params = list(sae.parameters())
    exp_grads = torch.autograd.grad(
        naive_msae_loss(x, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, sae.cfg.k_list, sae.cfg.alphas,
                        cap=kw.get("soft_cap"), nmse=kw.get("recon_loss") == "nmse",
                        norm_alpha=kw.get("normalize_by_alpha_sum", False)), params)
    for g, e in zip(grads, exp_grads):
        torch.testing.assert_close(g, e)


def test_msae_levels_are_nested_and_last_is_relu():
    """The reference's level activations from the shared selection: nested supports, each level's
    top-k (or every positive entry, with fewer), the last level the ReLU."""
    from msae_ext.architectures.nested_topk import select

    pre = torch.randn(5, 32)
    pre[0, :30] = -1.0  # two positives: every level of row 0 keeps just those
    k_list = [2, 4, 8, 32]
    sel = select(pre, k_list)
    levels = [torch.zeros_like(pre).scatter(1, sel.indices[:, :k], pre.gather(1, sel.indices[:, :k]).relu())
              if k in sel.partial else pre.relu() for k in k_list]
    for small, big in zip(levels, levels[1:]):
        assert torch.all((small != 0) <= (big != 0))  # support of z_i inside support of z_{i+1}
    for z, k in zip(levels, k_list):
        expected = torch.stack([torch.zeros(32).scatter(0, row.topk(k).indices, row.topk(k).values.relu()) for row in pre])
        torch.testing.assert_close(z, expected)
    assert torch.equal(levels[0][0], pre[0].relu())


def test_soft_cap_bounds_and_identity():
    z = torch.tensor([0.0, 0.5, 10.0, 1e4])
    capped = soft_cap(z, 2.0)
    assert torch.all(capped <= 2.0) and torch.all(capped >= 0)  # [0, c); float32 tanh saturates at c
    torch.testing.assert_close(capped, 2.0 * torch.tanh(z / 2.0))
    assert soft_cap(z, None) is z
    with pytest.raises(ValueError, match="soft_cap"):
        MSAETrainingSAEConfig(d_in=4, d_sae=8, soft_cap=0.0)


def test_relu_l1_is_the_papers_form():
    sae = make(ReLUTrainingSAE, ReLUTrainingSAEConfig, l1_coefficient=0.5, dtype="float64")
    x = torch.randn(4, 8, dtype=torch.float64)
    out = sae.training_forward_pass(step_input(x))
    z = out.feature_acts
    expected_l1 = 0.5 * torch.mean(z.abs().sum(-1) / x.norm(dim=-1))
    torch.testing.assert_close(out.losses["l1_loss"], expected_l1)
    torch.testing.assert_close(out.loss, ((out.sae_out - x) ** 2).sum(-1).mean() + expected_l1)


def test_topk_and_batchtopk_training_activations():
    topk = make(TopKTrainingSAE, TopKTrainingSAEConfig, k=3)
    x = torch.randn(10, 8)
    z, _ = topk.encode_with_hidden_pre(x)
    assert int((z != 0).sum(-1).max()) <= 3
    btk = make(BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, k=3)
    z, pre = btk.encode_with_hidden_pre(x)
    assert int((z != 0).sum()) <= 30
    out = btk.training_forward_pass(step_input(x))
    kept = out.feature_acts[out.feature_acts > 0]
    # EMA from 0 with lr 0.01 after one step
    torch.testing.assert_close(btk.topk_threshold.float(), 0.01 * kept.min())


@pytest.mark.parametrize("name", TRAINED)
def test_save_load_round_trip_bit_for_bit(tmp_path, name):
    from sae_lens import SAE

    sae_cls, cfg_cls = ARCHITECTURES[name].training_sae, ARCHITECTURES[name].training_config
    kw = {"k": 4} if name in K_ARCHS else {}
    sae = make(sae_cls, cfg_cls, soft_cap=3.0, **kw)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn_like(p))
    sae.cfg.metadata.note = "kept"
    sae.save_inference_model(tmp_path)
    loaded = SAE.load_from_disk(tmp_path)
    assert loaded.cfg.architecture() == ARCHITECTURES[name].sae_lens_name
    assert loaded.cfg.soft_cap == 3.0 and loaded.cfg.metadata.note == "kept"
    for key in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(getattr(loaded, key), getattr(sae, key))
    x = torch.randn(7, 8)
    # paper protocol: ReLU only, soft-capped
    expected = soft_cap(((x - sae.b_dec) @ sae.W_enc + sae.b_enc).relu(), 3.0)
    torch.testing.assert_close(loaded.encode(x), expected)
    json.loads((tmp_path / "cfg.json").read_text())


def test_inference_top_k_at_any_granularity(tmp_path):
    from sae_lens import SAE

    sae = make(MSAETrainingSAE, MSAETrainingSAEConfig, k_min=4)
    with torch.no_grad():
        sae.b_enc.add_(1.0)
    sae.save_inference_model(tmp_path)
    loaded = SAE.load_from_disk(tmp_path)
    x = torch.randn(5, 8)
    assert int((loaded.encode(x) != 0).sum(-1).min()) > 5
    assert int((loaded.encode(x, k=5) != 0).sum(-1).max()) == 5
    loaded.cfg.inference_k = 3
    z3 = loaded.encode(x)
    assert int((z3 != 0).sum(-1).max()) == 3
    pre = (x - loaded.b_dec) @ loaded.W_enc + loaded.b_enc
    torch.testing.assert_close(z3.sum(-1), pre.topk(3).values.relu().sum(-1))


def test_native_protocols(tmp_path):
    from sae_lens import SAE

    topk = make(TopKTrainingSAE, TopKTrainingSAEConfig, k=2)
    with torch.no_grad():
        topk.b_enc.add_(1.0)
    topk.save_inference_model(tmp_path / "t")
    t = SAE.load_from_disk(tmp_path / "t")
    x = torch.randn(5, 8)
    assert int((t.encode(x) != 0).sum(-1).min()) > 2  # paper protocol: top-k removed
    t.set_protocol("native")
    assert int((t.encode(x) != 0).sum(-1).max()) == 2
    t.set_protocol("paper")
    assert t.cfg.inference_k is None

    btk = make(BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, k=2)
    btk.topk_threshold.fill_(0.05)
    btk.save_inference_model(tmp_path / "b")
    b = SAE.load_from_disk(tmp_path / "b")
    assert b.cfg.threshold == pytest.approx(0.05)
    pre = (x - b.b_dec) @ b.W_enc + b.b_enc
    b.set_protocol("native")
    torch.testing.assert_close(b.encode(x), pre * (pre > 0.05))
    assert "topk_threshold" not in __import__("safetensors.torch", fromlist=["load_file"]).load_file(
        tmp_path / "b" / "sae_weights.safetensors")


def test_jumprelu_l0_loss_and_threshold_gradient(tmp_path):
    """The L0 term counts pre-activations above each latent's threshold; its straight-through
    gradient reaches the threshold through sae-lens's rectangle kernel; after saving, the native
    protocol gates at the learned thresholds and the paper's is ReLU only."""
    from sae_lens import SAE

    sae = make(JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig, l0_coefficient=0.5, jumprelu_bandwidth=0.4,
               dtype="float64")
    with torch.no_grad():
        sae.W_enc.mul_(20)
        sae.threshold.copy_(torch.rand(32) * 0.5)
    x = torch.randn(64, 8, dtype=torch.float64)
    inp = TrainStepInput(sae_in=x, coefficients={"l0": 0.5}, dead_neuron_mask=None, n_training_steps=0,
                         is_logging_step=False)
    out = sae.training_forward_pass(inp)
    h, theta = out.hidden_pre.detach(), sae.threshold.detach().double()
    torch.testing.assert_close(out.feature_acts, h * (h > theta))
    torch.testing.assert_close(out.losses["l0_loss"], 0.5 * (h > theta).double().sum(-1).mean())
    sae.threshold.grad = None
    out.losses["l0_loss"].backward()
    inside = ((h - theta) / 0.4).abs() < 0.5  # d/dtheta of the step: -(1/bandwidth) rect((h - theta) / bandwidth)
    torch.testing.assert_close(sae.threshold.grad.double(), 0.5 * (-(1 / 0.4) * inside.double()).mean(0))
    assert sae.threshold.grad.abs().sum() > 0

    sae.save_inference_model(tmp_path)
    loaded = SAE.load_from_disk(tmp_path)
    assert type(loaded).__name__ == "JumpReLUPaperSAE" and torch.equal(loaded.threshold, sae.threshold.float())
    xf = torch.randn(9, 8)
    pre = (xf - loaded.b_dec) @ loaded.W_enc + loaded.b_enc
    torch.testing.assert_close(loaded.encode(xf), pre.relu())
    loaded.set_protocol("native")
    torch.testing.assert_close(loaded.encode(xf), (pre * (pre > loaded.threshold)).relu())
    loaded.set_protocol("paper")
    assert loaded.cfg.use_threshold is False


def test_jumprelu_l0_follows_its_coefficient(tmp_path, embeddings):
    """Through the runner, in one data pass: a larger l0_coefficient gives a smaller native L0."""
    from msae_ext import load_config, train_many
    from msae_ext.evaluate import evaluate_sae
    from msae_ext.loading import load_sae

    train_path, eval_path, _ = embeddings
    cfg = load_config(None, ["architecture=jumprelu", "d_sae=64", "epochs=12", "batch_size=128", "lr=0.003",
                             f"train_data={train_path}", "saes=[{name: l0, l0_coefficient: 0.0}, "
                             "{name: l3, l0_coefficient: 0.3}]"])
    train_many(cfg, tmp_path, progress=False)
    l0 = {}
    for name in ("l0", "l3"):
        l0[name] = evaluate_sae(load_sae(tmp_path / name), str(eval_path), protocol="native")["l0_active"]
    assert l0["l3"] < 0.8 * l0["l0"], l0


def test_matryoshka_prefix_loss_equals_one_decode_per_prefix():
    """The running prefix decode against a dense decode of each masked prefix: loss and every
    parameter's gradient, float64; and the prefixes it refuses."""
    from msae_ext.architectures.matryoshka import MatryoshkaTrainingSAE, MatryoshkaTrainingSAEConfig, reference_loss

    for recon in ("mse", "nmse"):
        sae = make(MatryoshkaTrainingSAE, MatryoshkaTrainingSAEConfig, k=4, dtype="float64", recon_loss=recon,
                   perturb=True)
        assert sae.cfg.prefixes == [2, 4, 8, 16, 32]
        x = torch.randn(6, 8, dtype=torch.float64)
        out = sae.training_forward_pass(step_input(x))
        assert set(out.losses) >= {"recon_loss", "recon_loss_2", "recon_loss_16"}
        assert_loss_and_grads_equal(out.loss, reference_loss(sae, x), list(sae.parameters()))
    with pytest.raises(ValueError, match="prefixes must increase strictly"):
        MatryoshkaTrainingSAEConfig(d_in=8, d_sae=32, k=4, prefixes=[8, 4, 32])
    with pytest.raises(ValueError, match="to d_sae=32"):
        MatryoshkaTrainingSAEConfig(d_in=8, d_sae=32, k=4, prefixes=[8, 16])


def test_matryoshka_topk_loss_equals_one_decode_per_level(monkeypatch):
    """Prefix levels (running decode) and k levels (one sort, rank segments gathered or multiplied)
    against a dense decode of each level: loss and every parameter's gradient, float64; and the
    options it refuses."""
    from msae_ext.architectures import nested_topk
    from msae_ext.architectures.matryoshka_topk import (
        MatryoshkaTopKTrainingSAE,
        MatryoshkaTopKTrainingSAEConfig,
        reference_loss,
    )

    for recon, levels, weight, gather, reselect in (("mse", [1, 3], 1.0, 0.0, False), ("nmse", [2], 0.5, 1.0, False),
                                                    ("mse", [], 2.0, 0.0, True), ("mse", [2], 1.0, 1.0, True)):
        monkeypatch.setitem(nested_topk.GATHER_FRACTION, "cpu", gather)  # k-level segments by GEMM, or gathered
        sae = make(MatryoshkaTopKTrainingSAE, MatryoshkaTopKTrainingSAEConfig, k=6, k_levels=levels, perturb=True,
                   inner_weight=weight, reselect=reselect, prefixes=[2, 16, 32], dtype="float64", recon_loss=recon)
        x = torch.randn(7, 8, dtype=torch.float64)
        out = sae.training_forward_pass(step_input(x))
        assert {f"k_{k}" for k in levels} | {"prefix_2", "prefix_16"} <= set(out.losses)
        assert int((out.feature_acts > 0).sum(-1).max()) <= 6
        assert_loss_and_grads_equal(out.loss, reference_loss(sae, x), list(sae.parameters()))
    with pytest.raises(ValueError, match="k_levels must increase strictly from 1 to below k=4"):
        MatryoshkaTopKTrainingSAEConfig(d_in=8, d_sae=32, k=4, k_levels=[2, 4])
    with pytest.raises(ValueError, match="prefixes must increase strictly"):
        MatryoshkaTopKTrainingSAEConfig(d_in=8, d_sae=32, k=4, prefixes=[16, 8, 32])
