"""Matryoshka TopK: nested by latent prefix and by k at once, with balanced level weights,
`architecture: matryoshka_topk` (msae_ext's hierarchical variant; the hierarchy benchmark in
docs/evaluate.md compares it with the paper's MSAE and the rest of the family).

Per-sample TopK keeps each row's k largest activations z (so L0 is k by construction, as TopK).
Besides the full reconstruction from z, inner levels must reconstruct x on their own:
  * latent prefixes w_1 < ... < w_p < d_sae (default d_sae/2 alone): z restricted to the first
    w_i latents (Bussmann et al. 2025). A parent feature lives in an early prefix, which has to
    rebuild it without the child's latent, so a child latent that absorbs its parent's direction
    is penalised. With `reselect` each prefix takes its own top-k among its latents, so a parent
    latent that the full level left off is selected there and learns to fire;
  * k levels k_1 < ... < k_m < k: each row's k_j largest entries of z (the paper's nesting by k,
    section 3.2), so the latents that lead a row explain most of it.

    L = l(x, x_hat) + inner_weight * mean_levels l(x, x_hat_level)

The inner levels share one weight (their mean, not their sum): narrow levels that together
outweigh the full one pull its latents towards mixtures of features ("feature hedging", Chanin
et al. 2025). Inference and the protocols are TopK's (`topk.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from typing_extensions import override

from sae_lens.saes.sae import SAEConfig, TrainStepInput, TrainStepOutput
from sae_lens.saes.topk_sae import TopK

from .base import reconstruction_loss, soft_cap
from .matryoshka import default_prefixes
from .nested_topk import decode_segment, gather_width
from .topk import TopKSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig


@dataclass
class MatryoshkaTopKSAEConfig(TopKSAEConfig):
    prefixes: list[int] = field(default_factory=list)
    k_levels: list[int] = field(default_factory=list)

    @override
    @classmethod
    def architecture(cls) -> str:
        return "msae_matryoshka_topk"


@dataclass
class MatryoshkaTopKTrainingSAEConfig(TopKTrainingSAEConfig):
    prefixes: list[int] | None = None  # None: d_sae/2, d_sae; [d_sae]: no prefix levels
    k_levels: list[int] = field(default_factory=list)  # inner k levels, each below k
    inner_weight: float = 1.0
    reselect: bool = False  # each prefix takes its own top-k among its latents (else the full level's, restricted)

    def __post_init__(self) -> None:
        super().__post_init__()
        widths = [int(w) for w in self.prefixes] if self.prefixes else default_prefixes(self.d_sae, levels=2)
        if any(b <= a for a, b in zip(widths, widths[1:])) or widths[0] <= 0 or widths[-1] != self.d_sae:
            raise ValueError(f"prefixes must increase strictly from above 0 to d_sae={self.d_sae}, got {widths}")
        ks = [int(k) for k in self.k_levels]
        if any(b <= a for a, b in zip(ks, ks[1:])) or (ks and (ks[0] < 1 or ks[-1] >= self.k)):
            raise ValueError(f"k_levels must increase strictly from 1 to below k={self.k}, got {ks}")
        if not self.inner_weight >= 0:
            raise ValueError(f"inner_weight must be non-negative, got {self.inner_weight}")
        self.prefixes, self.k_levels = widths, ks

    @override
    @classmethod
    def architecture(cls) -> str:
        return "msae_matryoshka_topk"

    @override
    def get_inference_config_class(self) -> type[SAEConfig]:
        return MatryoshkaTopKSAEConfig


class MatryoshkaTopKTrainingSAE(TopKTrainingSAE):
    cfg: MatryoshkaTopKTrainingSAEConfig  # type: ignore[assignment]

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        output = super().training_forward_pass(step_input)  # the full top-k loss (and AuxK)
        inner = self.inner_level_losses(output.feature_acts, step_input.sae_in, output.hidden_pre)
        if inner and self.cfg.inner_weight:
            for name, value in inner.items():
                output.losses[name] = value.detach()
            output.loss = output.loss + self.cfg.inner_weight * torch.stack(list(inner.values())).mean()
        return output

    def inner_level_losses(self, z: torch.Tensor, x: torch.Tensor, hidden_pre: torch.Tensor) -> dict[str, torch.Tensor]:
        """l(x, x_hat) of every prefix level and every k level, from the top-k activations z."""
        losses, decoded, start = {}, self.b_dec, 0
        out = self.run_time_activation_norm_fn_out
        for width in self.cfg.prefixes[:-1]:
            if self.cfg.reselect:  # the prefix as a TopK SAE of its own: a latent the full level left
                # off (its child's latent absorbed it) is selected here and learns to fire
                z_w = soft_cap(TopK(min(int(self.cfg.k), width))(hidden_pre[:, :width]), self.cfg.soft_cap)
                decoded_w = z_w @ self.W_dec[:width] + self.b_dec
            else:  # each prefix adds its block of latents to the one before
                decoded = decoded_w = decoded + z[:, start:width] @ self.W_dec[start:width]
                start = width
            losses[f"prefix_{width}"] = reconstruction_loss(out(decoded_w), x, self.cfg.recon_loss)
        if self.cfg.k_levels:  # each k level is the level below plus one rank segment of one sort
            ks = self.cfg.k_levels
            values, indices = z.topk(ks[-1], dim=-1, sorted=True)
            decoded, lo, narrow = self.b_dec, 0, gather_width(z.device, z.shape[1])
            for k in ks:
                decoded = decoded + decode_segment(values[:, lo:k], indices[:, lo:k], self.W_dec, k - lo < narrow)
                lo = k
                losses[f"k_{k}"] = reconstruction_loss(out(decoded), x, self.cfg.recon_loss)
        return losses


def reference_loss(sae: MatryoshkaTopKTrainingSAE, x: torch.Tensor) -> torch.Tensor:
    """The same loss by one dense decode per level (the tests' oracle)."""
    z, _ = sae.encode_with_hidden_pre(x)
    full = reconstruction_loss(sae.decode(z), x, sae.cfg.recon_loss)
    inner = []
    for width in sae.cfg.prefixes[:-1]:
        masked = torch.zeros_like(z)
        if sae.cfg.reselect:
            pre = sae.hidden_pre(x)[:, :width]
            idx = pre.topk(min(int(sae.cfg.k), width), dim=-1).indices
            masked[:, :width] = soft_cap(torch.zeros_like(pre).scatter(1, idx, pre.gather(1, idx)).relu(), sae.cfg.soft_cap)
        else:
            masked[:, :width] = z[:, :width]
        inner.append(reconstruction_loss(sae.decode(masked), x, sae.cfg.recon_loss))
    for k in sae.cfg.k_levels:
        keep = torch.zeros_like(z).scatter(1, z.topk(k, dim=-1).indices, 1.0)
        inner.append(reconstruction_loss(sae.decode(z * keep), x, sae.cfg.recon_loss))
    return full + sae.cfg.inner_weight * torch.stack(inner).mean() if inner else full
