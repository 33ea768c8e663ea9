"""The compiled CPU kernels of the fused MSAE loss (csrc/nested_segments.cpp) against plain math."""

from __future__ import annotations

import shutil

import pytest
import torch

from msae_ext.architectures import cpu_kernels
from msae_ext.architectures.nested_topk import GatheredChain, GatheredSegments, rank_segments


def cpu_kernels_has_avx512() -> bool:
    """Whether this CPU has the AVX-512 subsets the kernels' AVX-512 loops need (F and DQ)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512f" in flags and "avx512dq" in flags


@pytest.fixture(scope="module")
def kernels():
    """The built module. Where a compiler and ninja exist (CI) a failed build is a failure."""
    if not cpu_kernels.enabled():
        pytest.skip(f"{cpu_kernels.ENV}=0")
    module = cpu_kernels.segment_kernels()
    if module is None:
        if shutil.which("c++") and shutil.which("ninja"):
            pytest.fail("a compiler and ninja are here, but the CPU segment kernels did not build")
        pytest.skip("no C++ compiler or ninja: the kernels cannot build here")
    return module


def _case(B, D, d, bounds, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(D, generator=g)[: bounds[-1]] for _ in range(B)]).to(torch.int32)
    z = torch.rand(B, D, generator=g)
    z[0, idx[0, bounds[-1] // 2:].long()] = 0.0  # past a row's positives
    z[1] = 0.0  # no positive at all
    W = torch.randn(D, d, generator=g)
    return z, W, idx


def _dense_segments(z, W, idx, bounds, ends=None):
    """Y[b, s] = (z masked to segment s, columns before ends[b] only) @ W, in float64."""
    z, W = z.double(), W.double()
    if ends is None:
        ends = torch.full((z.shape[0],), idx.shape[1])
    kept = (torch.arange(idx.shape[1])[None, :] < ends[:, None].long()).double()
    masks = [torch.zeros_like(z).scatter(1, idx[:, lo:hi].long(), kept[:, lo:hi])
             for lo, hi in zip(bounds[:-1], bounds[1:])]
    return torch.stack([(z * m) @ W for m in masks], dim=1)


# d = 77: two whole 32-column chunks and a partial one; an empty segment; one segment only;
# 1100 rows: two whole blocks of 512 rows and a partial one (forward, dz), one block of 1024 rows
# and a partial one of a whole tile of 64 rows and a partial tile (dW)
@pytest.mark.parametrize("shape", [(9, 50, 77, [0, 3, 3, 8, 20]), (5, 40, 64, [0, 40]), (3, 16, 5, [0, 1, 2, 4]),
                                   (1100, 40, 40, [0, 2, 9])],
                         ids=["tail_chunk", "one_full_segment", "narrow", "row_blocks"])
@pytest.mark.parametrize("with_ends", [False, True], ids=["all_columns", "row_ends"])
def test_segment_kernels_match_dense_math(kernels, shape, with_ends):
    """With `ends`, each row's columns from ends[b] on are skipped (here they hold activations, so
    that a kernel reading them would fail); ends run from below 0 to past K (clamped)."""
    B, D, d, bounds = shape
    z, W, idx = _case(B, D, d, bounds, seed=d)
    ends = None
    if with_ends:
        ends = torch.randint(-2, bounds[-1] + 3, (B,), generator=torch.Generator().manual_seed(2), dtype=torch.int32)
    got = kernels.segments_forward(z, W, idx, bounds, ends)
    torch.testing.assert_close(got.double(), _dense_segments(z, W, idx, bounds, ends), rtol=1e-5, atol=1e-5)

    zz, WW = z.double().requires_grad_(), W.double().requires_grad_()
    H = torch.randn(B, len(bounds) - 1, d, generator=torch.Generator().manual_seed(1))
    want_dz, want_dW = torch.autograd.grad(_dense_segments(zz, WW, idx, bounds, ends), (zz, WW), H.double())
    dz0, dW0 = torch.randn(B, D), torch.randn(D, d)  # the kernels add into what is there
    dz, dW = dz0.clone(), dW0.clone()
    kernels.segments_backward(z, W, idx, bounds, H, dz, dW, ends)
    torch.testing.assert_close((dz - dz0).double(), want_dz, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close((dW - dW0).double(), want_dW, rtol=1e-5, atol=1e-5)
    only_W = dW0.clone()  # either gradient alone
    kernels.segments_backward(z, W, idx, bounds, H, None, only_W, ends)
    torch.testing.assert_close(only_W, dW)
    fresh = torch.full((B, D), float("nan"))  # overwrite_dz: what is there is ignored, rows written whole
    kernels.segments_backward(z, W, idx, bounds, H, fresh, None, ends, overwrite_dz=True)
    torch.testing.assert_close(fresh.double(), want_dz, rtol=1e-5, atol=1e-5)


def test_decoder_gradient_by_tiles(kernels):
    """The dW pass groups each tile of 64 rows by feature: features repeated in every row of a
    tile, a tile with no entries (ends 0), a tile whose activations are all zero, a partial last
    tile, and rows with fewer entries than columns. Against float64 dense math, and dz too."""
    B, D, d, bounds = 200, 12, 40, [0, 3, 10]  # tiles: rows 0-63, 64-127, 128-191, 192-199
    z, W, idx = _case(B, D, d, bounds, seed=4)
    z[128:192] = 0.0
    ends = torch.randint(0, bounds[-1] + 1, (B,), generator=torch.Generator().manual_seed(3), dtype=torch.int32)
    ends[64:128] = 0
    H = torch.randn(B, len(bounds) - 1, d, generator=torch.Generator().manual_seed(1))
    zz, WW = z.double().requires_grad_(), W.double().requires_grad_()
    want_dz, want_dW = torch.autograd.grad(_dense_segments(zz, WW, idx, bounds, ends), (zz, WW), H.double())
    dW0 = torch.randn(D, d)
    dz, dW = torch.zeros(B, D), dW0.clone()
    kernels.segments_backward(z, W, idx, bounds, H, dz, dW, ends)
    torch.testing.assert_close((dW - dW0).double(), want_dW, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dz.double(), want_dz, rtol=1e-5, atol=1e-5)
    assert bool((want_dW != 0).all())  # every feature's gradient has terms: a dropped tile would show


def test_count_positive_matches_torch(kernels):
    """Counts of positive entries a row (zeros, -0, infinities, subnormals, NaN of either sign not
    counted) and the NaN flag, across row blocks."""
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(70, 333, generator=g)
    pre[0] = 0.0
    pre[1, :5] = torch.tensor([-0.0, float("inf"), -float("inf"), 1e-40, -1e-40])
    n_pos, has_nan = kernels.count_positive(pre)
    assert n_pos.dtype == torch.int32 and not has_nan
    assert torch.equal(n_pos, (pre > 0).sum(-1, dtype=torch.int32))
    for nan in (float("nan"), -float("nan")):
        bad = pre.clone()
        bad[69, 332] = nan
        n_pos, has_nan = kernels.count_positive(bad)
        assert has_nan and torch.equal(n_pos, (bad > 0).sum(-1, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="contiguous 2-d float32"):
        kernels.count_positive(pre.double())


@pytest.mark.parametrize("with_ends", [False, True], ids=["all_columns", "row_ends"])
def test_gathered_segments_with_and_without_kernels_agree(kernels, monkeypatch, with_ends):
    """The autograd function's two CPU paths (kernels, PyTorch): same outputs and gradients, also
    with `ends` where the rows' activations end (the kernels skip the rest, PyTorch adds zeros)."""
    B, D, d, bounds = 33, 300, 72, [0, 4, 8, 16, 40, 41]
    z, W, idx = _case(B, D, d, bounds, seed=3)
    ends = None
    if with_ends:  # _case: row 0's activations end half way, row 1 has none
        ends = torch.full((B,), bounds[-1], dtype=torch.int32)
        ends[0], ends[1] = bounds[-1] // 2, 0
    results = []
    for setting in ("1", "0"):
        monkeypatch.setenv(cpu_kernels.ENV, setting)
        zz, WW = z.clone().requires_grad_(), W.clone().requires_grad_()
        full, Y = GatheredSegments.apply(zz, WW, idx, bounds, True, ends)
        up_full = torch.randn(full.shape, generator=torch.Generator().manual_seed(5))
        up_Y = torch.randn(Y.shape, generator=torch.Generator().manual_seed(6))
        dz, dW = torch.autograd.grad((full, Y), (zz, WW), (up_full, up_Y))
        # past `ends` the kernels leave out the segments' activation gradient: the ReLU that made
        # those zeros stops it, so only the activations' own gradient is compared
        results.append((full, Y, dz * (z > 0) if with_ends else dz, dW))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_select_matches_the_stable_ranking(kernels, monkeypatch):
    """Rank segments from the compiled select and from the PyTorch path (top-k, a stable sort of
    the rows with ties at a boundary) hold the features of a stable descending sort's ranks:
    ties (duplicated values, +-0) inside and across the select's value buckets, rows with fewer
    positives than K, NaN, infinities, subnormal and huge values. A row's positives come first;
    past them (no activation there) any distinct non-positive features may fill the row."""
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(40, 300, generator=g).round(decimals=1)  # many exact ties
    pre[:, 150:] = pre[:, :150]
    pre[0, :] = -1.0  # no positive: non-positive features only
    pre[1, :5] = 0.0
    pre[1, 5:10] = -0.0
    pre[2, 3], pre[2, 9], pre[2, 11] = float("nan"), float("inf"), float("-inf")
    pre[3] = -pre[3].abs()
    pre[3, :4] = 1.0  # four positives, fewer than K
    pre[4, 7] = float("inf")  # the largest value, in a row without NaN (the bucketed select)
    pre[5, :4] = torch.tensor([1e-40, 3e38, 1e-30, 3e38])  # a subnormal and huge values: wide buckets
    pre[6] = pre[6].abs() + 1.0  # all positive, every value of the row in a few buckets
    pre[7, :] = -pre[7, :].abs()
    pre[7, 100:140] = 0.5  # 40 tied positives across three boundaries, fewer than K
    n_pos = (pre > 0).sum(-1)

    def canonical(idx, bounds, past):  # segments as sets (each sorted), columns past a row's positives blanked
        idx = idx.long().masked_fill(past, -1)
        return torch.cat([idx[:, a:b].sort(dim=-1).values for a, b in zip(bounds[:-1], bounds[1:])], 1)

    # K = 200: most rows have fewer positives, and their padding is found over several blocks of features
    for bounds in ([0, 1, 7, 30, 64], [0, 10, 100, 200]):
        K = bounds[-1]
        assert int((n_pos < K).sum()) >= 3  # rows the select pads
        past = (torch.arange(K)[None, :] >= n_pos[:, None]) & ~pre.isnan().any(-1, keepdim=True)
        want = canonical(pre.sort(dim=-1, descending=True, stable=True).indices[:, :K], bounds, past)
        for path in ("1", "0"):  # the compiled select; the PyTorch path (ties at boundaries: a stable sort)
            monkeypatch.setenv(cpu_kernels.ENV, path)
            got = rank_segments(pre, bounds)
            assert got.dtype == torch.int32 and torch.equal(canonical(got, bounds, past), want), (K, path)
            for b in range(pre.shape[0]):  # the padding: distinct, non-positive, none of the row's positives
                pad = got[b][past[b]].long()
                assert pad.unique().numel() == pad.numel() and bool((pre[b, pad] <= 0).all()), (K, path, b)
    monkeypatch.setenv(cpu_kernels.ENV, "1")
    bounds = [0, 1, 7, 30, 64]
    distinct = torch.randn(30, 300, generator=g)  # no ties: the plain top-k
    distinct[:3, :40] = 2.0  # three rows whose ties straddle boundaries, among rows without
    want = distinct.sort(dim=-1, descending=True, stable=True).indices[:, :64]
    past = torch.zeros_like(want, dtype=torch.bool)
    assert torch.equal(canonical(kernels.nested_select(distinct, bounds), bounds, past), canonical(want, bounds, past))
    monkeypatch.setenv(cpu_kernels.ENV, "0")
    assert torch.equal(canonical(rank_segments(distinct, bounds), bounds, past), canonical(want, bounds, past))


def test_firing_counts_match_torch(kernels, monkeypatch):
    """The trainer's per-latent firing counts from the kernel equal `(acts > 0).sum(0)`: zeros, -0,
    NaN, infinities, subnormals, more threads than rows, one row; other inputs take the torch path."""
    from msae_ext.train import fired_per_feature

    g = torch.Generator().manual_seed(3)
    acts = torch.randn(257, 131, generator=g).relu()
    acts[0, :4] = torch.tensor([float("nan"), float("inf"), -0.0, 1e-40])
    acts[1, 4:6] = torch.tensor([-float("inf"), float("nan")])
    for a in (acts, acts[:1].contiguous(), acts[:3].contiguous(), torch.zeros(5, 7)):
        want = (a > 0).sum(0, dtype=torch.int32)
        got = kernels.count_positive_per_feature(a)
        assert got.dtype == torch.int32 and torch.equal(got, want)
        assert torch.equal(fired_per_feature(a), want)
    assert torch.equal(fired_per_feature(acts.T), (acts.T > 0).sum(0, dtype=torch.int32))  # not contiguous
    assert torch.equal(fired_per_feature(acts.double()), (acts > 0).sum(0, dtype=torch.int32))
    monkeypatch.setenv(cpu_kernels.ENV, "0")
    assert torch.equal(fired_per_feature(acts), (acts > 0).sum(0, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="contiguous 2-d float32"):
        kernels.count_positive_per_feature(acts.T)


def test_kernels_name_bad_input(kernels):
    z, W, idx = _case(4, 20, 8, [0, 5], seed=0)
    with pytest.raises(RuntimeError, match="int32 indices"):
        kernels.segments_forward(z, W, idx.long(), [0, 5])
    with pytest.raises(RuntimeError, match="float32 z and W"):
        kernels.segments_forward(z.double(), W, idx, [0, 5])
    with pytest.raises(RuntimeError, match="z has 20 latents, W has 19 rows"):
        kernels.segments_forward(z, W[:19].contiguous(), idx, [0, 5])
    with pytest.raises(RuntimeError, match="bounds must run from 0"):
        kernels.segments_forward(z, W, idx, [0, 4])
    with pytest.raises(RuntimeError, match=r"shape \(B, segments, d\)"):
        kernels.segments_backward(z, W, idx, [0, 5], torch.zeros(4, 2, 8), None, None)
    with pytest.raises(RuntimeError, match="bounds must increase"):
        kernels.nested_select(z, [0, 2, 2])
    with pytest.raises(RuntimeError, match="ends must be a contiguous int32 CPU tensor with one entry per row"):
        kernels.segments_forward(z, W, idx, [0, 5], torch.zeros(3, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="ends must be"):
        kernels.segments_backward(z, W, idx, [0, 5], torch.zeros(4, 1, 8), None, None, torch.zeros(4))


def _chain_by_ops(Y, base, x):
    """The chain `GatheredChain` folds into the kernels, as the fused loss writes it without them: a
    (B, d) op per level."""
    recon, recons, errors = base, [], []
    for piece in Y.unbind(1):
        recon = recon + piece
        recons.append(recon)
        errors.append((recon - x).pow(2).sum(-1))
    return torch.stack(recons, 1), torch.stack(errors, 1)


# d = 19: a partial chunk of 32 columns; 1100 rows: blocks of 512 rows (forward, dz) and of 1024
# rows, whole and partial tiles (dW, and the base's gradient summed along it)
@pytest.mark.parametrize("shape", [(130, 50, 19, [0, 3, 8, 20]), (3, 16, 5, [0, 4]), (1100, 40, 40, [0, 2, 9])],
                         ids=["remainder", "one_piece", "row_blocks"])
@pytest.mark.parametrize("use", ["both", "errors", "reconstructions"])
def test_gathered_chain_matches_the_ops(kernels, shape, use):
    """`GatheredChain` (the segments and the chain of levels in the kernels) against float64 math:
    the full level's GEMM, the segments (columns past `ends` skipped) and the per-level chain ops.
    Values, and the gradients of z, W, the base and the target, with the gradient flowing from the
    errors, the levels (the outputs), or both, and from the full level."""
    B, D, d, bounds = shape
    z, W, idx = _case(B, D, d, bounds, seed=B + d)
    g = torch.Generator().manual_seed(B + D + d)
    S = len(bounds) - 1
    base, x = torch.randn(d, generator=g), torch.randn(B, d, generator=g)
    ends = torch.randint(0, bounds[-1] + 1, (B,), generator=g, dtype=torch.int32)
    wF, wP, wE = torch.randn(B, d, generator=g), torch.randn(B, S, d, generator=g), torch.rand(B, S, generator=g)

    def objective(F, P, E):  # a term left out sends no gradient (None), not zeros
        terms = [(wF.to(F.dtype) * F).sum()]
        terms += [(wE.to(E.dtype) * E).sum()] if use != "reconstructions" else []
        return sum(terms + ([(wP.to(P.dtype) * P).sum()] if use != "errors" else []))

    leaves = [t.clone().requires_grad_() for t in (z, W, base, x)]
    F, P, E = GatheredChain.apply(leaves[0], leaves[1], idx, bounds, True, ends, leaves[2], leaves[3])
    grads = torch.autograd.grad(objective(F, P, E), leaves)
    want_leaves = [t.double().requires_grad_() for t in (z, W, base, x)]
    Y64 = _dense_segments(want_leaves[0], want_leaves[1], idx, bounds, ends)
    P64, E64 = _chain_by_ops(Y64, want_leaves[2], want_leaves[3])
    F64 = want_leaves[0] @ want_leaves[1]
    want = torch.autograd.grad(objective(F64, P64, E64), want_leaves, allow_unused=True, retain_graph=True)
    want = [torch.zeros_like(t) if w is None else w for w, t in zip(want, want_leaves)]  # x unused: zero
    torch.testing.assert_close(F, F64.float(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(P, P64.float(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(E, E64.float(), rtol=1e-5, atol=1e-3)
    for got, w, name in zip(grads, want, ("z", "W", "base", "target")):
        torch.testing.assert_close(got, w.float(), rtol=1e-5, atol=1e-3, msg=name)
    # no decoder gradient asked: the base's gradient from a pass of its own; no target gradient asked
    leaves = [leaves[0], W, leaves[2], x]
    F, P, E = GatheredChain.apply(leaves[0], W, idx, bounds, False, ends, leaves[2], x)
    dz, d_base = torch.autograd.grad(objective(torch.zeros_like(F64).float(), P, E), [leaves[0], leaves[2]])
    torch.testing.assert_close(d_base, want[2].float(), rtol=1e-5, atol=1e-3)
    dz_want = torch.autograd.grad(objective(torch.zeros_like(F64), P64, E64), want_leaves[0])[0]
    torch.testing.assert_close(dz, dz_want.float(), rtol=1e-5, atol=1e-3)


def test_chain_kernels_name_bad_input(kernels):
    z, W, idx = _case(4, 10, 8, [0, 2, 5], seed=0)
    base, x, P, dE = torch.zeros(8), torch.zeros(4, 8), torch.zeros(4, 2, 8), torch.zeros(4, 2)
    with pytest.raises(RuntimeError, match=r"base must be a contiguous float32 CPU tensor of shape \[8\]"):
        kernels.segments_chain_forward(z, W, idx, [0, 2, 5], None, torch.zeros(7), x)
    with pytest.raises(RuntimeError, match=r"x must be .* of shape \[4, 8\]"):
        kernels.segments_chain_forward(z, W, idx, [0, 2, 5], None, base, x.double())
    with pytest.raises(RuntimeError, match=r"dE must be .* of shape \[4, 2\]"):
        kernels.segments_chain_backward(z, W, idx, [0, 2, 5], P, x, None, torch.zeros(4, 3), None, None)
    with pytest.raises(RuntimeError, match=r"dP must be .* of shape \[4, 2, 8\]"):
        kernels.segments_chain_backward(z, W, idx, [0, 2, 5], P, x, torch.zeros(4, 2, 7), dE, None, None)
    with pytest.raises(RuntimeError, match="dW must be a contiguous float32 tensor shaped like W"):
        kernels.segments_chain_backward(z, W, idx, [0, 2, 5], P, x, None, dE, None, torch.zeros(10, 7))


@pytest.mark.skipif(not cpu_kernels_has_avx512(), reason="no AVX-512 here: the default build is the AVX2 one")
def test_the_avx2_loops_match_the_avx512_ones(kernels, tmp_path):
    """CPUs without AVX-512 run the AVX2 loops, which no default build here exercises: build them
    (-mno-avx512f) and compare every pass with the default build on one case, and the select (whose
    scan of a row is a compress loop with AVX-512, a scalar one without) on rows with ties, NaN,
    too few positives and a width that is not a multiple of 16."""
    from torch.utils import cpp_extension

    cpu_kernels._ninja_on_path()
    avx2 = cpp_extension.load(name="msae_nested_segments_avx2_test", sources=[str(cpu_kernels.SOURCE)],
                              extra_cflags=["-O3", "-march=native", "-mno-avx512f", "-ffp-contract=fast", "-fopenmp"],
                              extra_ldflags=["-fopenmp"], build_directory=str(tmp_path), verbose=False)
    bounds = [0, 3, 3, 8, 20]
    z, W, idx = _case(600, 50, 77, bounds, seed=1)
    g = torch.Generator().manual_seed(1)
    H, base, x = torch.randn(600, 4, 77, generator=g), torch.randn(77, generator=g), torch.randn(600, 77, generator=g)
    dE = torch.rand(600, 4, generator=g)
    out = {}
    for name, m in (("avx512", kernels), ("avx2", avx2)):
        dz, dW = torch.empty_like(z), torch.zeros_like(W)
        m.segments_backward(z, W, idx, bounds, H, dz, dW, None, overwrite_dz=True)
        cz, cW = torch.empty_like(z), torch.zeros_like(W)
        P, E = m.segments_chain_forward(z, W, idx, bounds, None, base, x)
        d_base = m.segments_chain_backward(z, W, idx, bounds, P, x, None, dE, cz, cW, None, overwrite_dz=True)
        out[name] = (m.segments_forward(z, W, idx, bounds), dz, dW, P, E, cz, cW, d_base)
    for a, b in zip(out["avx512"], out["avx2"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    pre = torch.randn(64, 301, generator=g).round(decimals=1)  # ties within and across buckets
    pre[0, 5] = float("nan")
    pre[1] = -pre[1].abs()
    pre[1, :3] = 2.0  # three positives, fewer than K
    pre[2, :4] = torch.tensor([1e-40, 3e38, -0.0, 0.0])
    sel_bounds = [0, 4, 16, 40, 100]
    assert torch.equal(kernels.nested_select(pre, sel_bounds), avx2.nested_select(pre, sel_bounds))
    (n_a, nan_a), (n_b, nan_b) = kernels.count_positive(pre), avx2.count_positive(pre)
    assert torch.equal(n_a, n_b) and nan_a == nan_b


def test_a_failed_build_warns_and_falls_back(monkeypatch):
    """No compiler: one warning naming the cause, then the PyTorch path; `require` makes it an error."""
    from torch.utils import cpp_extension

    def broken(**_):
        raise RuntimeError("c++: not found")

    monkeypatch.setattr(cpp_extension, "load", broken)
    monkeypatch.setattr(cpu_kernels, "_loaded", {})
    monkeypatch.setenv(cpu_kernels.ENV, "1")
    with pytest.warns(RuntimeWarning, match="c\\+\\+: not found"):
        assert cpu_kernels.segment_kernels() is None
    assert cpu_kernels.segment_kernels() is None  # remembered: no second attempt, no second warning
    z, W, idx = _case(4, 20, 8, [0, 2, 5], seed=0)
    assert cpu_kernels.kernels_for(z, W) is None
    monkeypatch.setattr(cpu_kernels, "_loaded", {})
    monkeypatch.setenv(cpu_kernels.ENV, "require")
    with pytest.raises(RuntimeError, match="did not build"):
        cpu_kernels.segment_kernels()


def test_outputs_written_into_the_given_tensor(kernels):
    """`out` of the select and the chain's forward: the same values in the caller's memory, and a
    clear error for an out of the wrong shape, dtype or layout."""
    z, W, idx = _case(4, 10, 8, [0, 2, 5], seed=0)
    base, x = torch.randn(8), torch.randn(4, 8)
    out = torch.full((4, 5), -7, dtype=torch.int32)
    got = kernels.nested_select(z, [0, 2, 5], out=out)
    assert got.data_ptr() == out.data_ptr() and torch.equal(got, kernels.nested_select(z, [0, 2, 5]))
    P_out = torch.full((4, 2, 8), float("nan"))
    P, E = kernels.segments_chain_forward(z, W, idx, [0, 2, 5], None, base, x, out=P_out)
    P_new, E_new = kernels.segments_chain_forward(z, W, idx, [0, 2, 5], None, base, x)
    assert P.data_ptr() == P_out.data_ptr() and torch.equal(P, P_new) and torch.equal(E, E_new)
    with pytest.raises(RuntimeError, match=r"out \(the ranking\) must be a contiguous int CPU tensor of shape \[4, 5\]"):
        kernels.nested_select(z, [0, 2, 5], out=torch.zeros(4, 6, dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"out \(the ranking\) must be"):
        kernels.nested_select(z, [0, 2, 5], out=torch.zeros(4, 5))
    with pytest.raises(RuntimeError, match=r"out \(P\) must be a contiguous float CPU tensor of shape \[4, 2, 8\]"):
        kernels.segments_chain_forward(z, W, idx, [0, 2, 5], None, base, x, out=torch.zeros(4, 8, 2).transpose(1, 2))
