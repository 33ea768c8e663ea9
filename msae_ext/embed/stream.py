"""Train straight from a dataset: an embedding source that runs CLIP on the rows it is asked for.

For users who do not want a 9 GB cache. `ClipSource` behaves like any source of msae_ext.store
(`read(start, stop)` gives the embeddings of items start..stop), so `BatchStream` shuffles and
batches it like a cache. Images are decoded by DataLoader workers, and a background thread embeds
the chunks `BatchStream` announces (`will_read`) ahead of their use, so CLIP runs while the SAE
trains on the previous chunk. Unreadable images are skipped (a read returns fewer rows), logged
once, and listed in `failed`.

In a training config:
    train_data: {clip: {model: ViT-L-14, pretrained: openai, dataset: "cc3m:/data/cc3m",
                        modality: image, batch_size: 256, num_workers: 8, device: cuda}}
"""

from __future__ import annotations

import queue
import threading
import warnings
from typing import Any

import numpy as np
import torch

from .clip import load_clip
from .datasets import open_items
from .extract import _collate, _ImageDataset, batch_indices, encode_images, encode_texts


class ClipSource:
    def __init__(self, model: str, dataset: str, pretrained: str | None = None, modality: str = "image",
                 device: str = "cpu", batch_size: int = 256, num_workers: int = 4, precision: str | None = None,
                 captions: str | None = None, prefetch_chunks: int = 2, clip: Any = None, items: Any = None,
                 seed: int = 0):
        if modality not in ("image", "text"):
            raise ValueError(f"modality must be image or text, got {modality!r}")
        self.clip = clip or load_clip(model, pretrained, device=device, seed=seed)
        self.items = items or open_items(dataset, captions=captions)
        if modality == "image" and not self.items.has_images:
            raise ValueError(f"{self.items.description}: has no images")
        if modality == "text" and not self.items.has_text:
            raise ValueError(f"{self.items.description}: has no captions")
        self.modality = modality
        self.batch_size, self.num_workers = batch_size, num_workers
        self.precision = precision or ("fp16" if self.clip.device.type == "cuda" else "fp32")
        self.n_rows = len(self.items)
        self.d_in = self.clip.embed_dim
        self.description = f"clip:{self.clip.name}/{self.clip.pretrained}:{self.items.description}#{modality}"
        self.failed: dict[int, str] = {}
        self._ahead: queue.Queue = queue.Queue(maxsize=max(1, prefetch_chunks))
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one CLIP call at a time

    # -- the EmbeddingSource protocol --------------------------------------------------------
    def read(self, start: int, stop: int) -> np.ndarray:
        if self._thread is not None:
            key = block = None
            while True:
                try:
                    key, block = self._ahead.get(timeout=0.1)
                    break
                except queue.Empty:
                    if not self._thread.is_alive() and self._ahead.empty():
                        break  # the look-ahead is over (or failed: the direct call below raises its error)
            if key == (start, stop):
                return block
            self.will_read([])  # the stream went another way: drop the look-ahead
        return self._embed(start, stop)

    def will_read(self, ranges: list[tuple[int, int]]) -> None:
        """Embed these ranges, in this order, ahead of the reads that will ask for them."""
        if self._thread is not None:
            self._stop.set()
            while self._thread.is_alive():
                try:
                    self._ahead.get_nowait()
                except queue.Empty:
                    self._thread.join(0.05)
            self._thread = None
        while not self._ahead.empty():
            self._ahead.get_nowait()
        if not ranges:
            return
        self._stop = threading.Event()
        stop_event = self._stop

        def work() -> None:
            for r in ranges:
                if stop_event.is_set():
                    return
                block = self._embed(*r)
                while not stop_event.is_set():
                    try:
                        self._ahead.put((r, block), timeout=0.1)
                        break
                    except queue.Full:
                        continue

        self._thread = threading.Thread(target=work, daemon=True)
        self._thread.start()

    # -- embedding ----------------------------------------------------------------------------
    def _embed(self, start: int, stop: int) -> np.ndarray:
        with self._lock:
            if self.modality == "text":
                parts = [encode_texts(self.clip, [self.items.text(i) for i in b], self.precision)
                         for b in batch_indices(start, stop, self.batch_size)]
                return np.concatenate(parts)
            batches = batch_indices(start, stop, self.batch_size)
            loader = torch.utils.data.DataLoader(_ImageDataset(self.items, self.clip.preprocess), batch_sampler=batches,
                                                 num_workers=self.num_workers, collate_fn=_collate)
            parts = []
            for batch in loader:
                ok = [b for b in batch if b[1] is not None]
                for i, _, err in batch:
                    if err is not None and i not in self.failed:
                        self.failed[i] = err
                        warnings.warn(f"{self.items.description}: skipping item {self.items.ids[i]}: {err}", stacklevel=2)
                if ok:
                    parts.append(encode_images(self.clip, torch.stack([t for _, t, _ in ok]), self.precision))
            return np.concatenate(parts) if parts else np.zeros((0, self.d_in), np.float32)

