"""Matryoshka BatchTopK (Bussmann et al. 2025; sae-lens's `matryoshka_batchtopk`), trained with the
paper's protocol, `architecture: matryoshka`.

Nesting by latent prefix, where MSAE nests by the number of active latents: BatchTopK selects the
activations once, and each prefix of the latents (the first `prefixes[i]`) must reconstruct the
input on its own,

    L = sum_i ||x - (z[:, :w_i] W_dec[:w_i] + b_dec)||^2,   w_1 < ... < w_m = d_sae

so early latents learn what is common (the authors report much less feature absorption). The
selection, its threshold and the inference protocols are BatchTopK's (`batchtopk.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from typing_extensions import override

from sae_lens.saes.sae import SAEConfig, TrainStepInput, TrainStepOutput

from .base import reconstruction_loss
from .batchtopk import BatchTopKSAEConfig, BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig


def default_prefixes(d_sae: int, levels: int = 5) -> list[int]:
    """d_sae / 16, d_sae / 8, ..., d_sae: each level twice as wide as the one before."""
    return sorted({max(1, d_sae >> i) for i in range(levels)})


@dataclass
class MatryoshkaSAEConfig(BatchTopKSAEConfig):
    prefixes: list[int] | None = None

    @override
    @classmethod
    def architecture(cls) -> str:
        return "msae_matryoshka"


@dataclass
class MatryoshkaTrainingSAEConfig(BatchTopKTrainingSAEConfig):
    prefixes: list[int] | None = None  # None: default_prefixes(d_sae)

    def __post_init__(self) -> None:
        super().__post_init__()
        widths = [int(w) for w in self.prefixes] if self.prefixes else default_prefixes(self.d_sae)
        if any(b <= a for a, b in zip(widths, widths[1:])) or widths[0] <= 0 or widths[-1] != self.d_sae:
            raise ValueError(f"prefixes must increase strictly from above 0 to d_sae={self.d_sae}, got {widths}")
        self.prefixes = widths

    @override
    @classmethod
    def architecture(cls) -> str:
        return "msae_matryoshka"

    @override
    def get_inference_config_class(self) -> type[SAEConfig]:
        return MatryoshkaSAEConfig


class MatryoshkaTrainingSAE(BatchTopKTrainingSAE):
    cfg: MatryoshkaTrainingSAEConfig  # type: ignore[assignment]

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        output = super().training_forward_pass(step_input)  # the full width's loss, the threshold update
        z, x = output.feature_acts, step_input.sae_in
        decoded, start = self.b_dec, 0
        for width in self.cfg.prefixes[:-1]:  # each prefix adds its block of latents to the one before
            decoded = decoded + z[:, start:width] @ self.W_dec[start:width]
            start = width
            inner = reconstruction_loss(self.run_time_activation_norm_fn_out(decoded), x, self.cfg.recon_loss)
            output.losses[f"recon_loss_{width}"] = inner
            output.loss = output.loss + inner
        return output


def reference_loss(sae: MatryoshkaTrainingSAE, x: torch.Tensor) -> torch.Tensor:
    """The same loss by one dense decode per prefix (the tests' oracle)."""
    z, _ = sae.encode_with_hidden_pre(x)
    total = reconstruction_loss(sae.decode(z), x, sae.cfg.recon_loss)
    for width in sae.cfg.prefixes[:-1]:
        masked = torch.zeros_like(z)
        masked[:, :width] = z[:, :width]
        total = total + reconstruction_loss(sae.decode(masked), x, sae.cfg.recon_loss)
    return total
