"""Per-modality preprocessing statistics (paper-recipe, "Data and preprocessing").

For modality m: mu_m = mean of the *training* split, s_m = sqrt(n) / E||x - mu_m||, so that
E||s_m (x - mu_m)|| = sqrt(n). The SAE works on s_m (x - mu_m); reconstructions are mapped back
with x = y / s_m + mu_m. The statistics belong to the trained SAE: they are written into its
cfg.json metadata (key `msae_normalization`) and applied by modality at inference.

Not the authors' code: it divides by E||x - mu||^2 (no square root) and recomputes the statistics
on every evaluation file; both are bugs we do not reproduce.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .fileio import write_text_atomic
from .store import EmbeddingDataError, EmbeddingSource, finite_blocks, iter_blocks

METADATA_KEY = "msae_normalization"
#: where `msae export` keeps statistics it folded into the weights (never applied again)
FOLDED_METADATA_KEY = "msae_folded_normalization"
MODALITIES = ("image", "text")


@dataclass
class ModalityStats:
    mean: torch.Tensor  # (d_in,) float32
    scale: float
    n_rows: int
    source: str = ""

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """CLIP space -> SAE input space."""
        return (x - self.mean.to(x.device, x.dtype)) * self.scale

    def invert(self, y: torch.Tensor) -> torch.Tensor:
        """SAE input space -> CLIP space."""
        return y / self.scale + self.mean.to(y.device, y.dtype)

    def to_dict(self) -> dict[str, Any]:
        # float32 -> Python float is exact, and JSON round-trips Python floats exactly.
        return {
            "mean": [float(v) for v in self.mean.tolist()],
            "scale": float(self.scale),
            "n_rows": int(self.n_rows),
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModalityStats":
        return cls(
            mean=torch.tensor(d["mean"], dtype=torch.float32),
            scale=float(d["scale"]),
            n_rows=int(d.get("n_rows", 0)),
            source=str(d.get("source", "")),
        )


def compute_stats(source: EmbeddingSource, block_rows: int = 65536) -> ModalityStats:
    """Mean and scale of a training split in two streamed passes (float64 accumulation).

    The first pass also rejects NaN/inf rows, naming how many and the first index.
    """
    total = np.zeros(source.d_in, np.float64)
    for _, block in finite_blocks(source, block_rows):
        total += block.sum(axis=0, dtype=np.float64)
    mean = total / source.n_rows
    norm_sum = 0.0
    for _, block in iter_blocks(source, block_rows):
        norm_sum += float(np.linalg.norm(block.astype(np.float64) - mean, axis=1).sum())
    mean_norm = norm_sum / source.n_rows
    if not mean_norm > 0:
        raise EmbeddingDataError(f"{source.description}: all rows are identical; the scale is undefined")
    return ModalityStats(
        mean=torch.from_numpy(mean.astype(np.float32)),
        scale=math.sqrt(source.d_in) / mean_norm,
        n_rows=source.n_rows,
        source=source.description,
    )


def stats_to_metadata(stats: dict[str, ModalityStats]) -> dict[str, Any]:
    return {modality: s.to_dict() for modality, s in stats.items()}


def stats_from_metadata(metadata: Any) -> dict[str, ModalityStats]:
    raw = metadata.get(METADATA_KEY) if metadata is not None else None
    return {m: ModalityStats.from_dict(d) for m, d in (raw or {}).items()}


def identity_stats(d_in: int) -> ModalityStats:
    return ModalityStats(mean=torch.zeros(d_in), scale=1.0, n_rows=0, source="identity")


def get_stats(sae: Any, modality: str) -> ModalityStats:
    """The statistics of `modality` saved with an SAE, or a clear error.

    An SAE written by `msae export` has its modality's statistics folded into the weights and
    takes raw embeddings: it gets the identity for that modality.
    """
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
    folded = sae.cfg.metadata.get(FOLDED_METADATA_KEY) or {}
    if modality in folded:
        return identity_stats(sae.cfg.d_in)
    stats = stats_from_metadata(sae.cfg.metadata)
    if modality not in stats:
        have = sorted(stats) or "none"
        raise EmbeddingDataError(
            f"this SAE has no '{modality}' normalisation statistics (it has: {have}); compute them on that "
            f"modality's training split and attach them before using {modality} data: "
            f"`msae stats --sae SAE_DIR --modality {modality} --data CACHE`, or msae_ext.attach_stats"
        )
    return stats[modality]


def attach_stats(sae: Any, modality: str, stats: ModalityStats) -> None:
    """Store a modality's statistics in the SAE's metadata (saved in cfg.json)."""
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
    if stats.mean.shape != (sae.cfg.d_in,):
        raise EmbeddingDataError(
            f"{modality} statistics have dimension {tuple(stats.mean.shape)}, the SAE has d_in={sae.cfg.d_in}"
        )
    current = dict(sae.cfg.metadata.get(METADATA_KEY) or {})
    current[modality] = stats.to_dict()
    sae.cfg.metadata[METADATA_KEY] = current


def attach_stats_to_folder(sae_dir: Any, modality: str, stats: ModalityStats) -> Any:
    """Attach a modality's statistics to a saved SAE folder: its cfg.json metadata, rewritten
    atomically (the paper: an image-trained SAE reads text with the text statistics)."""
    path = Path(sae_dir) / "cfg.json"
    if not path.exists():
        raise EmbeddingDataError(f"{sae_dir}: no cfg.json; not a saved SAE folder")
    cfg = json.loads(path.read_text())
    if int(cfg["d_in"]) != stats.mean.shape[0]:
        raise EmbeddingDataError(
            f"{stats.source}: {modality} embeddings have dimension {stats.mean.shape[0]}, the SAE has d_in={cfg['d_in']}"
        )
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
    metadata = cfg.setdefault("metadata", {}) or {}
    cfg["metadata"] = metadata
    current = dict(metadata.get(METADATA_KEY) or {})
    current[modality] = stats.to_dict()
    metadata[METADATA_KEY] = current
    write_text_atomic(path, json.dumps(cfg, indent=2))
    return path
