"""The MSAE loss (section 3.2, eq. 2) in two forms that compute the same math.

    z_i = cap(ReLU(TopK_{k_i}(pre))),   x_hat_i = z_i W_dec + b_dec,   L = sum_i alpha_i l(x, x_hat_i)

`nested_topk_loss_reference` decodes every level densely, one GEMM per level: the tests' oracle.

`nested_topk_loss` is the form training uses:
  * One ranking serves every level. The top-k sets are nested, so level k_i holds the first k_i
    features of one descending top-k of the pre-activations, and each partial level is the level
    below plus one rank segment, ranks [k_{i-1}, k_i).
  * A level whose k is at least the batch's largest number of positive pre-activations equals the
    full ReLU level (its top-k keeps every positive entry), so one GEMM decodes all such levels.
    Reading that number is the step's one host-device synchronisation: it sizes the top-k by the
    data (at initialisation half the latents are positive and the top two levels of the paper's
    k-list are the full level; in a trained SAE only a fifth are, and so are the top three).
  * A segment narrower than `gather_width` is summed by `embedding_bag` from its decoder rows (on a
    CPU cheaper than a GEMM over every latent); a wider one is scattered into a (batch, d_sae)
    buffer and multiplied.
  * The (batch, d_sae) side (the activation, the ranked gather, the wide segments and the full
    level) is one autograd function, `_Activate`, whose backward writes one activation gradient
    and adds the rest into it in place; autograd differentiates everything else.
Entries of a segment past a row's positives have z = 0: they add nothing and the ReLU stops their
gradient, so every row keeps the same layout and nothing is masked.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from .base import reconstruction_loss, soft_cap


class Selection(NamedTuple):
    """The ranking the partial levels share."""

    partial: list[int]
    """The levels decoded from the ranking: those with k below the batch's largest count of positive
    pre-activations (the others equal the full ReLU level)."""
    indices: torch.Tensor
    """(batch, K) int64, K = max(partial) (0 without partial levels): each row's K largest
    pre-activations' features, in descending order."""


def max_positive(hidden_pre: torch.Tensor) -> int:
    """The batch's largest number of positive pre-activations in a row. Reading it is a host-device
    synchronisation (and under torch.compile a graph break): the training step does it once."""
    return int((hidden_pre > 0).sum(-1, dtype=torch.int32).max()) if hidden_pre.shape[0] else 0


def select(hidden_pre: torch.Tensor, k_list: list[int], n_max: int | None = None) -> Selection:
    """One top-k for every partial level of the k-list; `n_max` is `max_positive(hidden_pre)`."""
    pre = hidden_pre.detach()
    batch, d_sae = pre.shape
    n_max = max_positive(pre) if n_max is None else n_max
    partial = [k for k in k_list if k < min(n_max, d_sae)]
    if not partial:
        return Selection([], torch.empty(batch, 0, dtype=torch.long, device=pre.device))
    return Selection(partial, pre.topk(partial[-1], dim=-1, sorted=True).indices)


class NestedLoss(NamedTuple):
    loss: torch.Tensor
    """sum_i alpha_i l(x, x_hat_i), divided by sum(alpha) when asked."""
    level_losses: list[torch.Tensor]
    """l(x, x_hat_i) for each level of the k-list."""
    sae_out: torch.Tensor
    """The last level's reconstruction, x_hat_h (with d_sae last in the k-list, the full ReLU level:
    the inference SAE's output)."""
    feature_acts: torch.Tensor
    """cap(ReLU(pre)), the full level's activations, detached."""


def _combine(level_losses: list[torch.Tensor], alphas: list[float], normalize: bool) -> torch.Tensor:
    loss = sum(a * level for a, level in zip(alphas, level_losses))
    return loss / sum(alphas) if normalize else loss  # type: ignore[return-value]


def nested_topk_loss_reference(
    x: torch.Tensor,
    hidden_pre: torch.Tensor,
    sel: Selection,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    k_list: list[int],
    alphas: list[float],
    cap: float | None = None,
    recon_loss: Literal["mse", "nmse"] = "mse",
    normalize_by_alpha_sum: bool = False,
) -> NestedLoss:
    """Eq. 2 as written: each level's activations as a dense (batch, d_sae) tensor, one decode each."""
    z = soft_cap(hidden_pre.relu(), cap)
    level_losses, x_hat = [], z
    for k in k_list:
        if k in sel.partial:
            idx = sel.indices[:, :k]
            z_k = torch.zeros_like(z).scatter(1, idx, z.gather(1, idx))
        else:  # top-k keeps every positive entry: the full level
            z_k = z
        x_hat = z_k @ W_dec + b_dec
        level_losses.append(reconstruction_loss(x_hat, x, recon_loss))
    return NestedLoss(_combine(level_losses, alphas, normalize_by_alpha_sum), level_losses, x_hat, z.detach())


#: a rank segment narrower than this fraction of d_sae is decoded by `embedding_bag`, a wider one
#: by a GEMM, per device type. On a CPU (two cores, 768 -> 6144, batch 4096, benchmarks/
#: profile_step.py) a gathered segment costs about a millisecond per entry a row, forward and
#: backward, and a multiplied one three GEMMs (about 300 ms): gathering pays up to a twentieth of
#: the width. On a GPU a GEMM runs on tensor cores and a gather is bound by memory: every segment
#: goes by GEMM there.
GATHER_FRACTION = {"cpu": 1 / 20}


def gather_width(device: torch.device, d_sae: int) -> float:
    """The width below which a rank segment is gathered rather than multiplied (`GATHER_FRACTION`)."""
    return GATHER_FRACTION.get(device.type, 0.0) * d_sae


def decode_segment(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor, gather: bool) -> torch.Tensor:
    """sum_j values[b, j] W_dec[indices[b, j]] for each row b: (batch, d_in)."""
    batch, width = indices.shape
    if gather:
        offsets = torch.arange(0, batch * width, width, device=indices.device)
        return F.embedding_bag(indices.reshape(-1), W_dec, offsets, mode="sum",
                               per_sample_weights=values.reshape(-1).to(W_dec.dtype))
    dense = torch.zeros(batch, W_dec.shape[0], dtype=values.dtype, device=values.device)
    return dense.scatter_(1, indices, values) @ W_dec


def _gemm_dtype(t: torch.Tensor, W: torch.Tensor) -> torch.dtype:
    """The dtype the GEMMs run in: autocast's where it is on (bf16), else the weights'."""
    dev = t.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else W.dtype


class _Activate(torch.autograd.Function):
    """z = cap(ReLU(pre)) and what comes of it on the (batch, d_sae) side: the ranked values
    z[b, indices[b]], the wide rank segments' decodes and the full level's z W_dec.

    Its backward writes one (batch, d_sae) gradient, the full level's GEMM, and adds the rest into
    it in place (the ranked values' gradients and each wide segment's), then applies the activation's
    derivative in place; the wide segments share one scatter buffer. Autograd through the same ops
    allocates a (batch, d_sae) tensor for each scatter, each wide segment's activation gradient, the
    ranked gather's gradient and the ReLU's, and keeps every wide segment's scatter until the
    backward (docs/performance.md: the same time, and 530 MiB less peak at 768 -> 6144 with every
    segment by GEMM, as on a GPU)."""

    @staticmethod
    def forward(ctx, pre, W_dec, indices, wide, cap, full):
        z = soft_cap(pre.relu(), cap)
        values = z.gather(1, indices)
        dt = _gemm_dtype(z, W_dec)
        W, outs, buf = W_dec.to(dt), [], None
        for lo, hi in wide:
            buf = torch.zeros(z.shape, dtype=dt, device=z.device) if buf is None else buf
            buf.scatter_(1, indices[:, lo:hi], values[:, lo:hi].to(dt))
            outs.append(buf @ W)
            buf.scatter_(1, indices[:, lo:hi], 0.0)
        if full:
            outs.append(z.to(dt) @ W)
        ctx.save_for_backward(z, W_dec, indices, values)
        ctx.wide, ctx.cap, ctx.full, ctx.dt = wide, cap, full, dt
        ctx.mark_non_differentiable(z)
        ctx.set_materialize_grads(False)
        return z, values, *outs

    @staticmethod
    def backward(ctx, _grad_z, grad_values, *grad_outs):
        z, W_dec, indices, values = ctx.saved_tensors
        W = W_dec.to(ctx.dt)
        grad_W = torch.zeros_like(W_dec) if ctx.needs_input_grad[1] else None
        grad_full = grad_outs[-1] if ctx.full else None
        if grad_full is not None:
            g = grad_full.to(ctx.dt)
            grad_z = (g @ W.T).to(z.dtype)
            if grad_W is not None:
                grad_W += z.to(ctx.dt).T @ g
        else:
            grad_z = torch.zeros_like(z)
        if grad_values is not None:
            grad_z.scatter_add_(1, indices, grad_values)
        buf = None
        for (lo, hi), g in zip(ctx.wide, grad_outs):
            if g is None:
                continue
            idx, g = indices[:, lo:hi], g.to(ctx.dt)
            if grad_W is not None:
                buf = torch.zeros(z.shape, dtype=ctx.dt, device=z.device) if buf is None else buf.zero_()
                grad_W += buf.scatter_(1, idx, values[:, lo:hi].to(ctx.dt)).T @ g
            # this segment's gradient at every latent (one GEMM), of which its own entries are taken
            buf = torch.mm(g, W.T, out=buf) if buf is not None else g @ W.T
            grad_z.scatter_add_(1, idx, buf.gather(1, idx).to(z.dtype))
        if ctx.cap is not None:  # d/dpre c tanh(pre / c) = 1 - (z / c)^2
            grad_z.mul_(1 - (z / ctx.cap).square())
        # the ReLU's, in place: autograd's own relu backward, writing into its gradient
        torch.ops.aten.threshold_backward.grad_input(grad_z, z, 0.0, grad_input=grad_z)
        return grad_z, grad_W, None, None, None, None


def nested_topk_loss(
    x: torch.Tensor,
    hidden_pre: torch.Tensor,
    sel: Selection,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    k_list: list[int],
    alphas: list[float],
    cap: float | None = None,
    recon_loss: Literal["mse", "nmse"] = "mse",
    normalize_by_alpha_sum: bool = False,
) -> NestedLoss:
    """The reference's loss, level losses and output with one top-k and one GEMM for the full level
    (module docstring). Under bf16 autocast the GEMMs run in bf16; the selection, the gathers and
    the losses stay float32."""
    if hidden_pre.dtype in (torch.float16, torch.bfloat16):  # from autocast's GEMM: gather and sum in float32
        hidden_pre = hidden_pre.float()
    spans = list(zip([0, *sel.partial], sel.partial))  # each partial level's rank segment
    narrow = gather_width(hidden_pre.device, W_dec.shape[0])
    wide = [(lo, hi) for lo, hi in spans if hi - lo >= narrow]
    full_needed = len(sel.partial) < len(k_list)  # some level is the full one: one GEMM serves all of them
    z, values, *outs = _Activate.apply(hidden_pre, W_dec, sel.indices, wide, cap, full_needed)
    decoded = dict(zip(wide, outs))
    widths = [hi - lo for lo, hi in spans]  # one split: its backward is one concatenation
    partial_out, recon, full, full_loss = {}, b_dec, None, None
    for (lo, hi), k, v, idx in zip(spans, sel.partial, values.split(widths, 1), sel.indices.split(widths, 1)):
        segment = decoded[(lo, hi)] if (lo, hi) in decoded else decode_segment(v, idx, W_dec, gather=True)
        recon = recon + segment  # the level below + its segment
        partial_out[k] = recon
    if full_needed:
        full = outs[-1] + b_dec
        full_loss = reconstruction_loss(full, x, recon_loss)
    level_losses = [reconstruction_loss(partial_out[k], x, recon_loss) if k in partial_out else full_loss
                    for k in k_list]
    sae_out = partial_out[k_list[-1]] if k_list[-1] in partial_out else full
    return NestedLoss(_combine(level_losses, alphas, normalize_by_alpha_sum), level_losses, sae_out, z)
