"""k-means (scikit-learn's MiniBatchKMeans), `architecture: kmeans`, as a one-hot code.

d_sae centroids c_j; each row is coded by its nearest centroid:

    encode: z = one_hot(argmin_j ||x - c_j||^2)     (the fitted model's predict)
    decode: x_hat = z C = c_{argmin}                 (the centroid it is assigned to)

so every row has exactly one active latent (L0 = 1) of magnitude 1. The nearest centroid is
argmax_j (x . c_j - ||c_j||^2 / 2), a linear score: W_enc = C^T and b_enc = -||c_j||^2 / 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from typing_extensions import override

from . import Batches, ClassicalSAE, ClassicalSAEConfig, ClassicalTrainingConfig, Method, Sample


@dataclass
class KMeansSAEConfig(ClassicalSAEConfig):
    @classmethod
    def architecture(cls) -> str:
        return "msae_kmeans"


class KMeansSAE(ClassicalSAE):
    @override
    def code(self, x: np.ndarray) -> np.ndarray:
        p = self.numpy_params()
        best = (x @ p["W_enc"] + p["b_enc"]).argmax(axis=1)
        z = np.zeros((len(x), self.cfg.d_sae))
        z[np.arange(len(x)), best] = 1.0
        return z


@dataclass
class KMeansTrainingConfig(ClassicalTrainingConfig):
    @classmethod
    def architecture(cls) -> str:
        return "msae_kmeans"


def fit(cfg: KMeansTrainingConfig, batches: Batches, sample: Sample, epochs: int, seed: int) -> dict[str, torch.Tensor]:
    from sklearn.cluster import MiniBatchKMeans

    model = MiniBatchKMeans(n_clusters=cfg.d_sae, random_state=seed, n_init=1)
    model.partial_fit(sample(4 * cfg.d_sae))  # k-means++ seeding needs at least d_sae rows at once
    for epoch in range(epochs):
        for x in batches(epoch):
            model.partial_fit(x)
    C = model.cluster_centers_
    return {"W_dec": torch.from_numpy(C.copy()), "b_dec": torch.zeros(cfg.d_in, dtype=torch.float64),
            "W_enc": torch.from_numpy(C.T.copy()), "b_enc": torch.from_numpy(-0.5 * (C ** 2).sum(1))}


METHOD = Method(KMeansSAE, KMeansSAEConfig, KMeansTrainingConfig, fit)
