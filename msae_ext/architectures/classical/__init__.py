"""Classical dictionary baselines (the reviewers' request): NMF, sparse dictionary learning, ICA and
k-means, fitted with scikit-learn and saved as sae-lens SAE folders.

Each is fitted by `msae train` on the same stream of preprocessed batches as the SAEs (the
training split's mean and scale of section 3 applied), by scikit-learn's mini-batch `partial_fit`
(NMF, dictionary learning, k-means) or on a random sample of `fit_rows` rows (ICA, whose
FastICA has no mini-batch form), and saved as an SAE whose decode is linear,

    x_hat = z @ W_dec + b_dec,

and whose encode is the fitted model's own coding step, computed with scikit-learn's public
functions (one file per method says which). So evaluation, concept naming (decoder directions)
and search work on it as on any SAE of this package. Codes are computed on the CPU in float64 and
carry no gradient: these SAEs are for analysis, not for further training.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields

import numpy as np
import torch
from typing_extensions import override

from sae_lens.saes.sae import SAE, SAEConfig, TrainingSAEConfig

Batches = Callable[[int], Iterator[np.ndarray]]  # epoch -> its preprocessed training batches, in order
Sample = Callable[[int], np.ndarray]  # n random preprocessed training rows


@dataclass
class ClassicalSAEConfig(SAEConfig):
    """Inference config: the coding step's settings, copied from the training config."""

    @classmethod
    def architecture(cls) -> str:  # pragma: no cover - each method names itself
        raise NotImplementedError


class ClassicalSAE(SAE[ClassicalSAEConfig]):
    """x_hat = z @ W_dec + b_dec; z = `code(x)`, the fitted model's coding step (subclasses)."""

    def __init__(self, cfg: ClassicalSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)

    @override
    def initialize_weights(self) -> None:
        super().initialize_weights()
        self.b_enc = torch.nn.Parameter(torch.zeros(self.cfg.d_sae, dtype=self.dtype, device=self.device))

    def code(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @override
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.cfg.d_in)
        z = self.code(flat.detach().cpu().double().numpy())
        z = torch.from_numpy(np.ascontiguousarray(z)).to(device=x.device, dtype=x.dtype)
        return self.hook_sae_acts_post(z.reshape(*x.shape[:-1], self.cfg.d_sae))

    @override
    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        return self.hook_sae_recons(feature_acts @ self.W_dec + self.b_dec)

    def numpy_params(self) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().double().numpy() for k, v in self.state_dict().items()}


@dataclass
class ClassicalTrainingConfig(TrainingSAEConfig):
    """What a run config may set for a classical method (its options); subclasses add their own."""

    fit_rows: int = 100_000  # rows sampled for methods fitted on a sample (ICA)

    @classmethod
    def architecture(cls) -> str:  # pragma: no cover
        raise NotImplementedError


@dataclass(frozen=True)
class Method:
    """A classical method: its inference classes and its fitting function.

    fit(training config, batches, sample, epochs, seed) -> the SAE's weights.
    """

    inference_sae: type[ClassicalSAE]
    inference_config: type[ClassicalSAEConfig]
    training_config: type[ClassicalTrainingConfig]
    fit: Callable[..., dict[str, torch.Tensor]]


def build_sae(method: Method, cfg: ClassicalTrainingConfig, weights: dict[str, torch.Tensor]) -> ClassicalSAE:
    """The inference SAE holding a fitted model; its coding settings are the training config's."""
    coding = {f.name: getattr(cfg, f.name) for f in fields(method.inference_config)
              if f.name not in {g.name for g in fields(SAEConfig)}}
    cfg = method.inference_config(d_in=cfg.d_in, d_sae=cfg.d_sae, dtype="float32", device="cpu", **coding)
    sae = method.inference_sae(cfg)
    state = {k: v.float() for k, v in weights.items()}
    missing = set(sae.state_dict()) - set(state)
    for name in missing:  # parameters a method does not use stay zero
        state[name] = torch.zeros_like(sae.state_dict()[name])
    sae.load_state_dict(state)
    return sae
