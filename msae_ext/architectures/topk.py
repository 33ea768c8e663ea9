"""TopK SAE (Gao et al. 2025) trained with the paper's protocol.

sae-lens's `TopK` activation module is reused. The AuxK dead-latent loss of Gao et al. is available
(`aux_loss_coefficient`, via sae-lens's helper) but off by default: the paper does not use it.
At inference the paper removes the top-k (ReLU only); `set_protocol("native")` keeps it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from typing_extensions import override

from sae_lens.saes.sae import SAEConfig, TrainStepInput
from sae_lens.saes.topk_sae import TopK, calculate_topk_aux_acts

from .base import PaperSAEConfig, PaperTrainingSAE, PaperTrainingSAEConfig


@dataclass
class TopKSAEConfig(PaperSAEConfig):
    k: int = 64

    @override
    @classmethod
    def architecture(cls) -> str:
        return "msae_topk"

    @override
    def native_overrides(self) -> dict[str, Any]:
        return {"inference_k": int(self.k)}


@dataclass
class TopKTrainingSAEConfig(PaperTrainingSAEConfig):
    k: int = 64
    aux_loss_coefficient: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or int(self.k) != self.k or not 1 <= self.k <= self.d_sae:
            raise ValueError(f"k must be an integer in [1, d_sae={self.d_sae}], got {self.k}")
        super().__post_init__()

    @override
    @classmethod
    def architecture(cls) -> str:
        return "msae_topk"

    @override
    def get_inference_config_class(self) -> type[SAEConfig]:
        return TopKSAEConfig


def auxk_loss(sae: PaperTrainingSAE, step_input: TrainStepInput, hidden_pre, sae_out, coefficient):
    """Gao et al.'s AuxK: the top dead latents reconstruct the residual (sae-lens's helper)."""
    mask = step_input.dead_neuron_mask
    if coefficient == 0 or mask is None or int(mask.sum()) == 0:
        return {}
    k_aux = min(sae.cfg.d_in // 2, int(mask.sum()))
    acts = calculate_topk_aux_acts(k_aux=k_aux, hidden_pre=hidden_pre, dead_neuron_mask=mask)
    residual = (step_input.sae_in - sae_out).detach()
    loss = (acts @ sae.W_dec - residual).pow(2).sum(-1).mean()
    scale = min(int(mask.sum()) / (sae.cfg.d_in // 2), 1.0)
    return {"auxk_loss": coefficient * scale * loss}


class TopKTrainingSAE(PaperTrainingSAE):
    cfg: TopKTrainingSAEConfig  # type: ignore[assignment]

    def __init__(self, cfg, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self.topk = TopK(int(cfg.k))

    @override
    def training_activation(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        return self.topk(hidden_pre)

    @override
    def calculate_aux_loss(self, step_input, feature_acts, hidden_pre, sae_out):
        return auxk_loss(self, step_input, hidden_pre, sae_out, self.cfg.aux_loss_coefficient)
