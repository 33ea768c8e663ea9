"""The paper's SAE family, one file per architecture, registered with sae-lens.

Each architecture is one `Architecture` entry below: its runner name (the `architecture:` key of a
run config), its sae-lens name (`architecture` in cfg.json), its classes and the paper's learning
rate. Its options are the fields its training config declares (k, k_list, weighting, ...): a run
config's other keys (`msae_ext.config`). Adding an architecture means adding its file and an entry.
The classical baselines (`classical/`) are entries too, with a scikit-learn method that the
runner fits instead of training.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from sae_lens.registry import (
    SAE_CLASS_REGISTRY,
    SAE_TRAINING_CLASS_REGISTRY,
    register_sae_class,
    register_sae_training_class,
)
from sae_lens.saes.sae import TrainingSAEConfig

from .base import PaperSAE, PaperSAEConfig, PaperTrainingSAE, PaperTrainingSAEConfig, soft_cap
from .classical import ClassicalSAE, Method, build_sae
from .classical import dictionary as _dictionary
from .classical import ica as _ica
from .classical import kmeans as _kmeans
from .classical import nmf as _nmf
from .batchtopk import BatchTopKSAEConfig, BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from .matryoshka import MatryoshkaSAEConfig, MatryoshkaTrainingSAE, MatryoshkaTrainingSAEConfig
from .matryoshka_topk import MatryoshkaTopKSAEConfig, MatryoshkaTopKTrainingSAE, MatryoshkaTopKTrainingSAEConfig
from .jumprelu import JumpReLUPaperSAE, JumpReLUSAEConfig, JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
from .msae import MSAEConfig, MSAETrainingSAE, MSAETrainingSAEConfig, resolve_alphas, resolve_k_list
from .nested_topk import nested_topk_loss, nested_topk_loss_reference
from .relu import ReLUSAEConfig, ReLUTrainingSAE, ReLUTrainingSAEConfig
from .topk import TopKSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig

#: training-config fields that are not options of a run: sae-lens's own (set by the runner) and
#: the inference protocol's (set at evaluation)
_NOT_OPTIONS = {f.name for f in fields(TrainingSAEConfig)} | {"inference_k", "inference_threshold", "use_threshold"}


@dataclass(frozen=True)
class Architecture:
    name: str  # the runner's name: `architecture: msae`
    sae_lens_name: str  # `architecture` in cfg.json
    inference_config: type
    training_sae: type[PaperTrainingSAE] | None  # None: fitted, not trained (`classical`)
    training_config: type
    lr: float  # the paper's learning rate (paper-recipe, Optimisation); unused by fitted methods
    inference_sae: type = PaperSAE  # the class cfg.json's architecture loads as
    classical: Method | None = None  # a scikit-learn method the runner fits instead of training

    def options(self) -> dict[str, Any]:
        """The architecture's run options and their defaults."""
        out = {}
        for f in fields(self.training_config):
            if f.name not in _NOT_OPTIONS:
                out[f.name] = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        return out


ARCHITECTURES = {a.name: a for a in (
    Architecture("msae", "msae", MSAEConfig, MSAETrainingSAE, MSAETrainingSAEConfig, 1e-4),
    Architecture("relu", "msae_relu", ReLUSAEConfig, ReLUTrainingSAE, ReLUTrainingSAEConfig, 5e-5),
    Architecture("topk", "msae_topk", TopKSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig, 5e-4),
    Architecture("batchtopk", "msae_batchtopk", BatchTopKSAEConfig, BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, 5e-4),
    Architecture("matryoshka", "msae_matryoshka", MatryoshkaSAEConfig, MatryoshkaTrainingSAE,
                 MatryoshkaTrainingSAEConfig, 5e-4),
    Architecture("matryoshka_topk", "msae_matryoshka_topk", MatryoshkaTopKSAEConfig, MatryoshkaTopKTrainingSAE,
                 MatryoshkaTopKTrainingSAEConfig, 5e-4),
    Architecture("jumprelu", "msae_jumprelu", JumpReLUSAEConfig, JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig, 5e-5,
                 JumpReLUPaperSAE),
    *(Architecture(name, m.inference_config.architecture(), m.inference_config, None, m.training_config, 0.0,
                   m.inference_sae, m)
      for name, m in (("nmf", _nmf.METHOD), ("dictionary", _dictionary.METHOD), ("ica", _ica.METHOD),
                      ("kmeans", _kmeans.METHOD))),
)}


def architecture(name: str) -> Architecture:
    """The registry entry of a runner name, or a clear error."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; expected one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def register_all() -> None:
    """Register every architecture with sae-lens; safe to call more than once."""
    for a in ARCHITECTURES.values():
        if a.sae_lens_name not in SAE_CLASS_REGISTRY:
            register_sae_class(a.sae_lens_name, a.inference_sae, a.inference_config)
        if a.training_sae is not None and a.sae_lens_name not in SAE_TRAINING_CLASS_REGISTRY:
            register_sae_training_class(a.sae_lens_name, a.training_sae, a.training_config)


register_all()

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "ClassicalSAE",
    "build_sae",
    "BatchTopKSAEConfig",
    "BatchTopKTrainingSAE",
    "BatchTopKTrainingSAEConfig",
    "JumpReLUPaperSAE",
    "JumpReLUSAEConfig",
    "JumpReLUTrainingSAE",
    "JumpReLUTrainingSAEConfig",
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
    "architecture",
    "nested_topk_loss",
    "nested_topk_loss_reference",
    "register_all",
    "resolve_alphas",
    "resolve_k_list",
    "soft_cap",
]
