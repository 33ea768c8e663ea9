"""The fused MSAE step against the per-level reference: loss, level losses, outputs, every gradient."""

from __future__ import annotations

import pytest
import torch
from sae_lens.saes.sae import TrainStepInput

from msae_ext.architectures import MSAETrainingSAE, MSAETrainingSAEConfig
from msae_ext.architectures import cpu_kernels, nested_topk
from msae_ext.architectures.nested_topk import (
    DenseSegments,
    GatheredSegments,
    nested_selection,
)

RTOL = 1e-5

#: DENSE_DECODE_FRACTION for this device: every segment gathered, every one dense, or a mix
DECODE_MODES = {"gather": float("inf"), "dense": 0.0, "mixed": 1 / 8}


@pytest.fixture(params=[*sorted(DECODE_MODES), "gather-pytorch"])
def decode_mode(request, monkeypatch):
    """Each decode mode; gathered segments by the compiled CPU kernels (where they build) and,
    in "gather-pytorch", by the PyTorch path."""
    mode = request.param.removesuffix("-pytorch")
    monkeypatch.setitem(nested_topk.DENSE_DECODE_FRACTION, ("cpu", False), DECODE_MODES[mode])
    if request.param.endswith("-pytorch"):
        monkeypatch.setenv("MSAE_CPU_KERNELS", "0")
    return mode


@pytest.fixture(params=["segments", "tail", "gathered"])
def layout(request, monkeypatch):
    """Each layout of the largest partial level and the full level, forced wherever it applies
    (`nested_topk.LAYOUT`; the default "auto" picks the cheapest): level K from its own rank
    segment, level K as the full level minus its tail, or the full level gathered as level K plus
    its tail."""
    monkeypatch.setattr(nested_topk, "LAYOUT", request.param)
    return request.param


def _pair(d_in, d_sae, seed, **cfg):
    """Two identical SAEs, one per implementation."""
    saes = []
    for impl in ("fused", "reference"):
        torch.manual_seed(seed)
        saes.append(MSAETrainingSAE(MSAETrainingSAEConfig(d_in=d_in, d_sae=d_sae, nested_impl=impl, **cfg)))
    return saes


def _step(sae, x):
    out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=None,
                                                   n_training_steps=0, is_logging_step=False))
    out.loss.backward()
    return out


def _rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _check_same(fused, ref, x):
    of, orf = _step(fused, x), _step(ref, x)
    assert _rel(of.loss, orf.loss) < RTOL
    for key in orf.losses:
        assert _rel(of.losses[key], orf.losses[key]) < RTOL, key
    assert _rel(of.sae_out, orf.sae_out) < RTOL
    for (name, pf), (_, pr) in zip(fused.named_parameters(), ref.named_parameters()):
        assert pr.grad is not None and pr.grad.norm() > 0, name
        assert _rel(pf.grad, pr.grad) < RTOL, (name, _rel(pf.grad, pr.grad))


CASES = {
    "default_rw": dict(k_list=[4, 8, 16, 32, 64, 128]),
    "k_min_levels": dict(k_min=8),
    "uw": dict(k_min=16, weighting="uw"),
    "explicit_alphas": dict(k_list=[3, 10, 40, 128], alphas=[0.5, 0.0, 2.0, 1.0]),
    "soft_cap": dict(k_list=[4, 16, 64, 128], soft_cap=0.7),
    "nmse": dict(k_list=[4, 16, 64, 128], recon_loss="nmse"),
    "alpha_sum": dict(k_list=[4, 16, 64, 128], normalize_by_alpha_sum=True),
    "one_level_partial": dict(k_list=[16]),
    "one_level_full": dict(k_list=[128]),
    "no_full_level": dict(k_list=[8, 24, 100]),
    "everything": dict(k_list=[5, 17, 50, 128], alphas=[3.0, 1.0, 0.5, 2.0], soft_cap=1.3,
                       recon_loss="nmse", normalize_by_alpha_sum=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_fused_matches_reference(case, seed, decode_mode, layout):
    fused, ref = _pair(24, 128, seed, **CASES[case])
    torch.manual_seed(100 + seed)
    with torch.no_grad():  # trained-like encoder, not W_dec^T, so that levels differ
        for sae in (fused, ref):
            sae.b_enc.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed))
            sae.b_dec.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed + 7))
    x = torch.randn(96, 24, generator=torch.Generator().manual_seed(seed + 3))
    sel = nested_selection(fused.hidden_pre(x), fused.cfg.k_list, tail_if_narrower_than=float("inf"))
    if fused.cfg.k_list[0] < 128:
        assert sel.partial and sel.partial[0] == fused.cfg.k_list[0]  # the sorted path is exercised
    # a forced layout is taken wherever it applies: some level is the full one and (for the tail)
    # the top segment is gathered
    full_needed = len(sel.partial) < len(fused.cfg.k_list)
    if layout == "tail" and sel.partial and full_needed and decode_mode == "gather":
        assert sel.tail_end > sel.partial[-1] and not sel.full_gathered
    if layout == "gathered" and full_needed:
        assert sel.full_gathered and sel.tail_end == int(sel.n_pos.max())
        assert sel.indices.shape[1] == sel.tail_end
    if layout == "segments":
        assert sel.tail_end == 0
    _check_same(fused, ref, x)


def test_ties_in_pre_activations(decode_mode, layout):
    """Duplicated encoder columns give exactly tied pre-activations with different decoder rows."""
    fused, ref = _pair(16, 64, 0, k_list=[2, 5, 8, 20, 64])
    with torch.no_grad():
        for sae in (fused, ref):
            sae.W_enc[:, 32:] = sae.W_enc[:, :32]
            sae.b_enc.zero_()
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(1)).round()  # more ties
    pre = fused.hidden_pre(x)
    assert (pre[:, 32:] == pre[:, :32]).all()
    _check_same(fused, ref, x)


def test_fewer_positive_pre_activations_than_k(decode_mode, layout):
    """Rows with fewer positives than the smallest k, and rows with none at all."""
    fused, ref = _pair(16, 64, 2, k_list=[8, 16, 32, 64])
    x = torch.randn(80, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        shift = float(torch.quantile(fused.hidden_pre(x).flatten(), 0.9))
        for sae in (fused, ref):
            sae.b_enc.fill_(-shift)
    x[:5] = 0.0  # no positive pre-activation at all
    n_pos = (fused.hidden_pre(x) > 0).sum(-1)
    assert int(n_pos.min()) == 0 and int(n_pos.max()) > 8 and int((n_pos < 8).sum()) > 10
    _check_same(fused, ref, x)


@pytest.mark.parametrize("layout_mode", ["auto", "gathered"])
def test_nan_pre_activation_gives_a_nan_loss_in_every_layout(layout_mode, monkeypatch):
    """A NaN pre-activation reaches the loss as the reference's does: the ranking's counts do not
    see a NaN, so the full level is not gathered then, and its GEMM propagates it."""
    monkeypatch.setattr(nested_topk, "LAYOUT", layout_mode)
    fused, ref = _pair(16, 64, 0, k_list=[4, 8, 64])
    x = torch.randn(20, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for sae in (fused, ref):
            sae.b_enc[3] = float("nan")
    sel = nested_selection(fused.hidden_pre(x), fused.cfg.k_list, gemm_entries=float("inf"))
    assert not sel.full_gathered
    assert _step(fused, x).loss.isnan() and _step(ref, x).loss.isnan()


@pytest.mark.parametrize("layout_mode", ["segments", "tail", "gathered"])
def test_gathered_chain_takes_a_run_that_is_the_whole_chain(layout_mode, monkeypatch):
    """With the compiled kernels, the levels' reconstructions and errors come from `GatheredChain`
    where one gathered run is the whole chain of levels (segments; gathered), and from per-level
    ops where level K is the full level minus its tail; loss and gradients match the reference
    either way. Without the kernels the chain is not used."""
    if cpu_kernels.segment_kernels() is None:
        pytest.skip("the compiled CPU kernels are off or not buildable here")
    monkeypatch.setitem(nested_topk.DENSE_DECODE_FRACTION, ("cpu", False), float("inf"))
    monkeypatch.setattr(nested_topk, "LAYOUT", layout_mode)
    calls = []
    apply = nested_topk.GatheredChain.apply
    monkeypatch.setattr(nested_topk.GatheredChain, "apply", lambda *args: calls.append(1) or apply(*args))
    fused, ref = _pair(24, 128, 0, k_list=[4, 8, 16, 32, 128], recon_loss="nmse")
    with torch.no_grad():
        for sae in (fused, ref):
            sae.b_enc.fill_(-0.05)  # a few more positives than 32 a row: the tail is narrower than [16, 32)
    x = torch.randn(64, 24, generator=torch.Generator().manual_seed(5))
    _check_same(fused, ref, x)
    assert len(calls) == (layout_mode != "tail")
    # sae_out, which the trainer holds through the backward, is not a view keeping every level alive
    assert _step(fused, x).sae_out._base is None
    monkeypatch.setenv("MSAE_CPU_KERNELS", "0")
    fused.zero_grad(), ref.zero_grad()
    _check_same(fused, ref, x)
    assert len(calls) == 2 * (layout_mode != "tail")  # the extra step above, then none


def test_auto_layout_gathers_the_full_level_when_its_gemms_cost_more():
    """"auto" compares costs in gathered entries: with the GEMMs worth more than a row's positives
    past the largest partial level, the full level is gathered; worth nothing, it is not."""
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(40, 256, generator=g) - 1.0  # about 16 % positive: about 41 a row
    n_max = int((pre > 0).sum(-1).max())
    k_list = [4, 16, 256]
    cheap = nested_selection(pre, k_list, tail_if_narrower_than=float("inf"), gemm_entries=256.0)
    assert cheap.full_gathered and cheap.tail_end == n_max and cheap.partial == [4, 16]
    never = nested_selection(pre, k_list, tail_if_narrower_than=float("inf"), gemm_entries=0.0)
    assert not never.full_gathered
    one_level = nested_selection(pre, [256], gemm_entries=256.0)  # no partial level: all positives
    assert one_level.full_gathered and one_level.partial == [] and one_level.indices.shape == (40, n_max)


def test_selection_collapses_levels_at_or_above_the_positive_count():
    pre = torch.tensor([[3.0, -1.0, 2.0, 0.5, -2.0, 1.0], [0.1, -1.0, -2.0, -3.0, -4.0, -5.0]])
    sel = nested_selection(pre, [1, 2, 4, 6])
    assert sel.partial == [1, 2]  # at most 4 positives: level 4 keeps them all
    assert sel.indices[0].tolist() == [0, 2]


@pytest.mark.parametrize("with_full", [True, False], ids=["with_full", "segments_only"])
@pytest.mark.parametrize("dense_dc", [0.0, 1 / 8, float("inf")], ids=["dense", "mixed", "gathered"])
def test_gathered_segments_match_autograd_of_dense_math(dense_dc, with_full, monkeypatch):
    """Values and both gradients of the full decode and a run of rank segments, against dense
    GEMMs on masked copies of z; repeated features across rows (the feature-sorted backward) and
    zero activations included. The activation gradient of every segment by GEMM, of none, or of
    the segments wider than 1/8 of the width (here the ones of width 2 and 3, not 1)."""
    monkeypatch.setattr(nested_topk, "DENSE_SEGMENT_FRACTION", dense_dc)
    monkeypatch.setattr(nested_topk, "_ROW_BLOCK", 3)  # several row blocks for the dense gradient
    monkeypatch.setattr(nested_topk, "_FEATURE_BLOCK", 5)  # several feature blocks for dW
    torch.manual_seed(0)
    B, D, d = 7, 12, 5
    bounds = [0, 2, 3, 6]  # three segments of widths 2, 1, 3
    idx = torch.stack([torch.randperm(D)[:6] for _ in range(B)])  # unique per row, like a sort
    z = torch.rand(B, D, dtype=torch.float64)
    z[1, idx[1, 4:]] = 0.0  # past a row's positives
    z.requires_grad_()
    W = torch.randn(D, d, dtype=torch.float64, requires_grad=True)

    def fused(z, W):
        full, Y = GatheredSegments.apply(z, W, idx, bounds, with_full, None)
        return (full, Y) if with_full else Y

    assert torch.autograd.gradcheck(fused, (z, W))

    def dense(z, W):
        Y = torch.stack([(z * torch.zeros_like(z).scatter(1, idx[:, lo:hi], 1.0)) @ W
                         for lo, hi in zip(bounds[:-1], bounds[1:])], dim=1)
        return (z @ W, Y) if with_full else Y

    got, want = fused(z, W), dense(z, W)
    got, want = (got, want) if with_full else ((got,), (want,))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    upstream = [torch.randn_like(t) for t in want]
    for a, b in zip(torch.autograd.grad(got, (z, W), upstream), torch.autograd.grad(want, (z, W), upstream)):
        torch.testing.assert_close(a, b)


def _dense_case(dtype):
    """z (ReLU'd, so zero past some entries), W, a span of a row-unique ranking and dense ranges in
    it with a gap (another piece's columns)."""
    torch.manual_seed(0)
    B, D, d, w = 6, 30, 4, 14
    idx = torch.stack([torch.randperm(D)[:w] for _ in range(B)])  # unique per row, like a sort
    z = torch.randn(B, D, dtype=dtype).relu()
    W = torch.randn(D, d, dtype=dtype)
    return z, W, idx, [(0, 3), (5, 9), (9, 14)]


def _dense_math(z, W, idx, ranges, with_full):
    """The same outputs by plain autograd: a masked copy of z and a GEMM per segment."""
    Y = torch.stack([torch.zeros_like(z).scatter(1, idx[:, a:b], z.gather(1, idx[:, a:b])) @ W for a, b in ranges], 1)
    return (z @ W if with_full else z.new_empty(0)), Y


@pytest.mark.parametrize("with_full", [True, False])
def test_dense_segments_gradients_match_autograd_of_dense_math(with_full):
    z, W, idx, ranges = _dense_case(torch.float64)
    z.requires_grad_(), W.requires_grad_()
    fn = lambda z, W: DenseSegments.apply(z, W, idx.to(torch.int32), ranges, with_full)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (z, W))
    for got, want in zip(fn(z, W), _dense_math(z, W, idx, ranges, with_full)):
        torch.testing.assert_close(got, want)


def test_dense_segments_under_autocast_equal_float32_buffers_cast_by_autocast():
    """Under autocast each segment's buffer is built in bf16 rather than in float32 and cast by the
    GEMM, and the segments' activation gradients are added into the full level's in place: the
    outputs and z's gradient are bit for bit those of plain autograd over float32 buffers. W's
    gradient is each GEMM's bf16 product summed in float32 (plain autograd sums them in bf16, at
    the one cast of W that autocast caches)."""
    z0, W0, idx, ranges = _dense_case(torch.float32)
    upstream = [torch.randn(6, 4).bfloat16(), torch.randn(6, 3, 4).bfloat16()]
    grads = []
    for fn in (lambda z, W: DenseSegments.apply(z, W, idx, ranges, True),
               lambda z, W: _dense_math(z, W, idx, ranges, True)):
        z, W = z0.clone().requires_grad_(), W0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            full, Y = fn(z, W)
        torch.autograd.backward([full, Y], upstream)
        grads.append((full, Y, z.grad, W.grad))
    (full, Y, dz, dW), (full_r, Y_r, dz_r, dW_r) = grads
    assert Y.dtype == Y_r.dtype == torch.bfloat16
    assert torch.equal(full.bfloat16(), full_r) and torch.equal(Y, Y_r)
    assert torch.equal(dz, dz_r)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        products = [z0.T @ upstream[0]] + [
            torch.zeros_like(z0).scatter(1, idx[:, a:b], z0.gather(1, idx[:, a:b])).T @ upstream[1][:, s]
            for s, (a, b) in enumerate(ranges)]
    assert all(p.dtype == torch.bfloat16 for p in products)
    torch.testing.assert_close(dW, sum(p.float() for p in products), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dW, dW_r, rtol=0.05, atol=0.05)  # the bf16 sum: close, not equal
    past = z0 == 0  # features past a row's positives that a segment holds get a gradient the ReLU stops
    assert bool((dz[past] != 0).any())


@pytest.mark.parametrize("fraction", [0.0, float("inf")], ids=["dense_segments", "gathered_segments"])
def test_gemms_follow_autocast_in_forward_and_backward(fraction, monkeypatch):
    """Under CPU bf16 autocast the GEMMs (the full level's, and the dense segments') run in bf16
    in forward and backward; losses and gradients stay float32 and close to the float32 step."""
    monkeypatch.setitem(nested_topk.DENSE_DECODE_FRACTION, ("cpu", True), fraction)
    fused, ref = _pair(32, 256, 0, k_list=[8, 32, 128, 256])
    x = torch.randn(128, 32, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _step(fused, x)
    ref_out = _step(ref, x)
    assert out.loss.dtype == torch.float32 and fused.W_dec.grad.dtype == torch.float32
    assert 0 < _rel(out.loss, ref_out.loss) < 2e-2  # bf16 rounding, not float32 arithmetic
    assert _rel(fused.W_dec.grad, ref.W_dec.grad) < 5e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.gpu
@pytest.mark.parametrize("mode", sorted(DECODE_MODES))
def test_fused_matches_reference_on_cuda_and_under_bf16_autocast(mode, monkeypatch):
    for autocast in (False, True):
        monkeypatch.setitem(nested_topk.DENSE_DECODE_FRACTION, ("cuda", autocast), DECODE_MODES[mode])
    fused, ref = _pair(32, 256, 0, k_list=[8, 32, 128, 256])
    fused.cuda(), ref.cuda()
    x = torch.randn(512, 32, device="cuda")
    _check_same(fused, ref, x)
    fused.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = fused.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=None,
                                                         n_training_steps=0, is_logging_step=False))
    assert out.loss.dtype == torch.float32
    out.loss.backward()
    assert _rel(out.loss.detach(), _step(ref, x).loss.detach()) < 2e-2


def _compiled_against_eager(seed: int, **compile_kwargs) -> None:
    """One fused MSAE (weights moved off the initialisation) stepped eagerly and through
    torch.compile(**compile_kwargs): the same loss and every parameter gradient."""
    fused, _ = _pair(16, 64, seed, k_list=[4, 8, 16, 64])
    with torch.no_grad():
        for p in fused.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(32, 16)
    step_input = TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=None, n_training_steps=0,
                                is_logging_step=False)
    params = list(fused.parameters())
    eager = fused.training_forward_pass(step_input)
    want = torch.autograd.grad(eager.loss, params)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(fused.training_forward_pass, **compile_kwargs)(step_input)
        got = torch.autograd.grad(compiled.loss, params)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(compiled.loss, eager.loss)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_compiled_step_matches_eager(monkeypatch):
    """`compile: true` wraps the training forward in torch.compile. Dynamo's tracing of our autograd
    functions (CenteredEncode, GatheredSegments, DenseSegments) gives the eager loss and every
    gradient; the aot_eager backend checks the tracing on CPU without inductor's code generation."""
    import warnings

    monkeypatch.setitem(nested_topk.DENSE_DECODE_FRACTION, ("cpu", False), DECODE_MODES["mixed"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the compiled CPU kernels are opaque to dynamo: a graph break
        _compiled_against_eager(0, backend="aot_eager")


@pytest.mark.parametrize("mode", ["dense", "mixed"])
def test_inductor_compiled_step_matches_eager_on_the_gpu_code_path(monkeypatch, mode):
    """`compile: true` with torch.compile's default backend (inductor, which generates C++ here and
    Triton on a GPU) over the PyTorch path, the code a GPU runs: with the compiled CPU kernels off,
    every dense segment and the full level go through DenseSegments (traced into a graph that
    inductor compiles), the narrow ones ("mixed") through GatheredSegments. The step still breaks
    the graph where the selection reads data on the host (the batch's most positives a row, the
    rows with ties at a level boundary). The generated code gives the eager loss and every gradient."""
    monkeypatch.setenv(cpu_kernels.ENV, "0")
    monkeypatch.setitem(nested_topk.DENSE_DECODE_FRACTION, ("cpu", False), DECODE_MODES[mode])
    _compiled_against_eager(3)
