"""CLIP embedding pipeline: open_clip models (clip.py), datasets as ordered items (datasets.py),
sharded resumable extraction and reading back (extract.py), CLIP on the fly for training (stream.py)."""

from __future__ import annotations

from .clip import ClipLoadError, LoadedClip, load_clip
from .datasets import DatasetSpecError, Items, open_items
from .extract import EmbedError, Embeddings, embed_dataset, encode_images, encode_texts, load_embeddings
from .stream import ClipSource

__all__ = [
    "ClipLoadError", "ClipSource", "DatasetSpecError", "EmbedError", "Embeddings", "Items", "LoadedClip",
    "embed_dataset", "encode_images", "encode_texts", "load_clip", "load_embeddings", "open_items",
]
