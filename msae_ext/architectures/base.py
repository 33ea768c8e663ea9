"""What the paper's SAE family shares: eq. 1, the initialisation of section 3, soft-capping (appendix D).

Every architecture this package trains is
    z = act(W_enc (x - b_dec) + b_enc),   x_hat = W_dec z + b_dec
with sae-lens's names (b_dec is the paper's b_pre; W_dec rows are the paper's decoder columns).
Only `act` differs: ReLU (+ L1), TopK, BatchTopK, or the nested TopK of MSAE during training.

At inference every one of them is the same function family, `PaperSAE`:
    ReLU only (the paper's protocol), top-k at a chosen k, or a JumpReLU threshold (BatchTopK's
    usual protocol), followed by the optional soft cap c * tanh(z / c).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import override

from sae_lens.saes.sae import (
    SAE,
    SAEConfig,
    TrainCoefficientConfig,
    TrainingSAE,
    TrainingSAEConfig,
    TrainStepInput,
    TrainStepOutput,
)

Protocol = Literal["paper", "native"]
RECON_LOSSES = ("mse", "nmse")


def soft_cap(z: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Appendix D, eq. 4: z -> c tanh(z / c). Bounds ReLU activations to [0, c)."""
    return z if cap is None else cap * torch.tanh(z / cap)


def reconstruction_loss(x_hat: torch.Tensor, x: torch.Tensor, kind: Literal["mse", "nmse"]) -> torch.Tensor:
    """Batch mean of the per-sample error: ||x - x_hat||^2 (mse, the paper's L(x), section 3.1), or
    that divided by ||x||^2 (nmse, the normalised MSE the authors' code defaults to)."""
    if kind == "mse":  # one fused pass forward and one backward, no (batch, d_in) temporaries
        return F.mse_loss(x_hat, x, reduction="sum") / x[..., 0].numel()
    if kind != "nmse":
        raise ValueError(f"unknown recon_loss {kind!r}; expected one of {RECON_LOSSES}")
    return ((x_hat - x).pow(2).sum(dim=-1) / x.pow(2).sum(dim=-1).clamp_min(1e-12)).mean()


def topk_relu(hidden_pre: torch.Tensor, k: int) -> torch.Tensor:
    """ReLU(TopK_k(hidden_pre)): keep the k largest pre-activations per row, zero the rest."""
    if k >= hidden_pre.shape[-1]:
        return hidden_pre.relu()
    values, indices = hidden_pre.topk(k, dim=-1)
    return torch.zeros_like(hidden_pre).scatter(-1, indices, values.relu())


# --------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------


@dataclass
class PaperSAEConfig(SAEConfig):
    """Inference config shared by every architecture of this package.

    soft_cap: c of appendix D, or None.
    inference_k: keep only the top-k pre-activations at inference; None means ReLU only.
    inference_threshold: JumpReLU threshold at inference (BatchTopK's usual protocol); None = off.
    """

    soft_cap: float | None = None
    inference_k: int | None = None
    inference_threshold: float | None = None

    @classmethod
    def architecture(cls) -> str:  # pragma: no cover - abstract in spirit
        raise NotImplementedError

    def native_overrides(self) -> dict[str, Any]:
        """Config fields that give this architecture its own (training-time) activation."""
        return {}


class PaperSAE(SAE[PaperSAEConfig]):
    """Inference SAE for every architecture of this package (see module docstring)."""

    b_enc: nn.Parameter

    def __init__(self, cfg: PaperSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)

    @override
    def initialize_weights(self) -> None:
        super().initialize_weights()
        self.b_enc = nn.Parameter(torch.zeros(self.cfg.d_sae, dtype=self.dtype, device=self.device))

    def activate(self, hidden_pre: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """Inference activation: top-k if `k` (or cfg.inference_k) is set, else threshold, else ReLU."""
        k = k if k is not None else self.cfg.inference_k
        if k is not None:
            z = topk_relu(hidden_pre, int(k))
        elif self.cfg.inference_threshold is not None:
            z = hidden_pre.relu() * (hidden_pre > self.cfg.inference_threshold)
        else:
            z = hidden_pre.relu()
        return soft_cap(z, self.cfg.soft_cap)

    def encode_with_hidden_pre(self, x: torch.Tensor, k: int | None = None):
        hidden_pre = self.hook_sae_acts_pre(self.process_sae_in(x) @ self.W_enc + self.b_enc)
        return self.hook_sae_acts_post(self.activate(hidden_pre, k)), hidden_pre

    @override
    def encode(self, x: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """Latents of x (already in the SAE's input space). `k` gives top-k at any granularity."""
        return self.encode_with_hidden_pre(x, k)[0]

    @override
    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        sae_out = self.hook_sae_recons(feature_acts @ self.W_dec + self.b_dec)
        sae_out = self.run_time_activation_norm_fn_out(sae_out)
        return self.reshape_fn_out(sae_out, self.d_head)

    def set_protocol(self, protocol: Protocol) -> "PaperSAE":
        """'paper': ReLU only (top-k removed, the paper's evaluation protocol).
        'native': the architecture's own activation (top-k for TopK, threshold for BatchTopK)."""
        if protocol == "paper":
            self.cfg.inference_k = None
            self.cfg.inference_threshold = None
            for key in self.cfg.native_overrides():  # back to the dataclass default (off)
                setattr(self.cfg, key, type(self.cfg).__dataclass_fields__[key].default)
        elif protocol == "native":
            self.cfg.inference_k = None
            self.cfg.inference_threshold = None
            for key, value in self.cfg.native_overrides().items():
                setattr(self.cfg, key, value)
        else:
            raise ValueError(f"unknown protocol {protocol!r}; expected 'paper' or 'native'")
        return self


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@dataclass
class PaperTrainingSAEConfig(TrainingSAEConfig):
    """Training config shared by the architectures of this package.

    decoder_init_norm=0.1 with sae-lens's Kaiming-uniform decoder and W_enc = W_dec^T is exactly
    the paper's initialisation (section 3; b_dec = b_enc = 0).
    """

    soft_cap: float | None = None
    inference_k: int | None = None
    inference_threshold: float | None = None
    recon_loss: Literal["mse", "nmse"] = "mse"

    @classmethod
    def architecture(cls) -> str:  # pragma: no cover
        raise NotImplementedError

    def __post_init__(self) -> None:
        if self.soft_cap is not None and not self.soft_cap > 0:
            raise ValueError(f"soft_cap must be positive or None, got {self.soft_cap}")
        if self.recon_loss not in ("mse", "nmse"):
            raise ValueError(f"recon_loss must be 'mse' or 'nmse', got {self.recon_loss!r}")
        super().__post_init__()


class PaperTrainingSAE(TrainingSAE[PaperTrainingSAEConfig]):
    """Training SAE base: subclasses supply `training_activation` and, if any, an auxiliary loss."""

    b_enc: nn.Parameter

    @override
    def initialize_weights(self) -> None:
        super().initialize_weights()  # Kaiming-uniform W_dec, rows to norm 0.1, W_enc = W_dec^T
        self.b_enc = nn.Parameter(torch.zeros(self.cfg.d_sae, dtype=self.dtype, device=self.device))

    def training_activation(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @override
    def get_coefficients(self) -> dict[str, float | TrainCoefficientConfig]:
        return {}

    def hidden_pre(self, x: torch.Tensor) -> torch.Tensor:
        """W_enc (x - b_dec) + b_enc, after sae-lens's input hooks.

        In training, b_dec enters as the vector -b_dec W_enc: its gradient is then -(sum_b dpre) W_enc^T,
        a vector-matrix product, where autograd through (x - b_dec) W_enc would run a (batch, d_sae) by
        (d_sae, d_in) GEMM, a sixth in a step that needs five. The added term is exactly zero; x gets
        no gradient that way, so it is taken only when x needs none."""
        sae_in = self.process_sae_in(x)  # x - b_dec
        bias = self.b_enc
        if torch.is_grad_enabled() and self.cfg.apply_b_dec_to_input and not x.requires_grad:
            sae_in, bias = sae_in.detach(), bias + (self.b_dec.detach() - self.b_dec) @ self.W_enc
        if torch.is_autocast_enabled(x.device.type):  # the bf16 GEMM, then the float32 bias: float32 pre
            return self.hook_sae_acts_pre(sae_in @ self.W_enc + bias)
        return self.hook_sae_acts_pre(F.linear(sae_in, self.W_enc.T, bias))  # the bias in the GEMM's pass

    @override
    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_pre = self.hidden_pre(x)
        z = soft_cap(self.training_activation(hidden_pre), self.cfg.soft_cap)
        return self.hook_sae_acts_post(z), hidden_pre

    @override
    def calculate_aux_loss(
        self,
        step_input: TrainStepInput,
        feature_acts: torch.Tensor,
        hidden_pre: torch.Tensor,
        sae_out: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        return {}

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        feature_acts, hidden_pre = self.encode_with_hidden_pre(step_input.sae_in)
        sae_out = self.decode(feature_acts)
        recon = reconstruction_loss(sae_out, step_input.sae_in, self.cfg.recon_loss)
        aux = self.calculate_aux_loss(step_input, feature_acts, hidden_pre, sae_out)
        total = recon + sum(aux.values()) if aux else recon
        return TrainStepOutput(
            sae_in=step_input.sae_in,
            sae_out=sae_out,
            feature_acts=feature_acts,
            hidden_pre=hidden_pre,
            loss=total,
            losses={"recon_loss": recon, **aux},
        )
