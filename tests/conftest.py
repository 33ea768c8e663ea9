import os

import numpy as np
import pytest

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import msae_ext  # noqa: E402,F401  (registers the architectures)


@pytest.fixture
def embeddings(tmp_path):
    """A small train / eval pair of 'CLIP-like' embeddings: offset mean, anisotropic, float32."""
    rng = np.random.default_rng(0)
    d = 16
    basis = rng.normal(size=(d, d)).astype(np.float32)
    x = (rng.normal(size=(2600, d)).astype(np.float32) @ basis) * 0.5 + 3.0
    train, evalx = tmp_path / "train.npy", tmp_path / "eval.npy"
    np.save(train, x[:2048])
    np.save(evalx, x[2048:])
    return train, evalx, x
