"""The MSAE loss (section 3.2): one shared selection, then two implementations of the same math.

    z_i = cap(ReLU(TopK_{k_i}(pre))),   x_hat_i = z_i W_dec + b_dec,   L = sum_i alpha_i l(x, x_hat_i)

`nested_topk_loss_reference` is the plain one: a dense decode (and, in backward, two dense
GEMMs) per level. It is the oracle of the tests.

`nested_topk_loss_fused` computes the same loss and gradients with one decode:
  * Levels whose k is at least the largest number of positive pre-activations in the batch are
    exactly the full ReLU level (top-k keeps every positive entry), so they share one dense
    decode, the GEMM a ReLU SAE does anyway.
  * The remaining levels are rank segments of one sort: segment s holds ranks [k_{s-1}, k_s), so
    the work is B * K entries for K = the largest partial level, not B * sum(k). Entries past a
    row's positives stay in place with a zero activation: they add nothing, the ReLU stops their
    gradient, and every row keeps the same layout, so no masks are built; a row's positives come
    first, so the compiled kernels skip the rest from one count per row (`ends`).
  * Where some level is the full one, `nested_selection` picks the cheapest of three layouts
    for the largest partial level K and the full level (the tail: ranks K to the row's last
    positive): level K from its own rank segment and the full level by GEMM; level K as the full
    level minus its tail (at a trained-like density a row has a few more positives than K, so
    the tail is narrower than K's segment); or, on CPU with the compiled kernels, the full level
    as level K plus its tail, every positive entry gathered once and no GEMM at all, which wins
    while a row's positives past K number fewer than about a fifth of the width
    (GATHER_FULL_FRACTION: three gathered passes cost an entry about five GEMM columns there).
    Without a soft cap the gathered layout also skips the (B, d_sae) ReLU and its backward: the
    kernels read only the positive entries, where z = pre.
  * `GatheredSegments` decodes a run of consecutive segments with one `embedding_bag` (one bag per
    row and segment); each level's reconstruction is the previous one plus its segment, so
    autograd hands each segment the suffix sum of the level gradients. The same function does the
    full level's GEMM, so one (B, d_sae) gradient buffer serves every level. Its backward takes
    the narrow segments feature-major (one int32 sort; each decoder row read once): per-entry dot
    products against the small upstream gradient for the activations and one `embedding_bag` for
    W_dec. A segment wider than DENSE_SEGMENT_FRACTION of d_sae uses GEMMs in row blocks instead.
    No dense decoder pass per level.
  * On CPU in float32 the segments' forward and backward and the selection run as compiled
    kernels (cpu_kernels.py, csrc/nested_segments.cpp: column chunks of the decoder kept in L2,
    the decoder gradient a tile of rows at a time, feature by feature, AVX-512 or AVX2 where available; a
    select per row instead of a sort), built on first use; where they do
    not build, the PyTorch path above computes the same values. Where one gathered run is the
    whole chain of levels (no level K = full - tail), `GatheredChain` folds the chain into the
    kernels' passes: the forward pass adds each segment into its level as it sums it and adds up
    the levels' squared errors chunk by chunk, and the backward passes compute the suffix sums of
    the level gradients from the levels where they read them: no (B, S, d_in) tensor of the
    segments nor of their gradients, and no (B, d_in) op per level.
  * Segments at least DENSE_DECODE_FRACTION of d_sae wide (on a GPU) are decoded by
    `DenseSegments` instead, all of them and the full level in one function: a scatter into a
    (B, d_sae) buffer and GEMMs for each (tensor cores beat gathers there); the buffer is rebuilt
    in backward rather than kept, and z gets one gradient.
Extra memory: the (B, K) int32 ranking, kept for backward, one (B, d_in) reconstruction per
level, and transients: (kernels) a (512, K) float32 buffer and the levels' squared errors per
column chunk (d_in / 32 x B x levels floats) in forward, the entries of 1024 rows
grouped by feature (8 bytes an entry) in backward, and a chunk-major copy of the decoder,
(PyTorch path) feature-sorted index arrays and blocked GEMM slices, (dense segments) one
(B, d_sae) buffer at a time in forward, and in backward a product and a rebuilt buffer of a block
of rows (`DENSE_BACKWARD_BLOCKS`) next to z's gradient. With the kernels, the ranking, the levels
and the activation gradient take reused memory (`buffers`), as do the pre-activations and the
ReLU upstream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from . import buffers, cpu_kernels
from .base import autocast_dtype, batch_mean_error, reconstruction_loss, soft_cap


@dataclass
class NestedSelection:
    """One ranking shared by the partial levels.

    partial: levels (k values) computed from the ranking, increasing.
    indices: (B, max(K, tail_end)) int32, K = max(partial) (empty when none): row b's features of
        ranks [k_{s-1}, k_s) in columns [k_{s-1}, k_s), in no particular order within such a
        segment (the sums over a segment do not depend on it). Ranks are by pre-activation,
        descending, and between equal pre-activations by feature, ascending: the ranks of a stable
        descending sort, so every path and device selects the same segments. In a row without NaN
        with n positive pre-activations, columns [0, n) hold exactly those.
    n_pos: (B,) int32, each row's number of positive pre-activations.
    tail_end: 0, or the batch's largest n_pos when the ranking also holds the ranks past the
        largest partial level K (K = 0 when there is none), [K, tail_end) in columns [K, tail_end)
        (rows with fewer positives pad it with non-positive features): the tail of level K.
    full_gathered: with a tail, how it is used. False: level K is computed as the full level minus
        its tail. True: the full level is level K plus its tail, so that every positive entry is
        gathered once and the full level needs no GEMM (`nested_selection`).
    Levels of the k-list not in `partial` equal the full ReLU level exactly.
    """

    partial: list[int]
    indices: torch.Tensor
    n_pos: torch.Tensor
    tail_end: int = 0
    full_gathered: bool = False


#: how the fused loss lays out the largest partial level K and the full level where some level of
#: the k-list is the full one: "auto" picks the cheapest (`nested_selection`); "segments": level K
#: from its own rank segment, the full level by GEMM; "tail": level K = the full level (GEMM) minus
#: its tail; "gathered": the full level = level K plus its tail, no GEMM. The last two are forced
#: only where they apply. Tests and benchmarks set it; training uses "auto".
LAYOUT: Literal["auto", "segments", "tail", "gathered"] = "auto"

#: the full level's three GEMMs (decode, activation gradient, decoder gradient) cost about as much as
#: gathering this fraction of d_sae entries a row through the compiled CPU kernels' three passes
#: (benchmarks/segment_kernels.py: an entry costs four to five GEMM columns; 2 cores, 768 -> 6144,
#: batch 1024 and 4096). Where a row's positives past the largest partial level number fewer, the
#: full level is gathered rather than multiplied.
GATHER_FULL_FRACTION = 1 / 5


@torch.no_grad()
def nested_selection(hidden_pre: torch.Tensor, k_list: list[int], tail_if_narrower_than: float = 0.0,
                     gemm_entries: float = 0.0) -> NestedSelection:
    """The shared ranking of the partial levels (`NestedSelection`), and the layout of the largest
    partial level K and the full level.

    Where some level equals the full level, three layouts compute the same math. Their costs, in
    gathered entries, with E(a, b) the batch's positive entries of ranks [a, b), k' the level
    below K (0 if none), n a row's positives, and the full level's GEMMs worth `gemm_entries` a
    row (0: never gather the full level):
      * segments: the GEMMs, and level K from its rank segment: GEMMs + E(0, K);
      * tail: level K = the full level minus its tail [K, n): GEMMs + E(0, k') + E(K, n), plus a
        tenth of E(k', K) for the longer select and the copy of the index columns; only where the
        segment [k', K) is narrower than `tail_if_narrower_than` (gathered, not dense);
      * gathered: the full level = level K plus its tail: E(0, n), no GEMMs; only where no
        pre-activation is NaN (the GEMM propagates a NaN, the ranking's counts do not see one).
    At a trained-like density a row has a few more positives than K, and the tail is a fraction
    of the segment [k', K) and of the GEMMs; at initialisation (half the latents active) it is
    about as wide as the segment. LAYOUT forces a layout where it applies.
    """
    d_sae = hidden_pre.shape[-1]
    kernels = cpu_kernels.kernels_for(hidden_pre)
    if kernels is not None:  # one pass, no (B, d_sae) bool tensor
        n_pos, has_nan = kernels.count_positive(hidden_pre)
    else:  # int32 counts: a bool sum's default int64 result is a (B, d_sae) int64 copy
        n_pos, has_nan = (hidden_pre > 0).sum(dim=-1, dtype=torch.int32), None
    n_max = int(n_pos.max()) if hidden_pre.numel() else 0
    partial = [k for k in k_list if k < min(n_max, d_sae)]
    top, below = (partial[-1], partial[-2] if len(partial) > 1 else 0) if partial else (0, 0)
    full_needed = len(partial) < len(k_list) and n_max > 0
    can_tail = bool(partial) and full_needed and top - below < tail_if_narrower_than
    can_gather = full_needed and (gemm_entries > 0 or LAYOUT == "gathered")
    if can_gather:
        can_gather = not (bool(hidden_pre.isnan().any()) if has_nan is None else has_nan)
    layout = "segments"
    if LAYOUT in ("tail", "gathered"):
        layout = LAYOUT if {"tail": can_tail, "gathered": can_gather}[LAYOUT] else "segments"
    elif LAYOUT == "auto" and (can_tail or can_gather):
        tail = int((n_pos - top).clamp_min(0).sum(dtype=torch.int64))  # counted per row, as `ends` does
        segment = int((n_pos - below).clamp(0, top - below).sum(dtype=torch.int64))
        gemms = gemm_entries * hidden_pre.shape[0]
        cost = {"segments": gemms + segment}
        if can_tail:
            cost["tail"] = gemms + tail + 0.1 * segment
        if can_gather:
            cost["gathered"] = segment + tail
        layout = min(cost, key=cost.__getitem__)
    if layout == "segments":
        if not partial:
            empty = torch.empty(hidden_pre.shape[0], 0, dtype=torch.int32, device=hidden_pre.device)
            return NestedSelection(partial, empty, n_pos)
        return NestedSelection(partial, rank_segments(hidden_pre, selection_bounds(partial, 0)), n_pos)
    indices = rank_segments(hidden_pre, selection_bounds(partial, n_max))
    return NestedSelection(partial, indices, n_pos, n_max, full_gathered=layout == "gathered")


def selection_bounds(partial: list[int], tail_end: int) -> list[int]:
    """The rank bounds a selection is made at: [0, *partial], and the tail's end when there is one."""
    return [0, *partial] + ([tail_end] if tail_end else [])


def rank_segments(pre: torch.Tensor, bounds: list[int]) -> torch.Tensor:
    """(B, bounds[-1]) int32: each row's features of ranks [bounds[s], bounds[s+1]) in columns
    [bounds[s], bounds[s+1]), a row's positive entries first (`NestedSelection`). On CPU in
    float32 the compiled select (no sort, O(D + K) a row) does it; elsewhere one sorted top-k, with
    the rows where equal values straddle a segment boundary (or NaN appears) ranked again by a
    stable sort.

    Such rows are rare with float32 pre-activations (one row in 4096 at 768 -> 6144), but under
    bf16 autocast with equal encoder biases (the paper's initialisation) every row has them: the
    encoder's GEMM rounds to 8 bits of mantissa. The stable sort of those rows is one float32 sort
    (32-bit keys); the exact int64 keys it replaced took six int64 (B, d_sae) passes and a top-k
    over 64-bit keys, which every row then paid."""
    kernels = cpu_kernels.kernels_for(pre)
    if kernels is not None:  # into reused memory (`buffers`); its width follows the batch's counts
        out = buffers.empty((pre.shape[0], bounds[-1]), torch.int32, pre.device, slack=1 / 16)
        return kernels.nested_select(pre, list(bounds), out=out)
    K, D = bounds[-1], pre.shape[-1]
    values, order = pre.topk(min(K + 1, D), dim=-1, sorted=True)
    ambiguous = values.isnan().any(dim=-1)
    for k in bounds[1:]:
        if k < values.shape[1]:  # is rank k - 1 tied with rank k?
            ambiguous |= values[:, k - 1] == values[:, k]
    order = order[:, :K]
    rows = ambiguous.nonzero().squeeze(1)
    # value descending, then feature ascending (NaN first, as torch.sort has it)
    if rows.numel() == pre.shape[0]:  # every row (bf16 at initialisation): no (B, d_sae) copy of them
        order = pre.sort(dim=-1, descending=True, stable=True).indices[:, :K]
    elif rows.numel():
        order[rows] = pre[rows].sort(dim=-1, descending=True, stable=True).indices[:, :K]
    return order.to(torch.int32)


def nested_level_activations(
    hidden_pre: torch.Tensor, k_list: list[int], cap: float | None
) -> list[torch.Tensor]:
    """Dense z_i for every level (the reference path), from the shared selection."""
    sel = nested_selection(hidden_pre, k_list)
    full = soft_cap(hidden_pre.relu(), cap)
    levels = []
    for k in k_list:
        if k in sel.partial:
            idx = sel.indices[:, :k].long()
            z = torch.zeros_like(hidden_pre).scatter(-1, idx, hidden_pre.gather(-1, idx).relu())
            levels.append(soft_cap(z, cap))
        else:
            levels.append(full)
    return levels


def _combine(level_losses: list[torch.Tensor], alphas: list[float], normalize: bool) -> torch.Tensor:
    loss = sum(a * l for a, l in zip(alphas, level_losses))
    return loss / sum(alphas) if normalize else loss  # type: ignore[return-value]


def nested_topk_loss_reference(
    x: torch.Tensor,
    hidden_pre: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    k_list: list[int],
    alphas: list[float],
    cap: float | None = None,
    recon_loss: Literal["mse", "nmse"] = "mse",
    normalize_by_alpha_sum: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Reference MSAE loss: one dense decode per level. Returns (loss, level losses, level outputs)."""
    level_losses, outputs = [], []
    for z in nested_level_activations(hidden_pre, k_list, cap):
        x_hat = z @ W_dec + b_dec
        outputs.append(x_hat)
        level_losses.append(reconstruction_loss(x_hat, x, recon_loss))
    return _combine(level_losses, alphas, normalize_by_alpha_sum), level_losses, outputs


def _exclusive_cumsum(counts: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(counts, 0) - counts


#: a gathered segment wider than this fraction of d_sae gets its activation gradient from one dense
#: GEMM (dY_s W^T, then a gather) instead of per-entry dot products; the break-even measured on CPU
#: (2 cores, 768 -> 6144, batch 1024) is about 1/7.
DENSE_SEGMENT_FRACTION = 1 / 8

#: a rank segment at least this fraction of d_sae wide is decoded densely (`DenseSegments`:
#: scatter into a (B, d_sae) buffer, GEMMs forward and backward) instead of gathered
#: (`GatheredSegments`); keyed by (device type, autocast on). Measured with benchmarks/train_step.py
#: --dense-fraction (benchmarks/README.md): on CPU gathers win at every width; on an H100 in float32
#: gathering the segments narrower than 1/32 of d_sae is best, and under bf16 autocast, where the
#: GEMMs run on tensor cores and the gathers stay float32, decoding every segment densely is
#: almost twice as fast. Other accelerators use the "cuda" entries.
DENSE_DECODE_FRACTION: dict[tuple[str, bool], float] = {
    ("cpu", False): float("inf"),
    ("cpu", True): float("inf"),
    ("cuda", False): 1 / 32,
    ("cuda", True): 0.0,
}


def dense_decode_fraction(device_type: str) -> float:
    autocast = autocast_dtype(device_type) is not None
    key = (device_type, autocast) if (device_type, autocast) in DENSE_DECODE_FRACTION else ("cuda", autocast)
    return DENSE_DECODE_FRACTION[key]


#: without autocast, `DenseSegments`' backward takes each segment's GEMMs in this many blocks of
#: rows, so that the (rows, d_sae) float32 product and rebuilt buffer next to z's gradient take a
#: fraction of one (B, d_sae) buffer (the step's peak is there; the decoder gradient accumulates in
#: the GEMMs, `addmm_`). Under autocast those transients are half as large in bf16, and blocks would
#: add a cast and an addition of a decoder-sized product each: one block.
DENSE_BACKWARD_BLOCKS = 4


class DenseSegments(torch.autograd.Function):
    """The full level's decode and rank segments' decodes by GEMMs, from the dense z:

        F       = z W                                   (when `with_full`; else empty)
        Y[b, s] = S_s[b] W,   S_s[b, f] = z[b, f] for f in idx[b, lo_s:hi_s], 0 elsewhere

    idx is (B, w), the ranking's columns of a span, and `ranges` the segments' column ranges in it
    (with gaps where other pieces are gathered); features are unique within a row. The GEMMs
    follow the caller's autocast, in forward and in backward. Each S_s is a (B, d_sae) buffer
    scattered in the GEMMs' dtype (a value rounded before it is placed among exact zeros is the
    value a cast of the float32 buffer gives: half the bytes, no cast pass), in forward and again
    in backward, one at a time. Kept for backward: z (which the ReLU keeps anyway), z's cast for
    the full level's GEMM (which autograd keeps for a plain `z @ W` too), W and the int32 indices
    (a view of the ranking), so that no (B, d_sae)-sized tensor of a segment's is kept between
    forward and backward. Entries past a row's positives have z = 0: they add nothing, and their
    gradient is stopped by the ReLU that made z.

    backward: dz = dF W^T (or zeros) is the one (B, d_sae) gradient of z; each segment's
    activation gradient, dY_s W^T at its entries, is added into it in place, rather than each
    segment giving z a (B, d_sae) gradient of its own for autograd to sum. The decoder is cast to
    the autocast dtype once. dW = z^T dF + sum_s S_s^T dY_s, each product summed in float32.
    Without autocast a segment's GEMMs go by blocks of rows (DENSE_BACKWARD_BLOCKS).
    """

    @staticmethod
    def _scattered(z, z_cast, cols, dtype):
        """S: (B, d_sae) zeros with S[b, f] = z[b, f] at the features cols[b], in `dtype` (gathered
        from z's cast where there is one, which holds the same values)."""
        c = z_cast.gather(1, cols) if z_cast is not None else z.gather(1, cols).to(dtype)
        return c.new_zeros(z.shape).scatter_(1, cols, c)

    @staticmethod
    def forward(ctx, z, W, idx, ranges, with_full):  # type: ignore[override]
        ctx.autocast = autocast_dtype(z.device.type)
        ctx.ranges, ctx.with_full = ranges, with_full
        dtype = ctx.autocast or z.dtype
        z_cast = z.to(dtype) if with_full else None
        Y = torch.stack([DenseSegments._scattered(z, z_cast, idx[:, a:b].long(), dtype) @ W for a, b in ranges], 1)
        full = (z_cast @ W).to(z.dtype) if with_full else z.new_empty(0)
        ctx.save_for_backward(z, z_cast, W, idx)
        return full, Y

    @staticmethod
    def backward(ctx, d_full, dY):  # type: ignore[override]
        z, z_cast, W, idx = ctx.saved_tensors
        want_z, want_W = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dtype = ctx.autocast or z.dtype
        dz = dW = None
        W_cast = W.to(dtype)  # once, not once a GEMM (autocast caches no cast of W.T)
        if ctx.with_full and d_full is not None:
            dz, dW = _full_level_grads(ctx, z, W, d_full, z_cast, W_cast)
        with torch.autocast(W.device.type, dtype=ctx.autocast or torch.bfloat16, enabled=ctx.autocast is not None):
            if dY is not None:
                dz = torch.zeros_like(z) if want_z and dz is None else dz
                dW = torch.zeros_like(W) if want_W and dW is None else dW
                blocks = DENSE_BACKWARD_BLOCKS if ctx.autocast is None else 1
                step = max(1, -(-z.shape[0] // blocks))
                for s, (a, b) in enumerate(ctx.ranges):
                    for r in range(0, z.shape[0], step):  # the (rows, d_sae) transients a fraction of dz
                        rows = slice(r, r + step)
                        cols, g = idx[rows, a:b].long(), dY[rows, s]
                        if want_z:
                            dz[rows].scatter_add_(1, cols, (g @ W_cast.T).gather(1, cols).to(z.dtype))
                        if want_W:
                            S = DenseSegments._scattered(z[rows], None if z_cast is None else z_cast[rows], cols, dtype)
                            if ctx.autocast is None:
                                dW.addmm_(S.T, g)  # accumulated by the GEMM itself
                            else:
                                dW += (S.T @ g).to(W.dtype)
                            del S  # not alive next to the next block's product
        return dz, dW, None, None, None


class GatheredSegments(torch.autograd.Function):
    """The full level's decode and a run of consecutive rank segments' decodes, from the dense z.

        F       = z W                                          (when `with_full`; else empty)
        Y[b, s] = sum_{j in segment s} z[b, idx[b, j]] W[idx[b, j]]

    idx is (B, w) with the segments as column ranges `bounds` = [0, w_1, ..., w]: every row is one
    bag per segment, so the layout needs no offsets or masks of its own. Entries past a row's
    positives have z = 0: they add nothing, and their gradient is stopped by the ReLU that made z.
    `ends` (B,) int32, optional: row b's entries from column ends[b] on are all such entries; the
    compiled kernels skip them, leaving their activation gradient without the segments' terms
    (the PyTorch path computes those, which that ReLU stops).

    forward: the GEMM (following the caller's autocast) and one float32 embedding_bag over the
    decoder rows (bags = (row, segment)). Only z, W, int32 indices and `ends` are kept for backward.
    backward: dz = dF W^T is the one (B, d_sae) gradient buffer; the segments' activation
    gradients are added into it in place. Those are per-entry dot products taken feature-major
    (an int32 argsort, so that each decoder row is read once per feature and the small
    (B * segments, d_in) upstream gradient is what is gathered; the per-sample-weight gradient
    with the roles of table and gradient swapped), or, for a segment wider than
    DENSE_SEGMENT_FRACTION of d_sae, one GEMM dY_s W^T (in row blocks) and a gather.
    dW = z^T dF, plus one feature-sorted embedding_bag over dY for the narrow segments (in blocks
    of decoder rows) and S_s^T dY_s in row blocks for a wide one.
    """

    @staticmethod
    def forward(ctx, z, W, idx, bounds, with_full, ends):  # type: ignore[override]
        B, w = idx.shape
        dev = z.device
        ctx.autocast = autocast_dtype(dev.type)
        ctx.bounds, ctx.with_full = bounds, with_full
        flat = idx.reshape(-1).to(torch.int32)  # int32 indices: half the traffic, faster sorts
        ctx.save_for_backward(z, W, flat, ends)
        with torch.autocast(dev.type, enabled=False):
            kernels = cpu_kernels.kernels_for(z, W)
            if kernels is not None:
                Y = kernels.segments_forward(z, W, flat.view(B, w), list(bounds), ends)
            else:  # one bag per (row, segment)
                starts = torch.tensor(bounds[:-1], dtype=torch.int32, device=dev)
                offsets = (torch.arange(B, dtype=torch.int32, device=dev)[:, None] * w + starts).reshape(-1)
                c = z.gather(1, idx.long()).reshape(-1)
                Y = F.embedding_bag(flat, W, offsets, mode="sum", per_sample_weights=c)
        full = (z @ W).to(z.dtype) if with_full else z.new_empty(0)
        return full, Y.view(B, len(bounds) - 1, W.shape[1])

    @staticmethod
    def backward(ctx, d_full, dY):  # type: ignore[override]
        z, W, flat, ends = ctx.saved_tensors
        idx = flat.view(z.shape[0], -1)
        dz = dW = None
        if ctx.with_full and d_full is not None:
            dz, dW = _full_level_grads(ctx, z, W, d_full)
        if dY is None:
            return dz, dW, None, None, None, None
        with torch.autocast(z.device.type, enabled=False):  # the segments stay float32
            dz, dW = GatheredSegments._segment_grads(ctx, z, W, idx, dY, dz, dW, ends)
        return dz, dW, None, None, None, None

    @staticmethod
    def _segment_grads(ctx, z, W, idx, dY, dz, dW, ends):
        """Add the segments' terms to dz and dW in place (each created as zeros when absent)."""
        B, D = z.shape
        want_z, want_W = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dW = torch.zeros_like(W) if want_W and dW is None else dW
        dY = dY.contiguous()
        bounds = ctx.bounds
        kernels = cpu_kernels.kernels_for(z, W)
        if kernels is not None:  # a new dz is written whole by the kernel: no zero fill first
            new_dz = want_z and dz is None
            dz = buffers.empty_like(z) if new_dz else dz
            kernels.segments_backward(z, W, idx, list(bounds), dY, dz, dW, ends, overwrite_dz=new_dz)
            return dz, dW
        dz = torch.zeros_like(z) if want_z and dz is None else dz
        narrow = []  # (segment, first column, end column) of the segments taken feature-major
        for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            if hi - lo <= DENSE_SEGMENT_FRACTION * D:
                narrow.append((s, lo, hi))
                continue
            for r in range(0, B, _ROW_BLOCK):  # GEMMs on (block, d_sae) slices, accumulated in place
                rows = slice(r, r + _ROW_BLOCK)
                cols = idx[rows, lo:hi].long()
                if want_z:
                    dz[rows].scatter_add_(1, cols, (dY[rows, s] @ W.T).gather(1, cols))
                if want_W:
                    S = torch.zeros_like(z[rows]).scatter_(1, cols, z[rows].gather(1, cols))
                    dW.addmm_(S.T, dY[rows, s])
        if not narrow:
            return dz, dW
        cols = torch.cat([torch.arange(lo, hi, device=z.device) for _, lo, hi in narrow])
        seg_of_col = torch.cat([torch.full((hi - lo,), s, dtype=torch.int32, device=z.device)
                                for s, lo, hi in narrow])
        sub = idx.index_select(1, cols)
        flat = sub.reshape(-1)
        order = torch.argsort(flat)  # feature-major: each decoder row read once per feature
        feature = flat.index_select(0, order)
        n_seg = dY.shape[1]
        bag = (torch.arange(B, dtype=torch.int32, device=z.device)[:, None] * n_seg + seg_of_col).reshape(-1)
        bag = bag.index_select(0, order)  # the entry's row of the (B * segments, d_in) gradient
        offsets = _exclusive_cumsum(torch.bincount(flat, minlength=D)).to(torch.int32)
        pos = _flat_positions(sub, D).index_select(0, order)  # the entry's place in z
        H = dY.view(B * n_seg, -1)
        if want_z:  # dz[b, f] += W[f] . dY[b, s]
            dz.view(-1).index_add_(0, pos, torch.ops.aten._embedding_bag_per_sample_weights_backward(
                W, H, bag, offsets, feature, 0, -1))
        if want_W:  # dW[f] += sum over its entries of z[b, f] dY[b, s], a block of features at a time
            c = z.view(-1).index_select(0, pos)
            starts = offsets.tolist() + [flat.numel()]  # feature f's entries: starts[f]:starts[f + 1]
            for f in range(0, D, _FEATURE_BLOCK):
                fs = slice(f, f + _FEATURE_BLOCK)
                a, b = starts[f], starts[min(f + _FEATURE_BLOCK, D)]
                dW[fs].add_(F.embedding_bag(bag[a:b], H, offsets[fs] - a, mode="sum", per_sample_weights=c[a:b]))
        return dz, dW


def _full_level_grads(ctx, z: torch.Tensor, W: torch.Tensor, d_full: torch.Tensor,
                      z_cast: torch.Tensor | None = None, W_cast: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The full level's GEMM gradients dz = d_full W^T and dW = z^T d_full (those asked for, in z's
    and W's dtypes), under the autocast the forward GEMM ran with: the (B, d_sae) buffer the
    segments' terms are added to. `z_cast` and `W_cast`, where given, are z and W already cast to
    the autocast dtype, so that the GEMMs do not cast them again."""
    z_op = z if z_cast is None else z_cast
    W_op = W if W_cast is None else W_cast
    with torch.autocast(z.device.type, dtype=ctx.autocast or torch.bfloat16, enabled=ctx.autocast is not None):
        dz = (d_full @ W_op.T).to(z.dtype) if ctx.needs_input_grad[0] else None
        dW = (z_op.T @ d_full).to(W.dtype) if ctx.needs_input_grad[1] else None
    return dz, dW


class GatheredChain(torch.autograd.Function):
    """`GatheredSegments` and the chain of levels over its segments in the compiled CPU kernels,
    without the (B, S, d_in) segments or their gradient:

        F = z W (when `with_full`),   P[:, s] = base + sum_{s' <= s} Y[:, s'],   E[:, s] = ||P[:, s] - x||^2

    with Y[:, s] the segments' sums as in `GatheredSegments`. The forward pass adds each segment
    into its level as it is summed, and adds up each level's squared error chunk by chunk; the
    backward passes compute the suffix sums of the levels' gradients (what autograd would hand each
    segment) from P, x and the gradients of P and E where they read them. Kept for backward: z, W,
    the indices, `ends` and P (the levels' outputs, which the caller keeps too). The same math as
    `GatheredSegments` followed by `recon = recon + piece` and `(recon - x).pow(2).sum(-1)` per level.
    Only for contiguous float32 CPU operands with the kernels built (`_chain_kernels_for`)."""

    @staticmethod
    def forward(ctx, z, W, idx, bounds, with_full, ends, base, x):  # type: ignore[override]
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None, not zeros
        ctx.autocast = autocast_dtype(z.device.type)
        ctx.bounds, ctx.with_full = bounds, with_full
        idx = idx.to(torch.int32).contiguous()
        kernels = cpu_kernels.segment_kernels()
        out = buffers.empty((z.shape[0], len(bounds) - 1, W.shape[1]), z.dtype, z.device)  # reused memory
        P, E = kernels.segments_chain_forward(z, W, idx, list(bounds), ends, base, x, out=out)
        full = (z @ W).to(z.dtype) if with_full else z.new_empty(0)
        ctx.save_for_backward(z, W, idx, ends, P, x)
        return full, P, E

    @staticmethod
    def backward(ctx, d_full, dP, dE):  # type: ignore[override]
        z, W, idx, ends, P, x = ctx.saved_tensors
        want_z, want_W = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dz = dW = None
        if ctx.with_full and d_full is not None:
            dz, dW = _full_level_grads(ctx, z, W, d_full)
        dE = P.new_zeros(P.shape[:2]) if dE is None else dE.contiguous()
        dP = None if dP is None else dP.contiguous()
        with torch.autocast(z.device.type, enabled=False):  # the segments stay float32
            new_dz = want_z and dz is None  # then written whole by the kernel: no zero fill first
            dz = buffers.empty_like(z) if new_dz else dz  # reused memory on CPU (`buffers`)
            dW = torch.zeros_like(W) if want_W and dW is None else dW
            d_base = cpu_kernels.segment_kernels().segments_chain_backward(
                z, W, idx, list(ctx.bounds), P, x, dP, dE, dz, dW, ends, overwrite_dz=new_dz)
            dx = None
            if ctx.needs_input_grad[7]:  # x is the SAE's input, which seldom asks for a gradient
                dx = -(2 * dE[..., None] * (P - x[:, None])).sum(1)
        return dz, dW, None, None, None, None, d_base if ctx.needs_input_grad[6] else None, dx


def _chain_kernels_for(z: torch.Tensor, W: torch.Tensor, base: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether `GatheredChain` applies: the compiled kernels, and contiguous float32 CPU operands."""
    return base.dim() == 1 and cpu_kernels.kernels_for(z, W, base, x) is not None


def piece_ranges(sel: NestedSelection) -> list[tuple[int, int]]:
    """The fused loss's pieces as column ranges of the ranking: the rank segments [k_{s-1}, k_s),
    then the tail [K, tail_end): after them when the full level is gathered, in place of the last
    segment when level K is the full level minus its tail."""
    ranges = list(zip([0, *sel.partial[:-1]], sel.partial))
    if sel.full_gathered:
        ranges.append((sel.partial[-1] if sel.partial else 0, sel.tail_end))
    elif sel.tail_end:
        ranges[-1] = (sel.partial[-1], sel.tail_end)
    return ranges


def gathered_run(sel: NestedSelection, ranges: list[tuple[int, int]]
                 ) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    """`GatheredSegments`'s (idx, bounds, ends) for a run of consecutive piece ranges."""
    bounds = [0]
    for a, b in ranges:
        bounds.append(bounds[-1] + b - a)
    return _columns(sel.indices, ranges), bounds, _run_ends(sel.n_pos, ranges)


def _columns(indices: torch.Tensor, ranges: list[tuple[int, int]]) -> torch.Tensor:
    """The column ranges of `indices`, side by side (a view when they are adjacent)."""
    if all(a1 == b0 for (_, b0), (a1, _) in zip(ranges[:-1], ranges[1:])):
        return indices[:, ranges[0][0]:ranges[-1][1]]
    return torch.cat([indices[:, a:b] for a, b in ranges], dim=1)


def _run_ends(n_pos: torch.Tensor, ranges: list[tuple[int, int]]) -> torch.Tensor:
    """(B,) int32: where each row's positive entries end in `_columns(indices, ranges)`. A row's
    positives are its first n_pos columns of the ranking, so within ranges taken in increasing
    order they are a prefix too: min(n_pos, b) - a of range [a, b), where positive."""
    ends = torch.zeros_like(n_pos)
    for a, b in ranges:
        ends += (n_pos - a).clamp(0, b - a)
    return ends


def _flat_positions(idx: torch.Tensor, width: int) -> torch.Tensor:
    """Row-major positions b * width + idx[b, j] of a (B, w) index block in a (B, width) tensor,
    int32 where they fit (half the memory of the int64 a gather or scatter would need)."""
    dtype = torch.int32 if idx.shape[0] * width < 2**31 else torch.int64
    rows = torch.arange(idx.shape[0], dtype=dtype, device=idx.device)[:, None] * width
    return (rows + idx.to(dtype)).reshape(-1)


#: rows per block of a wide gathered segment's backward GEMMs, and decoder rows per block of the
#: narrow segments' dW: the transient buffers stay a fraction of one (B, d_sae) buffer
_ROW_BLOCK = 256
_FEATURE_BLOCK = 1024


def nested_topk_loss_fused(
    x: torch.Tensor,
    hidden_pre: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    k_list: list[int],
    alphas: list[float],
    cap: float | None = None,
    recon_loss: Literal["mse", "nmse"] = "mse",
    normalize_by_alpha_sum: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """The reference's loss, level losses and outputs with one decode (module docstring).

    Under bf16/fp16 autocast the selection, the segment sums and the level losses run in float32;
    only the full level's GEMM follows autocast.
    """
    if hidden_pre.dtype in (torch.float16, torch.bfloat16):
        hidden_pre = hidden_pre.float()
    x = x.to(hidden_pre.dtype)
    device = hidden_pre.device.type
    dense_from = dense_decode_fraction(device) * W_dec.shape[0]
    # the tail and the gathered full level only without autocast: level K would inherit the bf16
    # GEMM's rounding, and a gathered full level would not have the rounding autocast asks for
    exact = autocast_dtype(device) is None
    kernels = cpu_kernels.kernels_for(hidden_pre, W_dec) is not None
    sel = nested_selection(hidden_pre, k_list, tail_if_narrower_than=dense_from if exact else 0.0,
                           gemm_entries=GATHER_FULL_FRACTION * W_dec.shape[0] if exact and kernels else 0.0)
    segments = piece_ranges(sel)
    if sel.full_gathered and cap is None and kernels and all(b - a < dense_from for a, b in segments):
        # every positive entry is gathered, and the kernels read only those (`ends`), where z = pre:
        # the segments take the pre-activations themselves, and no (B, d_sae) ReLU, nor its
        # backward, is needed (the gradient is zero off the entries, as the ReLU would make it)
        z = hidden_pre
    else:
        z = soft_cap(hidden_pre.relu(), cap)
    need_full = any(k not in sel.partial for k in k_list)
    full_out = full_loss = None
    partial_out: dict[int, torch.Tensor] = {}
    partial_loss: dict[int, torch.Tensor] = {}
    tail_subtracted = bool(sel.tail_end) and not sel.full_gathered  # level K = the full level - its tail
    prefix_levels = sel.partial[:-1] if tail_subtracted else sel.partial
    if segments:
        pieces: list[torch.Tensor] = []  # each range's decode, in order
        chain = None  # (levels, errors) when one gathered run is the whole chain of levels (`GatheredChain`)
        dense = [(lo, k) for lo, k in segments if k - lo >= dense_from]
        if dense:  # every dense segment in one call, which also does the full GEMM
            lo = min(a for a, _ in dense)
            with_full = need_full and not sel.full_gathered
            full, Y = DenseSegments.apply(z, W_dec, sel.indices[:, lo:max(b for _, b in dense)],
                                          [(a - lo, b - lo) for a, b in dense], with_full)
            if with_full:
                full_out = full + b_dec
            dense_pieces = dict(zip(dense, Y.unbind(1)))
        j = 0
        while j < len(segments):
            if segments[j] in dense:
                pieces.append(dense_pieces[segments[j]])
                j += 1
                continue
            end = j  # the run of consecutive gathered ranges starting at j
            while end < len(segments) and segments[end][1] - segments[end][0] < dense_from:
                end += 1
            idx, bounds, ends = gathered_run(sel, segments[j:end])
            # the first run also does the full GEMM, unless the full level is gathered
            with_full = need_full and full_out is None and not sel.full_gathered
            if j == 0 and end == len(segments) and not tail_subtracted and _chain_kernels_for(z, W_dec, b_dec, x):
                # every piece is a step of the chain: the levels straight from the kernels
                full, *chain = GatheredChain.apply(z, W_dec, idx, bounds, with_full, ends, b_dec, x)
            else:
                full, Y = GatheredSegments.apply(z, W_dec, idx, bounds, with_full, ends)
                pieces.extend(Y.unbind(1))
            if with_full:
                full_out = full + b_dec
            j = end
        if chain is not None:
            recons, errors = chain
            level_errors = batch_mean_error(errors, x, recon_loss).unbind()
            for s, k in enumerate(prefix_levels):
                partial_out[k], partial_loss[k] = recons[:, s], level_errors[s]
            if sel.full_gathered:  # a copy: a view would keep all of `recons` alive with sae_out
                full_out, full_loss = recons[:, -1].clone(), level_errors[-1]
        else:
            recon = b_dec.to(z.dtype)
            for k, piece in zip(prefix_levels, pieces):  # level k = level before + its rank segment
                recon = recon + piece
                partial_out[k] = recon
            if sel.full_gathered:  # the full level = level K + its tail
                full_out = recon + pieces[-1]
            elif tail_subtracted:
                partial_out[sel.partial[-1]] = full_out - pieces[-1]
    if need_full and full_out is None:
        full_out = (z @ W_dec + b_dec).to(z.dtype)

    outputs = [partial_out[k] if k in partial_out else full_out for k in k_list]
    if full_loss is None and full_out is not None:
        full_loss = reconstruction_loss(full_out, x, recon_loss)
    for k in partial_out.keys() - partial_loss.keys():
        partial_loss[k] = reconstruction_loss(partial_out[k], x, recon_loss)
    level_losses = [partial_loss[k] if k in partial_loss else full_loss for k in k_list]
    return _combine(level_losses, alphas, normalize_by_alpha_sum), level_losses, outputs  # type: ignore[return-value]
