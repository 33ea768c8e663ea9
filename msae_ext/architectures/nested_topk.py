"""The MSAE loss (section 3.2): one shared selection, then two implementations of the same math.

    z_i = cap(ReLU(TopK_{k_i}(pre))),   x_hat_i = z_i W_dec + b_dec,   L = sum_i alpha_i l(x, x_hat_i)

`nested_topk_loss_reference` is the plain one: a dense decode (and, in backward, two dense
GEMMs) per level. It is the oracle of the tests.

`nested_topk_loss_fused` computes the same loss and gradients with one decode:
  * Levels whose k is at least the largest number of positive pre-activations in the batch are
    exactly the full ReLU level (top-k keeps every positive entry), so they share one dense
    decode, the GEMM a ReLU SAE does anyway.
  * The remaining levels are rank segments of one sort: segment s holds ranks [k_{s-1}, k_s).
    Only positive entries are kept (the sorted prefix), so the work is the number of active
    entries below the largest partial level, not B * k.
  * `SegmentDecode` sums each row's bag of decoder rows in one segment with `embedding_bag`; each
    level's reconstruction is the previous one plus its segment, so autograd hands each segment
    the suffix sum of the level gradients. Its backward uses per-entry dot products (or one GEMM
    for a large segment) for the activations and one feature-sorted `embedding_bag` for W_dec:
    no dense decoder pass per level.
  * On a GPU, segments at least DENSE_DECODE_FRACTION of d_sae wide are decoded by
    `DenseSegmentDecode` instead: a scatter into one (B, d_sae) buffer and GEMMs (tensor cores beat
    gathers there); the buffer is rebuilt in backward rather than kept.
Extra memory: the (B, K) sort, index arrays of the active entries below K, one (B, d_in)
reconstruction per level, and (dense segments) one transient (B, d_sae) buffer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from .base import reconstruction_loss, soft_cap


@dataclass
class NestedSelection:
    """One descending sort shared by the partial levels.

    partial: levels (k values) computed from the sorted prefix, increasing.
    values, indices: the top-K pre-activations per row, K = max(partial) (empty when none).
    Levels of the k-list not in `partial` equal the full ReLU level exactly.
    """

    partial: list[int]
    values: torch.Tensor
    indices: torch.Tensor


@torch.no_grad()
def nested_selection(hidden_pre: torch.Tensor, k_list: list[int]) -> NestedSelection:
    d_sae = hidden_pre.shape[-1]
    n_pos = int((hidden_pre > 0).sum(dim=-1).max()) if hidden_pre.numel() else 0
    partial = [k for k in k_list if k < min(n_pos, d_sae)]
    if partial:
        values, indices = hidden_pre.topk(partial[-1], dim=-1, sorted=True)
    else:
        values = hidden_pre.new_empty(hidden_pre.shape[0], 0)
        indices = torch.empty(hidden_pre.shape[0], 0, dtype=torch.long, device=hidden_pre.device)
    return NestedSelection(partial, values, indices)


def nested_level_activations(
    hidden_pre: torch.Tensor, k_list: list[int], cap: float | None
) -> list[torch.Tensor]:
    """Dense z_i for every level (the reference path), from the shared selection."""
    sel = nested_selection(hidden_pre, k_list)
    full = soft_cap(hidden_pre.relu(), cap)
    levels = []
    for k in k_list:
        if k in sel.partial:
            idx = sel.indices[:, :k]
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


#: a segment whose mean active count per row exceeds this fraction of d_sae gets its activation
#: gradient from one dense GEMM (dY_s W^T, then a gather) instead of per-entry dot products; the
#: break-even measured with benchmarks/train_step.py on CPU (2 cores, 768 -> 6144) is about 1/8.
DENSE_SEGMENT_FRACTION = 1 / 8

#: a rank segment at least this fraction of d_sae wide is decoded densely (`DenseSegmentDecode`:
#: scatter into a (B, d_sae) buffer, GEMMs forward and backward) instead of gathered
#: (`SegmentDecode`); keyed by (device type, autocast on). Measured with benchmarks/train_step.py
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
    autocast = _autocast_state(device_type) is not None
    key = (device_type, autocast) if (device_type, autocast) in DENSE_DECODE_FRACTION else ("cuda", autocast)
    return DENSE_DECODE_FRACTION[key]


def _autocast_state(device_type: str) -> torch.dtype | None:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


class DenseSegmentDecode(torch.autograd.Function):
    """Y = S W with S[b, idx[b, j]] = c[b, j] for one rank segment of width w (idx unique per row).

    S is a (B, d_sae) buffer built by a scatter in forward and rebuilt in backward, so nothing of
    size B x d_sae is kept between them. Entries with c = 0 (past a row's positives) add nothing,
    and their gradient is stopped by the ReLU that made them. The GEMMs follow the caller's
    autocast, in forward and in backward.
    """

    @staticmethod
    def forward(ctx, c, idx, W):  # type: ignore[override]
        ctx.autocast = _autocast_state(W.device.type)
        ctx.save_for_backward(c, idx, W)
        S = c.new_zeros(c.shape[0], W.shape[0]).scatter_(1, idx, c)
        return S @ W

    @staticmethod
    def backward(ctx, dY):  # type: ignore[override]
        c, idx, W = ctx.saved_tensors
        dc = dW = None
        with torch.autocast(W.device.type, dtype=ctx.autocast or torch.bfloat16,
                            enabled=ctx.autocast is not None):
            if ctx.needs_input_grad[0]:
                dc = (dY @ W.T).gather(1, idx).to(c.dtype)
            if ctx.needs_input_grad[2]:
                S = c.new_zeros(c.shape[0], W.shape[0]).scatter_(1, idx, c)
                dW = (S.T @ dY).to(W.dtype)
        return dc, None, dW


class SegmentDecode(torch.autograd.Function):
    """Y[b] = sum_{j in bag b} c_j W[idx_j] for one rank segment; bag b holds `counts[b]` entries.

    forward: one embedding_bag. backward: dc_j = W[idx_j] . dY[b] as per-entry dot products (the
    native per-sample-weights gradient) or, for a segment with many entries per row, one dense
    GEMM dY W^T and a gather (see DENSE_SEGMENT_FRACTION); dW[f] = sum_{j: idx_j = f} c_j dY[bag(j)]
    as one embedding_bag over dY with the entries grouped by feature.
    """

    @staticmethod
    def forward(ctx, c, idx, W, counts):  # type: ignore[override]
        offsets = _exclusive_cumsum(counts)
        bag_of = torch.repeat_interleave(torch.arange(counts.numel(), device=idx.device), counts)
        ctx.dense = idx.numel() > DENSE_SEGMENT_FRACTION * W.shape[0] * counts.numel()
        ctx.save_for_backward(c, idx, W, offsets, bag_of)
        return F.embedding_bag(idx, W, offsets, mode="sum", per_sample_weights=c)

    @staticmethod
    def backward(ctx, dY):  # type: ignore[override]
        c, idx, W, offsets, bag_of = ctx.saved_tensors
        dY = dY.contiguous()
        dc = dW = None
        if ctx.needs_input_grad[0]:
            if ctx.dense:
                dc = (dY @ W.T)[bag_of, idx]
            else:
                dc = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                    dY, W, idx, offsets, bag_of, 0, -1
                )
        if ctx.needs_input_grad[2]:
            order = torch.argsort(idx)
            per_feature = torch.bincount(idx, minlength=W.shape[0])
            dW = F.embedding_bag(bag_of[order], dY, _exclusive_cumsum(per_feature), mode="sum",
                                 per_sample_weights=c[order])
        return dc, None, dW, None


def _gathered_segment(c: torch.Tensor, indices: torch.Tensor, n_pos: torch.Tensor, lo: int, k: int,
                      W: torch.Tensor) -> torch.Tensor:
    """SegmentDecode of ranks [lo, k), keeping only each row's active (positive) entries."""
    seg_c, seg_idx = c[:, lo:k], indices[:, lo:k]
    counts = (n_pos.clamp(max=k) - lo).clamp_min(0)
    if bool((counts == k - lo).all()):  # every entry of the segment is active
        return SegmentDecode.apply(seg_c.reshape(-1), seg_idx.reshape(-1), W, counts)
    keep = torch.arange(lo, k, device=c.device) < n_pos[:, None]
    return SegmentDecode.apply(seg_c[keep], seg_idx[keep], W, counts)


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
    sel = nested_selection(hidden_pre, k_list)
    full_out = None
    if any(k not in sel.partial for k in k_list):
        full_out = (soft_cap(hidden_pre.relu(), cap) @ W_dec + b_dec).to(hidden_pre.dtype)

    partial_out: dict[int, torch.Tensor] = {}
    if sel.partial:
        c = soft_cap(hidden_pre.gather(-1, sel.indices).relu(), cap)  # sorted, descending
        n_pos = (sel.values > 0).sum(dim=-1)  # positives are a prefix of the sort
        W = W_dec.to(c.dtype)
        recon = b_dec.to(c.dtype)
        dense_from = dense_decode_fraction(c.device.type) * W.shape[0]
        lo = 0
        for k in sel.partial:  # level k = level before + the rank segment [lo, k)
            if k - lo >= dense_from:
                segment = DenseSegmentDecode.apply(c[:, lo:k], sel.indices[:, lo:k], W)
            else:
                segment = _gathered_segment(c, sel.indices, n_pos, lo, k, W)
            recon = recon + segment
            partial_out[k] = recon
            lo = k

    outputs = [partial_out[k] if k in partial_out else full_out for k in k_list]
    full_loss = reconstruction_loss(full_out, x, recon_loss) if full_out is not None else None
    level_losses = [reconstruction_loss(partial_out[k], x, recon_loss) if k in partial_out else full_loss
                    for k in k_list]
    return _combine(level_losses, alphas, normalize_by_alpha_sum), level_losses, outputs  # type: ignore[return-value]
