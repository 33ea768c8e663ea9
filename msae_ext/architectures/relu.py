"""ReLU SAE with the paper's L1 penalty (section 3.1; the authors' form of the L1 term).

    loss = ||x - x_hat||^2 + lambda * mean_b( sum_j |z_j| / ||x|| )

Decoder rows are kept at unit norm by the trainer, so no decoder-norm weighting of |z| is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from typing_extensions import override

from sae_lens.saes.sae import SAEConfig, TrainStepInput

from .base import PaperSAEConfig, PaperTrainingSAE, PaperTrainingSAEConfig


def paper_l1_penalty(feature_acts: torch.Tensor, sae_in: torch.Tensor) -> torch.Tensor:
    """mean over the batch of sum_j |z_j| / ||x||."""
    return (feature_acts.abs().sum(dim=-1) / sae_in.norm(dim=-1).clamp_min(1e-12)).mean()


@dataclass
class ReLUSAEConfig(PaperSAEConfig):
    @override
    @classmethod
    def architecture(cls) -> str:
        return "msae_relu"


@dataclass
class ReLUTrainingSAEConfig(PaperTrainingSAEConfig):
    l1_coefficient: float = 0.003

    @override
    @classmethod
    def architecture(cls) -> str:
        return "msae_relu"

    @override
    def get_inference_config_class(self) -> type[SAEConfig]:
        return ReLUSAEConfig


class ReLUTrainingSAE(PaperTrainingSAE):
    cfg: ReLUTrainingSAEConfig  # type: ignore[assignment]

    @override
    def training_activation(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        return hidden_pre.relu()

    @override
    def calculate_aux_loss(self, step_input: TrainStepInput, feature_acts, hidden_pre, sae_out):
        return {"l1_loss": self.cfg.l1_coefficient * paper_l1_penalty(feature_acts, step_input.sae_in)}
