"""JumpReLU SAE (Rajamanoharan et al. 2024) trained through this package's runner.

    z_j = h_j * 1[h_j > theta_j],   h = W_enc (x - b_dec) + b_enc
    loss = ||x - x_hat||^2 + lambda * mean_b sum_j 1[h_j > theta_j]

sae-lens's own JumpReLU and Step autograd functions (straight-through estimators with a
rectangle kernel of width `jumprelu_bandwidth`) give the threshold its gradient, as in sae-lens's
JumpReLUTrainingSAE; lambda is `l0_coefficient`, warmed up over `l0_warm_up_steps`. The thresholds
are one learned parameter per latent, kept non-negative and in float32. The paper's authors
reported JumpReLU no better than ReLU (reviews, appendix); `recipes/sweeps` trace its L0 against
lambda. At inference the paper's protocol is ReLU only; the native one keeps the thresholds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from typing_extensions import override

from sae_lens.saes.jumprelu_sae import JumpReLU, Step
from sae_lens.saes.sae import SAEConfig, TrainCoefficientConfig, TrainStepInput, TrainStepOutput

from .base import PaperSAE, PaperSAEConfig, PaperTrainingSAE, PaperTrainingSAEConfig, soft_cap


@dataclass
class JumpReLUSAEConfig(PaperSAEConfig):
    use_threshold: bool = False  # the native protocol: gate each latent at its learned threshold

    @override
    @classmethod
    def architecture(cls) -> str:
        return "msae_jumprelu"

    @override
    def native_overrides(self) -> dict[str, Any]:
        return {"use_threshold": True}


class JumpReLUPaperSAE(PaperSAE):
    """Inference: PaperSAE with the learned per-latent thresholds for the native protocol."""

    threshold: nn.Parameter

    @override
    def initialize_weights(self) -> None:
        super().initialize_weights()
        self.threshold = nn.Parameter(torch.zeros(self.cfg.d_sae, dtype=torch.float32, device=self.device))

    @override
    def activate(self, hidden_pre: torch.Tensor, k: int | None = None) -> torch.Tensor:
        if k is None and self.cfg.inference_k is None and getattr(self.cfg, "use_threshold", False):
            gated = hidden_pre * (hidden_pre > self.threshold.to(hidden_pre.dtype))
            return soft_cap(gated.relu(), self.cfg.soft_cap)
        return super().activate(hidden_pre, k)


@dataclass
class JumpReLUTrainingSAEConfig(PaperTrainingSAEConfig):
    l0_coefficient: float = 1.0
    l0_warm_up_steps: int = 0
    # Inputs are scaled to norm sqrt(d_in) (section 3), so pre-activations are O(1): a threshold
    # starting at 0.1 with a rectangle 0.1 wide lets L0 follow l0_coefficient within a few thousand
    # steps (sae-lens's defaults, 0.01 and 0.05, barely move it in that time)
    jumprelu_init_threshold: float = 0.1
    jumprelu_bandwidth: float = 0.1
    use_threshold: bool = False  # the inference config's protocol switch, off as saved

    def __post_init__(self) -> None:
        if not self.l0_coefficient >= 0:
            raise ValueError(f"l0_coefficient must be >= 0, got {self.l0_coefficient}")
        if not self.jumprelu_bandwidth > 0 or not self.jumprelu_init_threshold >= 0:
            raise ValueError("jumprelu_bandwidth must be positive and jumprelu_init_threshold >= 0")
        super().__post_init__()

    @override
    @classmethod
    def architecture(cls) -> str:
        return "msae_jumprelu"

    @override
    def get_inference_config_class(self) -> type[SAEConfig]:
        return JumpReLUSAEConfig


class JumpReLUTrainingSAE(PaperTrainingSAE):
    cfg: JumpReLUTrainingSAEConfig  # type: ignore[assignment]
    threshold: nn.Parameter

    def __init__(self, cfg: JumpReLUTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        # float32 whatever the SAE's dtype: Adam's lr-sized steps on the threshold round away in bfloat16
        self.threshold = nn.Parameter(torch.full((cfg.d_sae,), float(cfg.jumprelu_init_threshold),
                                                 dtype=torch.float32, device=self.device))

    @override
    def training_activation(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        return JumpReLU.apply(hidden_pre, self.threshold.to(hidden_pre.dtype), self.cfg.jumprelu_bandwidth, False)

    @override
    def calculate_aux_loss(self, step_input: TrainStepInput, feature_acts, hidden_pre, sae_out):
        l0 = Step.apply(hidden_pre, self.threshold.to(hidden_pre.dtype), self.cfg.jumprelu_bandwidth, False).sum(-1)
        coefficient = step_input.coefficients.get("l0", self.cfg.l0_coefficient)  # the trainer warms it up
        return {"l0_loss": (coefficient * l0).mean()}

    @override
    def get_coefficients(self) -> dict[str, float | TrainCoefficientConfig]:
        return {"l0": TrainCoefficientConfig(value=self.cfg.l0_coefficient, warm_up_steps=self.cfg.l0_warm_up_steps)}

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        with torch.no_grad():  # below zero the gate would pass negative pre-activations
            self.threshold.data.clamp_(min=0.0)
        return super().training_forward_pass(step_input)
