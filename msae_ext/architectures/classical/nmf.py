"""Non-negative matrix factorisation (scikit-learn's MiniBatchNMF), `architecture: nmf`.

CLIP embeddings are signed, so each preprocessed row x is split into its positive and negative
parts, x+ = max(x, 0) and x- = max(-x, 0), a non-negative row of 2 d_in values with x = x+ - x-
(no information lost, no shift that depends on the data). NMF factorises the split rows as
[x+, x-] ~ z H with z, H >= 0. Then

    encode: z = argmin_{z >= 0} ||[x+, x-] - z H||^2 + penalty  (non_negative_factorization with H fixed)
    decode: x_hat = z (H[:, :d] - H[:, d:])                    (the split reconstruction, folded back)

`alpha_W` and `l1_ratio` are scikit-learn's penalty on the codes (their sparsity knob).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from typing_extensions import override

from . import Batches, ClassicalSAE, ClassicalSAEConfig, ClassicalTrainingConfig, Method, Sample


def split_signs(x: np.ndarray) -> np.ndarray:
    return np.concatenate([np.maximum(x, 0), np.maximum(-x, 0)], axis=1)


@dataclass
class NMFSAEConfig(ClassicalSAEConfig):
    alpha_W: float = 0.0
    l1_ratio: float = 1.0
    transform_max_iter: int = 500

    @classmethod
    def architecture(cls) -> str:
        return "msae_nmf"


class NMFSAE(ClassicalSAE):
    cfg: NMFSAEConfig  # type: ignore[assignment]

    @override
    def initialize_weights(self) -> None:
        super().initialize_weights()
        self.H = nn.Parameter(torch.zeros(self.cfg.d_sae, 2 * self.cfg.d_in, dtype=self.dtype, device=self.device))

    @override
    def code(self, x: np.ndarray) -> np.ndarray:
        from sklearn.decomposition import non_negative_factorization

        H = self.H.detach().cpu().double().numpy()
        z, _, _ = non_negative_factorization(split_signs(x), H=H, n_components=self.cfg.d_sae, update_H=False,
                                             solver="cd", alpha_W=self.cfg.alpha_W, l1_ratio=self.cfg.l1_ratio,
                                             max_iter=self.cfg.transform_max_iter, tol=1e-6)
        return z


@dataclass
class NMFTrainingConfig(ClassicalTrainingConfig):
    alpha_W: float = 0.0
    l1_ratio: float = 1.0
    transform_max_iter: int = 500

    @classmethod
    def architecture(cls) -> str:
        return "msae_nmf"


def fit(cfg: NMFTrainingConfig, batches: Batches, sample: Sample, epochs: int, seed: int) -> dict[str, torch.Tensor]:
    from sklearn.decomposition import MiniBatchNMF

    model = MiniBatchNMF(n_components=cfg.d_sae, alpha_W=cfg.alpha_W, alpha_H=0.0, l1_ratio=cfg.l1_ratio,
                         init="random", random_state=seed)
    for epoch in range(epochs):
        for x in batches(epoch):
            model.partial_fit(split_signs(x))
    H, d = model.components_, cfg.d_in
    return {"H": torch.from_numpy(H), "W_dec": torch.from_numpy(H[:, :d] - H[:, d:]),
            "b_dec": torch.zeros(d, dtype=torch.float64)}


METHOD = Method(NMFSAE, NMFSAEConfig, NMFTrainingConfig, fit)
