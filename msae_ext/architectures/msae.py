"""Matryoshka SAE (section 3.2): per-sample nested TopK over a k-list, weighted sum of level losses.

    z_i = ReLU(TopK_{k_i}(W_enc (x - b_pre) + b_enc)),   x_hat_i = W_dec z_i + b_pre
    L(x) = sum_i alpha_i ||x - x_hat_i||^2          (optionally divided by sum_i alpha_i)

The top-k sets are nested because every level takes a prefix of one descending sort. The last
level is d_sae itself, where TopK is the identity and z_h = ReLU(pre) is exactly the inference
activation. This is the paper's per-sample nested k, not sae-lens's `matryoshka_batchtopk`
(Bussmann et al.: fixed latent-prefix groups with a global batch top-k).

The loss itself lives in `nested_topk.py`: the form training uses (one top-k, one GEMM for the
full level) and the per-level reference it is tested against (`nested_impl` picks one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from typing_extensions import override

from sae_lens.saes.sae import SAEConfig, TrainStepInput, TrainStepOutput

from .base import PaperSAEConfig, PaperTrainingSAE, PaperTrainingSAEConfig
from .nested_topk import nested_topk_loss, nested_topk_loss_reference, select


def resolve_k_list(d_sae: int, k_list: list[int] | None = None, k_min: int = 64) -> list[int]:
    """The k-list: explicit, or powers of two from k_min doubling while below d_sae, then d_sae.

    d_sae=6144, k_min=64 -> [64, 128, 256, 512, 1024, 2048, 4096, 6144].
    """
    if k_list is not None:
        if any(isinstance(k, bool) or int(k) != k for k in k_list):
            raise ValueError(f"k_list values must be integers, got {list(k_list)}")
        ks = [int(k) for k in k_list]
        if not ks:
            raise ValueError("k_list is empty")
        if any(b <= a for a, b in zip(ks, ks[1:])):
            raise ValueError(f"k_list must be strictly increasing, got {ks}")
        if ks[0] < 1 or ks[-1] > d_sae:
            raise ValueError(f"k_list values must lie in [1, d_sae={d_sae}], got {ks}")
        return ks
    if isinstance(k_min, bool) or int(k_min) != k_min or k_min < 1:
        raise ValueError(f"k_min must be a positive integer, got {k_min}")
    ks = []
    k = k_min
    while k < d_sae:
        ks.append(k)
        k *= 2
    ks.append(d_sae)
    return ks


def resolve_alphas(
    n_levels: int, weighting: Literal["rw", "uw"] = "rw", alphas: list[float] | None = None
) -> list[float]:
    """Level weights: explicit, UW (all 1) or RW (alpha_i = h - i + 1, largest on the smallest k)."""
    if alphas is not None:
        a = [float(v) for v in alphas]
        if len(a) != n_levels:
            raise ValueError(f"alphas has {len(a)} values but the k-list has {n_levels} levels")
        if any(v < 0 for v in a) or sum(a) <= 0:
            raise ValueError(f"alphas must be non-negative with a positive sum, got {a}")
        return a
    if weighting == "uw":
        return [1.0] * n_levels
    if weighting == "rw":
        return [float(n_levels - i) for i in range(n_levels)]
    raise ValueError(f"unknown weighting {weighting!r}; expected 'rw', 'uw' or explicit alphas")


@dataclass
class MSAEConfig(PaperSAEConfig):
    """Inference config of the Matryoshka SAE: ReLU only unless inference_k is set."""

    k_list: list[int] = field(default_factory=list)

    @override
    @classmethod
    def architecture(cls) -> str:
        return "msae"


@dataclass
class MSAETrainingSAEConfig(PaperTrainingSAEConfig):
    """Training config of the Matryoshka SAE (section 3.2).

    k_list: explicit levels; if None, built from k_min (see resolve_k_list) at construction.
    weighting: 'rw' (alpha_i = h - i + 1) or 'uw' (alpha_i = 1); `alphas` overrides both.
    normalize_by_alpha_sum: divide the weighted sum by sum(alpha) as the authors' code does.
    nested_impl: 'fused' (one top-k and one GEMM for the full level, see nested_topk.py) or
        'reference' (one dense decode per level). Same loss and gradients; the reference is the oracle.
    """

    k_list: list[int] | None = None
    k_min: int = 64
    weighting: Literal["rw", "uw"] = "rw"
    alphas: list[float] | None = None
    normalize_by_alpha_sum: bool = False
    nested_impl: Literal["fused", "reference"] = "fused"

    def __post_init__(self) -> None:
        if self.nested_impl not in ("fused", "reference"):
            raise ValueError(f"nested_impl must be 'fused' or 'reference', got {self.nested_impl!r}")
        self.k_list = resolve_k_list(self.d_sae, self.k_list, self.k_min)
        self.alphas = resolve_alphas(len(self.k_list), self.weighting, self.alphas)
        super().__post_init__()

    @override
    @classmethod
    def architecture(cls) -> str:
        return "msae"

    @override
    def get_inference_config_class(self) -> type[SAEConfig]:
        return MSAEConfig


class MSAETrainingSAE(PaperTrainingSAE):
    cfg: MSAETrainingSAEConfig  # type: ignore[assignment]

    @override
    def training_activation(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        # Outside the training loss (e.g. sae-lens's firing statistics) the MSAE is its last,
        # full-width level: ReLU only.
        return hidden_pre.relu()

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        x = step_input.sae_in
        hidden_pre = self.hidden_pre(x)
        # the step's one host-device synchronisation, here rather than in a nested call so that
        # torch.compile breaks the graph once: it sizes the top-k by the batch (nested_topk.py)
        n_max = int((hidden_pre > 0).sum(-1, dtype=torch.int32).max())
        sel = select(hidden_pre, self.cfg.k_list, n_max)  # type: ignore[arg-type]
        loss_fn = nested_topk_loss if self.cfg.nested_impl == "fused" else nested_topk_loss_reference
        out = loss_fn(x, hidden_pre, sel, self.W_dec, self.b_dec, self.cfg.k_list, self.cfg.alphas,  # type: ignore[arg-type]
                      cap=self.cfg.soft_cap, recon_loss=self.cfg.recon_loss,
                      normalize_by_alpha_sum=self.cfg.normalize_by_alpha_sum)
        losses: dict[str, Any] = {"recon_loss": out.loss}
        for k, level_loss in zip(self.cfg.k_list, out.level_losses):  # type: ignore[arg-type]
            losses[f"level_{k}"] = level_loss.detach()
        return TrainStepOutput(sae_in=x, sae_out=out.sae_out, feature_acts=out.feature_acts,
                               hidden_pre=hidden_pre, loss=out.loss, losses=losses)
