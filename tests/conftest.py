import os

import numpy as np
import pytest

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import msae_ext  # noqa: E402,F401  (registers the architectures)
from msae_ext.architectures import buffers  # noqa: E402


@pytest.fixture(autouse=True)
def pooled_buffers(monkeypatch):
    """Every test runs with the CPU buffer pool on for tensors of any size (in use it takes only
    tensors of MIN_BYTES and more, which the tests' small shapes never reach), so that a reuse of
    memory still referenced would show as a wrong result anywhere; each test starts with an empty pool."""
    buffers.release()
    monkeypatch.setattr(buffers, "MIN_BYTES", 0)
    yield
    buffers.release()


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
