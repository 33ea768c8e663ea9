"""An embedding set with what is known about its rows: ids, captions, labels and images.

Reads the caches `msae embed` writes without loading their matrices (they stay memory-mapped,
shard by shard, through the store), and plain matrices (.npy, .safetensors, ...) with optional
captions or labels files beside them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..store import EmbeddingSource, open_embeddings


@dataclass
class RowSet:
    source: EmbeddingSource
    ids: list[str]
    captions: list[str] | None = None
    labels: list[Any] | None = None
    label_names: list[str] | None = None
    items: list[int] | None = None  # dataset item index per row (for reading images back)
    dataset: str | None = None  # the dataset spec the rows were embedded from
    modality: str | None = None
    _items_obj: Any = field(default=None, repr=False)

    @property
    def n_rows(self) -> int:
        return self.source.n_rows

    def describe(self, row: int) -> dict[str, Any]:
        """JSON-ready facts about one row: row number, id, and caption / image path when known."""
        out: dict[str, Any] = {"row": int(row), "id": self.ids[row]}
        if self.captions is not None:
            out["caption"] = self.captions[row]
        path = self.image_path(row)
        if path is not None:
            out["image"] = path
        return out

    def _open_items(self):
        if self._items_obj is None and self.dataset and self.modality == "image":
            from ..embed.datasets import open_items

            try:
                self._items_obj = open_items(self.dataset)
            except (ValueError, OSError):
                self._items_obj = False  # moved or unavailable: images unknown
        return self._items_obj or None

    def image_path(self, row: int) -> str | None:
        items = self._open_items()
        if items is None or self.items is None:
            return None
        i = self.items[row]
        if hasattr(items, "root") and getattr(items, "paths", None):
            return str(Path(items.root) / items.paths[i])
        if getattr(items, "members", None):
            return f"{items.members[i][0]}#{items.ids[i]}"
        return None

    def load_image(self, row: int):
        """The row's image (PIL), read back from the dataset it was embedded from, or None."""
        items = self._open_items()
        if items is None or self.items is None:
            return None
        try:
            return items.load_image(self.items[row])
        except (OSError, ValueError):
            return None

    def label_column(self, name: str | None = None) -> np.ndarray:
        """Labels as an int array; for attribute labels (CelebA), the attribute `name`."""
        if self.labels is None:
            raise ValueError(f"{self.source.description}: the rows carry no labels; give a labels file")
        first = self.labels[0]
        if isinstance(first, (list, tuple)):
            if name is None:
                raise ValueError(f"{self.source.description}: rows carry {len(first)} attributes; name one "
                                 f"({', '.join((self.label_names or [])[:8])}, ...)")
            if not self.label_names or name not in self.label_names:
                raise ValueError(f"unknown attribute {name!r}; the rows have {self.label_names}")
            j = self.label_names.index(name)
            return np.array([row[j] for row in self.labels], dtype=np.int64)
        if name is not None and self.label_names and name in self.label_names:
            k = self.label_names.index(name)
            return np.array([int(v == k) for v in self.labels], dtype=np.int64)
        return np.asarray(self.labels, dtype=np.int64)


def open_rows(spec: str | Path, captions: str | Path | None = None, labels: str | Path | None = None) -> RowSet:
    """An embedding set: an `msae embed` cache (metadata from its rows files) or any store spec."""
    source = open_embeddings(str(spec))
    path = Path(str(spec))
    manifest = getattr(source, "manifest", None)
    rows = RowSet(source=source, ids=[str(i) for i in range(source.n_rows)])
    if manifest is not None and manifest.get("format") == "msae-embeddings":
        from ..embed.extract import read_row_metadata

        meta = read_row_metadata(path, manifest)
        ids, caps, labs, items = meta["ids"], meta["captions"], meta["labels"], meta["items"]
        n = source.n_rows
        rows.ids = ids if len(ids) == n else rows.ids
        rows.captions = caps if len(caps) == n else None
        rows.labels = labs if len(labs) == n else None
        rows.label_names = manifest.get("label_names")
        rows.items = items if len(items) == n else None
        rows.dataset = manifest.get("source")
        rows.modality = manifest.get("modality")
    if captions is not None:
        lines = Path(captions).read_text(encoding="utf-8").splitlines()
        if len(lines) != source.n_rows:
            raise ValueError(f"{captions}: {len(lines)} lines for {source.n_rows} embedding rows")
        rows.captions = lines
    if labels is not None:
        from ..loading import load_labels

        lab = load_labels(labels)
        if len(lab) != source.n_rows:
            raise ValueError(f"{labels}: {len(lab)} labels for {source.n_rows} embedding rows")
        rows.labels = lab.tolist()
    return rows
