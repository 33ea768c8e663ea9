"""The paper's SAE family, one file per architecture, registered with sae-lens.

Registered names (sae-lens `architecture` in cfg.json):
    msae            Matryoshka SAE, per-sample nested TopK (this paper)
    msae_relu       ReLU + the paper's L1 penalty
    msae_topk       TopK
    msae_batchtopk  BatchTopK
The runner's short names map onto them: msae, relu, topk, batchtopk.
"""

from __future__ import annotations

from sae_lens.registry import (
    SAE_CLASS_REGISTRY,
    SAE_TRAINING_CLASS_REGISTRY,
    register_sae_class,
    register_sae_training_class,
)

from .base import PaperSAE, PaperSAEConfig, PaperTrainingSAE, PaperTrainingSAEConfig, soft_cap
from .batchtopk import BatchTopKSAEConfig, BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from .msae import (
    MSAEConfig,
    MSAETrainingSAE,
    MSAETrainingSAEConfig,
    nested_topk_loss_reference,
    resolve_alphas,
    resolve_k_list,
)
from .relu import ReLUSAEConfig, ReLUTrainingSAE, ReLUTrainingSAEConfig
from .topk import TopKSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig

#: runner name -> (sae-lens architecture, inference config, training SAE, training config)
ARCHITECTURES = {
    "msae": ("msae", MSAEConfig, MSAETrainingSAE, MSAETrainingSAEConfig),
    "relu": ("msae_relu", ReLUSAEConfig, ReLUTrainingSAE, ReLUTrainingSAEConfig),
    "topk": ("msae_topk", TopKSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig),
    "batchtopk": ("msae_batchtopk", BatchTopKSAEConfig, BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig),
}


def register_all() -> None:
    """Register every architecture with sae-lens; safe to call more than once."""
    for name, inference_cfg, training_sae, training_cfg in ARCHITECTURES.values():
        if name not in SAE_CLASS_REGISTRY:
            register_sae_class(name, PaperSAE, inference_cfg)
        if name not in SAE_TRAINING_CLASS_REGISTRY:
            register_sae_training_class(name, training_sae, training_cfg)


def training_classes(architecture: str):
    """(training SAE class, training config class) for a runner name such as 'msae' or 'topk'."""
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"unknown architecture {architecture!r}; expected one of {sorted(ARCHITECTURES)}"
        )
    _, _, sae_cls, cfg_cls = ARCHITECTURES[architecture]
    return sae_cls, cfg_cls


__all__ = [
    "ARCHITECTURES",
    "BatchTopKSAEConfig",
    "BatchTopKTrainingSAE",
    "BatchTopKTrainingSAEConfig",
    "MSAEConfig",
    "MSAETrainingSAE",
    "MSAETrainingSAEConfig",
    "PaperSAE",
    "PaperSAEConfig",
    "PaperTrainingSAE",
    "PaperTrainingSAEConfig",
    "ReLUSAEConfig",
    "ReLUTrainingSAE",
    "ReLUTrainingSAEConfig",
    "TopKSAEConfig",
    "TopKTrainingSAE",
    "TopKTrainingSAEConfig",
    "nested_topk_loss_reference",
    "register_all",
    "resolve_alphas",
    "resolve_k_list",
    "soft_cap",
    "training_classes",
]
