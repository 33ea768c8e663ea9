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
  * A segment is decoded by scattering it into a (batch, d_sae) buffer and one GEMM, or, when it is
    narrower than `gather_width`, by `embedding_bag` (a sum of its decoder rows, which on a CPU
    costs less than a GEMM over every latent). Autograd differentiates both.
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
    return int((hidden_pre > 0).sum(-1).max()) if hidden_pre.shape[0] else 0


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
#: backward, and a multiplied one three GEMMs (about 270 ms): gathering pays up to a twentieth of
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
    z = soft_cap(hidden_pre.relu(), cap)
    widths = [k - lo for lo, k in zip([0, *sel.partial], sel.partial)]
    # the ranked activations, one gather split into the rank segments (one gradient buffer for all)
    values = z.gather(1, sel.indices).split(widths, dim=1)
    narrow = gather_width(z.device, W_dec.shape[0])
    partial_out, recon, full, full_loss = {}, b_dec, None, None
    for k, v, idx in zip(sel.partial, values, sel.indices.split(widths, dim=1)):
        recon = recon + decode_segment(v, idx, W_dec, idx.shape[1] < narrow)  # the level below + its segment
        partial_out[k] = recon
    if len(sel.partial) < len(k_list):  # some level is the full one: a GEMM serves all of them
        full = z @ W_dec + b_dec
        full_loss = reconstruction_loss(full, x, recon_loss)
    level_losses = [reconstruction_loss(partial_out[k], x, recon_loss) if k in partial_out else full_loss
                    for k in k_list]
    sae_out = partial_out[k_list[-1]] if k_list[-1] in partial_out else full
    return NestedLoss(_combine(level_losses, alphas, normalize_by_alpha_sum), level_losses, sae_out, z.detach())
