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
from typing import Any

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
    transform_alpha: float | None = None

    @classmethod
    def architecture(cls) -> str:
        return "msae_dictionary"


def fit(options: dict[str, Any], d_in: int, d_sae: int, batches: Batches, sample: Sample, epochs: int,
        seed: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from sklearn.decomposition import MiniBatchDictionaryLearning

    alpha = float(options.get("alpha", 1.0))
    model = MiniBatchDictionaryLearning(n_components=d_sae, alpha=alpha, positive_code=True, fit_algorithm="cd",
                                        transform_algorithm="lasso_lars", random_state=seed)
    for epoch in range(epochs):
        for x in batches(epoch):
            model.partial_fit(x)
    transform_alpha = options.get("transform_alpha")
    fields = {"transform_alpha": float(alpha if transform_alpha is None else transform_alpha)}
    weights = {"W_dec": torch.from_numpy(model.components_), "b_dec": torch.zeros(d_in, dtype=torch.float64)}
    return fields, weights


METHOD = Method(DictionarySAE, DictionarySAEConfig, DictionaryTrainingConfig, fit)
