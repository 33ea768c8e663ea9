"""BatchTopK SAE (Bussmann et al. 2024) trained with the paper's protocol.

sae-lens's `BatchTopK` activation module is reused: k * batch_size activations kept over the
flattened batch. A global threshold is tracked during training (EMA of the smallest kept
activation, as sae-lens does) and saved, so the usual protocol (`set_protocol("native")`) is a
JumpReLU with that threshold; the paper's protocol is ReLU only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from typing_extensions import override

from sae_lens.saes.batchtopk_sae import BatchTopK
from sae_lens.saes.sae import SAEConfig, TrainStepInput, TrainStepOutput

from .base import PaperSAEConfig, PaperTrainingSAE, PaperTrainingSAEConfig
from .topk import auxk_loss


@dataclass
class BatchTopKSAEConfig(PaperSAEConfig):
    k: float = 64
    threshold: float = 0.0

    @override
    @classmethod
    def architecture(cls) -> str:
        return "msae_batchtopk"

    @override
    def native_overrides(self) -> dict[str, Any]:
        return {"inference_threshold": float(self.threshold)}


@dataclass
class BatchTopKTrainingSAEConfig(PaperTrainingSAEConfig):
    k: float = 64
    threshold: float = 0.0
    topk_threshold_lr: float = 0.01
    aux_loss_coefficient: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.k <= self.d_sae:
            raise ValueError(f"k must lie in (0, d_sae={self.d_sae}], got {self.k}")
        super().__post_init__()

    @override
    @classmethod
    def architecture(cls) -> str:
        return "msae_batchtopk"

    @override
    def get_inference_config_class(self) -> type[SAEConfig]:
        return BatchTopKSAEConfig


class BatchTopKTrainingSAE(PaperTrainingSAE):
    cfg: BatchTopKTrainingSAEConfig  # type: ignore[assignment]
    topk_threshold: torch.Tensor

    def __init__(self, cfg, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self.batch_topk = BatchTopK(cfg.k)
        self.register_buffer(
            "topk_threshold", torch.tensor(float(cfg.threshold), dtype=torch.float64, device=self.device)
        )

    @override
    def training_activation(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        return self.batch_topk(hidden_pre)

    @override
    def calculate_aux_loss(self, step_input, feature_acts, hidden_pre, sae_out):
        return auxk_loss(self, step_input, hidden_pre, sae_out, self.cfg.aux_loss_coefficient)

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        output = super().training_forward_pass(step_input)
        self._update_threshold(output.feature_acts)
        output.metrics["topk_threshold"] = float(self.topk_threshold)
        return output

    @torch.no_grad()
    def _update_threshold(self, feature_acts: torch.Tensor) -> None:
        positive = feature_acts[feature_acts > 0]
        if positive.numel():
            smallest = positive.min().double()
            if self.cfg.soft_cap is not None:
                # The threshold lives on the pre-cap scale (JumpReLU compares pre-activations);
                # the cap is monotonic, so the smallest kept pre-activation is atanh of this.
                smallest = self.cfg.soft_cap * torch.atanh(smallest / self.cfg.soft_cap)
            lr = self.cfg.topk_threshold_lr
            self.topk_threshold.mul_(1 - lr).add_(lr * smallest)
        self.cfg.threshold = float(self.topk_threshold)

    @override
    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        self.cfg.threshold = float(self.topk_threshold)
        state_dict.pop("topk_threshold", None)
