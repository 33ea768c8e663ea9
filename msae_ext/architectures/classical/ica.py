"""Independent component analysis (scikit-learn's FastICA), `architecture: ica`.

ICA unmixes x into d_sae <= d_in independent components; it cannot be overcomplete, so a run
asks for `d_sae` up to d_in (expansion 1). FastICA has no mini-batch form: it is fitted on
`fit_rows` rows drawn at random from the training split. Its encoder is linear and its codes are
signed (no sparsity is imposed; ICA's components are sparse only as far as the data are):

    encode: z = (x - mean) @ unmixing^T          (the fitted model's transform)
    decode: x_hat = z @ mixing^T + mean          (its inverse_transform)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from typing_extensions import override

from . import Batches, ClassicalSAE, ClassicalSAEConfig, ClassicalTrainingConfig, Method, Sample


@dataclass
class ICASAEConfig(ClassicalSAEConfig):
    @classmethod
    def architecture(cls) -> str:
        return "msae_ica"


class ICASAE(ClassicalSAE):
    @override
    def code(self, x: np.ndarray) -> np.ndarray:
        p = self.numpy_params()
        return x @ p["W_enc"] + p["b_enc"]


@dataclass
class ICATrainingConfig(ClassicalTrainingConfig):
    max_iter: int = 400

    def __post_init__(self) -> None:
        if self.d_sae > self.d_in:
            raise ValueError(f"ICA has at most d_in={self.d_in} components, got d_sae={self.d_sae}; "
                             "set d_sae (or expansion_factor: 1)")
        super().__post_init__()

    @classmethod
    def architecture(cls) -> str:
        return "msae_ica"


def fit(cfg: ICATrainingConfig, batches: Batches, sample: Sample, epochs: int, seed: int) -> dict[str, torch.Tensor]:
    from sklearn.decomposition import FastICA

    model = FastICA(n_components=cfg.d_sae, whiten="unit-variance", max_iter=cfg.max_iter, random_state=seed)
    model.fit(sample(cfg.fit_rows))
    unmixing, mixing, mean = model.components_, model.mixing_, model.mean_
    return {"W_enc": torch.from_numpy(unmixing.T.copy()), "b_enc": torch.from_numpy(-mean @ unmixing.T),
            "W_dec": torch.from_numpy(mixing.T.copy()), "b_dec": torch.from_numpy(mean.copy())}


METHOD = Method(ICASAE, ICASAEConfig, ICATrainingConfig, fit)
