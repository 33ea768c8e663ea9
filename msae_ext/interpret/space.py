"""The bridge between CLIP space and SAE space that every section-5 application uses.

    z  = SAE.encode(s_m (x - mu_m))           CLIP embedding -> concept magnitudes
    x' = SAE.decode(z') / s_m + mu_m          edited magnitudes -> CLIP embedding

Editing a concept (sections 5.2-5.3) sets or raises some entries of z and decodes. By default the
SAE's reconstruction error is carried along (sae-lens's `use_error_term`): an unedited z maps back
to x exactly, so any change in a result is caused by the edit and not by the reconstruction. The
paper decodes z' alone; `error_term=False` gives that.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ..normalization import ModalityStats, get_stats
from ..store import EmbeddingSource, check_dimension, check_finite_block, nonfinite_error, nonfinite_rows


@dataclass
class Edit:
    """One concept edit: neuron `index` is set to `value` ('set') or raised by it ('add')."""

    index: int
    value: float
    mode: str = "set"

    def __post_init__(self) -> None:
        if self.mode not in ("set", "add"):
            raise ValueError(f"edit mode must be 'set' or 'add', got {self.mode!r}")


class ConceptSpace:
    """An SAE plus the statistics of one modality, in eval mode and the paper's inference protocol."""

    def __init__(self, sae, modality: str = "image", stats: ModalityStats | None = None):
        self.sae = sae.eval()
        self.modality = modality
        self.stats = stats if stats is not None else get_stats(sae, modality)
        self.device = sae.W_dec.device

    @property
    def d_in(self) -> int:
        return self.sae.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.sae.cfg.d_sae

    def _x(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(x, dtype=np.float32) if isinstance(x, np.ndarray) else x)
        if x.ndim == 1:
            x = x[None]
        if x.shape[-1] != self.d_in:
            raise ValueError(f"embeddings have dimension {x.shape[-1]}, the SAE has d_in={self.d_in}")
        return x.to(self.device, torch.float32)

    @torch.no_grad()
    def encode(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Concept magnitudes z of CLIP embeddings x (n, d_in) -> (n, d_sae)."""
        return self.sae.encode(self.stats.apply(self._x(x)))

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """CLIP embeddings of concept magnitudes."""
        return self.stats.invert(self.sae.decode(z.to(self.device)))

    @torch.no_grad()
    def edit(self, x: np.ndarray | torch.Tensor, edits: list[Edit], error_term: bool = True) -> torch.Tensor:
        """CLIP embeddings of x after applying `edits` to its concept magnitudes."""
        x = self._x(x)
        z = self.encode(x)
        z_new = apply_edits(z, edits, self.d_sae)
        out = self.decode(z_new)
        if error_term:
            out = out + (x - self.decode(z))
        return out

    @torch.no_grad()
    def blocks(self, source: EmbeddingSource, batch_size: int = 4096,
               rows: np.ndarray | None = None) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(start, x, z) over a source, in row order (or over `rows`, in the given order)."""
        check_dimension(source, self.d_in)
        if rows is None:
            for start in range(0, source.n_rows, batch_size):
                block = source.read(start, min(source.n_rows, start + batch_size))
                check_finite_block(block, start, source.description)
                x = self._x(block)
                yield start, x, self.encode(x)
        else:
            from ..store import read_all

            for start in range(0, len(rows), batch_size):
                chunk = np.asarray(rows[start : start + batch_size])
                block = read_all(source, chunk)
                bad = nonfinite_rows(block)
                if bad.any():
                    raise nonfinite_error(source.description, int(bad.sum()), int(chunk[np.argmax(bad)]))
                x = self._x(block)
                yield start, x, self.encode(x)


def apply_edits(z: torch.Tensor, edits: list[Edit], d_sae: int) -> torch.Tensor:
    z = z.clone()
    for e in edits:
        if not 0 <= e.index < d_sae:
            raise ValueError(f"neuron {e.index} does not exist; the SAE has {d_sae} latents")
        if e.mode == "set":
            z[:, e.index] = e.value
        else:
            z[:, e.index] += e.value
    return z



def open_space(sae, modality: str | None = None, concepts: Any = None,
               device: str = "cpu") -> tuple[ConceptSpace, Any]:
    """An SAE (a folder, or an SAE already loaded, e.g. from a release) as a ConceptSpace (in
    `modality`, by default its training modality) and its concepts (a concepts.json path or a
    ConceptTable) as a ConceptTable (None without one), checked against each other."""
    from ..loading import load_sae
    from .concepts import ConceptError, ConceptTable

    loaded = load_sae(sae, device=device) if isinstance(sae, (str, Path)) else sae.to(device)
    table = concepts if isinstance(concepts, ConceptTable) or concepts is None else ConceptTable.load(concepts)
    if table is not None and len(table.neurons) != loaded.cfg.d_sae:
        raise ConceptError(f"{table.source} names {len(table.neurons)} neurons, the SAE has {loaded.cfg.d_sae}")
    return ConceptSpace(loaded, modality or loaded.cfg.metadata.get("modality") or "image"), table
