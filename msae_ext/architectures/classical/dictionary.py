"""Sparse dictionary learning (scikit-learn's MiniBatchDictionaryLearning), `architecture: dictionary`.

A dictionary D (d_sae unit rows) is learnt with an L1 penalty `alpha` on the codes; codes are
non-negative (`positive_code`), as an SAE's are, so each atom is a direction with a magnitude:

    encode: z = argmin_{z >= 0} ||x - z D||^2 / 2 + transform_alpha ||z||_1   (sparse_encode, lasso_lars;
            the same call the fitted model's transform makes)
    decode: x_hat = z D

`transform_alpha` (default: `alpha`) is the sparsity knob at encoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from typing_extensions import override

from . import Batches, ClassicalSAE, ClassicalSAEConfig, ClassicalTrainingConfig, Method, Sample


@dataclass
class DictionarySAEConfig(ClassicalSAEConfig):
    transform_alpha: float = 1.0

    @classmethod
    def architecture(cls) -> str:
        return "msae_dictionary"


class DictionarySAE(ClassicalSAE):
    cfg: DictionarySAEConfig  # type: ignore[assignment]

    @override
    def code(self, x: np.ndarray) -> np.ndarray:
        from sklearn.decomposition import sparse_encode

        D = self.W_dec.detach().cpu().double().numpy()
        return sparse_encode(x, D, algorithm="lasso_lars", alpha=self.cfg.transform_alpha, positive=True)


@dataclass
class DictionaryTrainingConfig(ClassicalTrainingConfig):
    alpha: float = 1.0
    transform_alpha: float | None = None  # None: alpha

    def __post_init__(self) -> None:
        self.transform_alpha = float(self.alpha if self.transform_alpha is None else self.transform_alpha)
        super().__post_init__()

    @classmethod
    def architecture(cls) -> str:
        return "msae_dictionary"


def fit(cfg: DictionaryTrainingConfig, batches: Batches, sample: Sample, epochs: int,
        seed: int) -> dict[str, torch.Tensor]:
    from sklearn.decomposition import MiniBatchDictionaryLearning

    model = MiniBatchDictionaryLearning(n_components=cfg.d_sae, alpha=cfg.alpha, positive_code=True, fit_algorithm="cd",
                                        transform_algorithm="lasso_lars", random_state=seed)
    for epoch in range(epochs):
        for x in batches(epoch):
            model.partial_fit(x)
    return {"W_dec": torch.from_numpy(model.components_), "b_dec": torch.zeros(cfg.d_in, dtype=torch.float64)}


METHOD = Method(DictionarySAE, DictionarySAEConfig, DictionaryTrainingConfig, fit)
