"""The MSAE loss as training runs it (nested_topk.nested_topk_loss) against the per-level reference:
the loss, every level loss, the output and every parameter gradient, in each decode form."""

from __future__ import annotations

import pytest
import torch
from sae_lens.saes.sae import TrainStepInput

from msae_ext.architectures import MSAETrainingSAE, MSAETrainingSAEConfig, nested_topk
from msae_ext.architectures.nested_topk import max_positive, select

RTOL = 1e-5

#: nested_topk.GATHER_FRACTION on the CPU: every rank segment by GEMM, every one gathered, or the
#: default (at d_sae = 128 the segments narrower than 6.4 gathered, the others by GEMM)
DECODES = {"dense": 0.0, "gathered": float("inf"), "default": nested_topk.GATHER_FRACTION["cpu"]}


@pytest.fixture(params=sorted(DECODES))
def decode(request, monkeypatch):
    monkeypatch.setitem(nested_topk.GATHER_FRACTION, "cpu", DECODES[request.param])
    return request.param


def _pair(d_in, d_sae, seed=0, **cfg):
    """Two identical SAEs, one per implementation, moved off the initialisation (so levels differ)."""
    saes = []
    for impl in ("fused", "reference"):
        torch.manual_seed(seed)
        sae = MSAETrainingSAE(MSAETrainingSAEConfig(d_in=d_in, d_sae=d_sae, nested_impl=impl, **cfg))
        with torch.no_grad():
            sae.b_enc.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed))
            sae.b_dec.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed + 1))
        saes.append(sae)
    return saes


def _step(sae, x):
    out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=None,
                                                   n_training_steps=0, is_logging_step=False))
    out.loss.backward()
    return out


def _rel(a, b):
    return float((a.detach() - b.detach()).norm() / b.detach().norm().clamp_min(1e-30))


def _check_same(fast, ref, x):
    got, want = _step(fast, x), _step(ref, x)
    assert _rel(got.loss, want.loss) < RTOL
    assert got.losses.keys() == want.losses.keys()
    for key in want.losses:
        assert _rel(got.losses[key], want.losses[key]) < RTOL, key
    assert _rel(got.sae_out, want.sae_out) < RTOL
    assert torch.equal(got.feature_acts, want.feature_acts)
    for (name, pf), (_, pr) in zip(fast.named_parameters(), ref.named_parameters()):
        assert pr.grad is not None and pr.grad.norm() > 0, name
        assert _rel(pf.grad, pr.grad) < RTOL, (name, _rel(pf.grad, pr.grad))


CASES = {
    "rw": dict(k_list=[4, 8, 16, 32, 64, 128]),
    "explicit_alphas": dict(k_list=[3, 10, 40, 128], alphas=[0.5, 0.0, 2.0, 1.0]),
    "soft_cap": dict(k_list=[4, 16, 64, 128], soft_cap=0.7),
    "nmse_and_alpha_sum": dict(k_min=8, weighting="uw", recon_loss="nmse", normalize_by_alpha_sum=True),
    "single_partial_level": dict(k_list=[16]),
    "single_full_level": dict(k_list=[128]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_the_reference(case, decode):
    fast, ref = _pair(24, 128, **CASES[case])
    x = torch.randn(96, 24, generator=torch.Generator().manual_seed(3))
    _check_same(fast, ref, x)


def test_ties_in_pre_activations(decode):
    """Duplicated encoder columns: exactly tied pre-activations with different decoder rows, on both
    sides of level boundaries. Both forms share one selection, so they break ties alike."""
    fast, ref = _pair(16, 64, k_list=[2, 5, 8, 20, 64])
    with torch.no_grad():
        for sae in (fast, ref):
            sae.W_enc[:, 32:] = sae.W_enc[:, :32]
            sae.b_enc[32:] = sae.b_enc[:32]
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(1)).round()
    pre = fast.hidden_pre(x)
    assert (pre[:, 32:] == pre[:, :32]).all()
    _check_same(fast, ref, x)


def test_fewer_positive_pre_activations_than_k(decode):
    """Rows with fewer positives than the smallest k, and rows with none at all."""
    fast, ref = _pair(16, 64, 2, k_list=[8, 16, 32, 64])
    x = torch.randn(80, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        shift = float(torch.quantile(fast.hidden_pre(x).flatten(), 0.9))
        for sae in (fast, ref):
            sae.b_enc.sub_(shift).clamp_(max=-1e-3)  # about a tenth of the pre-activations positive
    x[:5] = fast.b_dec.detach()  # pre = b_enc < 0: no positive pre-activation at all
    n_pos = (fast.hidden_pre(x) > 0).sum(-1)
    assert int(n_pos.min()) == 0 and int(n_pos.max()) > 8 and int((n_pos < 8).sum()) > 10
    _check_same(fast, ref, x)


def test_frozen_decoder(decode):
    """With W_dec frozen the backward skips the decoder's gradient; the encoder's still match."""
    fast, ref = _pair(16, 64, k_list=[4, 8, 16, 64])
    for sae in (fast, ref):
        sae.W_dec.requires_grad_(False)
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(5))
    got, want = _step(fast, x), _step(ref, x)
    assert _rel(got.loss, want.loss) < RTOL and fast.W_dec.grad is None
    for name in ("W_enc", "b_enc", "b_dec"):
        assert _rel(getattr(fast, name).grad, getattr(ref, name).grad) < RTOL, name


def test_selection_is_one_descending_top_k_and_collapses_full_levels():
    pre = torch.tensor([[3.0, -1.0, 2.0, 0.5, -2.0, 1.0], [0.1, -1.0, -2.0, -3.0, -4.0, -5.0]])
    assert max_positive(pre) == 4
    sel = select(pre, [1, 2, 4, 6])
    assert sel.partial == [1, 2]  # at most 4 positives a row: levels 4 and 6 are the full level
    assert sel.indices.tolist() == [[0, 2], [0, 1]]
    assert select(pre, [4, 6]).partial == [] and select(pre, [4, 6]).indices.shape == (2, 0)


def test_nan_reaches_the_loss():
    fast, ref = _pair(16, 64, k_list=[4, 8, 64])
    with torch.no_grad():
        for sae in (fast, ref):
            sae.b_enc[3] = float("nan")
    x = torch.randn(20, 16)
    assert _step(fast, x).loss.isnan() and _step(ref, x).loss.isnan()


def test_bf16_autocast_keeps_losses_and_gradients_float32():
    """Under autocast the GEMMs run in bf16; the loss and the gradients are float32 and close to the
    float32 step's (bf16 rounding, not float32 arithmetic)."""
    fast, ref = _pair(32, 256, k_list=[8, 32, 128, 256])
    x = torch.randn(128, 32, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _step(fast, x)
    want = _step(ref, x)
    assert out.loss.dtype == torch.float32 and fast.W_dec.grad.dtype == torch.float32
    assert 0 < _rel(out.loss, want.loss) < 2e-2
    assert _rel(fast.W_dec.grad, ref.W_dec.grad) < 5e-2


def test_training_forward_pass_compiles_with_one_graph_break():
    """torch.compile traces the step whole but for the one host read of the batch's positive count
    (nested_topk.max_positive); that count must not creep up."""
    fast, _ = _pair(16, 256, k_list=[4, 8, 16, 32, 256])
    x = torch.randn(64, 16)
    step_input = TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=None, n_training_steps=0,
                                is_logging_step=False)
    torch._dynamo.reset()
    try:
        explained = torch._dynamo.explain(fast.training_forward_pass)(step_input)
    finally:
        torch._dynamo.reset()
    assert explained.graph_break_count <= 1, [b.reason for b in explained.break_reasons]


def test_compiled_step_matches_eager(decode):
    """`compile: true`: the compiled forward (aot_eager: dynamo's tracing and autograd's, without
    code generation) gives the eager loss and every gradient, in each decode form."""
    fast, _ = _pair(16, 64, k_list=[4, 8, 16, 64])
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(4))
    step_input = TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=None, n_training_steps=0,
                                is_logging_step=False)
    params = list(fast.parameters())
    eager = fast.training_forward_pass(step_input)
    want = torch.autograd.grad(eager.loss, params)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(fast.training_forward_pass, backend="aot_eager")(step_input)
        got = torch.autograd.grad(compiled.loss, params)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(compiled.loss, eager.loss)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_matches_the_reference_on_cuda_and_under_bf16():
    fast, ref = _pair(32, 256, k_list=[8, 32, 128, 256])
    fast.cuda(), ref.cuda()
    x = torch.randn(512, 32, device="cuda")
    _check_same(fast, ref, x)
    fast.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = _step(fast, x)
    assert out.loss.dtype == torch.float32
    assert _rel(out.loss, _step(ref, x).loss) < 2e-2
