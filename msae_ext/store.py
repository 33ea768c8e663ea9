"""Embedding store: read CLIP embedding matrices from disk and stream them as shuffled batches.

Sources (all give float32 rows through `read(start, stop)`, never the whole file at once):
    file.npy                     float32 / float16, memory-mapped
    file.safetensors[#key]       lazily sliced; `key` may be left out when the file holds one tensor
    DIR/ with manifest.json      shards (.npy or .safetensors) listed in order
    file.parquet#column          a list/array column of a parquet file (Hugging Face `datasets`)
    DIR#column                   a dataset saved with `datasets.save_to_disk`
    hf://NAME#column[@split]     a Hub dataset by name (needs network or the local HF cache)
    {clip: {model, pretrained, dataset, modality, ...}}   CLIP run on the fly (msae_ext.embed.stream)

Streaming (`BatchStream`): each epoch visits every row once (the last incomplete batch is
dropped so the batch size stays constant, as sae-lens's trainer expects). Rows are read as
contiguous chunks; a buffer of at most `buffer_rows` rows is filled with randomly chosen chunks
and shuffled, so data larger than memory is shuffled with bounded memory. The order is a pure
function of (seed, epoch), which makes runs reproducible and resumable mid-epoch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from .embed.extract import MANIFEST
from .fileio import FileFormatError, inside, load_npy, sha256_file


class EmbeddingDataError(ValueError):
    """Bad embedding input: wrong dimension, NaN/inf rows, empty or corrupt file, bad spec."""


class EmbeddingSource(Protocol):
    n_rows: int
    d_in: int
    description: str

    def read(self, start: int, stop: int) -> np.ndarray: ...


def _as_float32(block: np.ndarray, what: str) -> np.ndarray:
    if block.dtype not in (np.float32, np.float16, np.float64):
        raise EmbeddingDataError(f"{what}: embeddings must be float16/float32/float64, got {block.dtype}")
    # a private, writable float32 copy (memory maps and Arrow buffers are read-only)
    return np.array(block, dtype=np.float32, copy=True, order="C")


class NpySource:
    def __init__(self, path: Path):
        try:
            self._array = load_npy(path, mmap_mode="r")
        except FileFormatError as e:
            raise EmbeddingDataError(str(e)) from None
        if self._array.ndim != 2:
            raise EmbeddingDataError(f"{path}: expected a 2-D (rows, dim) array, got shape {self._array.shape}")
        self.n_rows, self.d_in = (int(s) for s in self._array.shape)
        self.description = str(path)
        _as_float32(self._array[:0], str(path))

    def read(self, start: int, stop: int) -> np.ndarray:
        return _as_float32(self._array[start:stop], self.description)


class HeadSource:
    """The first `n` rows of a source (an evaluation on a prefix, where a method encodes slowly)."""

    def __init__(self, source: EmbeddingSource, n: int):
        if n <= 0:
            raise EmbeddingDataError(f"{source.description}: a prefix of {n} rows is empty")
        self.source, self.n_rows, self.d_in = source, min(n, source.n_rows), source.d_in
        self.description = f"{source.description}[:{self.n_rows}]"

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.source.read(min(start, self.n_rows), min(stop, self.n_rows))


class SafetensorsSource:
    def __init__(self, path: Path, key: str | None = None):
        from safetensors import safe_open

        try:
            self._file = safe_open(str(path), framework="numpy")
            keys = list(self._file.keys())
        except Exception as e:  # safetensors raises its own error types
            raise EmbeddingDataError(f"{path}: not a readable safetensors file (corrupt or truncated?): {e}") from e
        if key is None:
            if len(keys) != 1:
                raise EmbeddingDataError(
                    f"{path} holds tensors {keys}; name one as '{path}#KEY'"
                )
            key = keys[0]
        if key not in keys:
            raise EmbeddingDataError(f"{path}: no tensor {key!r}; it holds {keys}")
        self._slice = self._file.get_slice(key)
        shape = self._slice.get_shape()
        if len(shape) != 2:
            raise EmbeddingDataError(f"{path}#{key}: expected a 2-D (rows, dim) tensor, got shape {shape}")
        self.n_rows, self.d_in = int(shape[0]), int(shape[1])
        self.description = f"{path}#{key}"

    def read(self, start: int, stop: int) -> np.ndarray:
        return _as_float32(self._slice[start:stop], self.description)


class ShardedSource:
    """A directory of shards in row order, described by manifest.json:

    {"format": "msae-embeddings", "d_in": 768, "n_rows": N,
     "shards": [{"file": "shard_00000.npy", "n_rows": n0}, ...], ...any other keys...}
    """

    def __init__(self, directory: Path):
        where = directory / MANIFEST
        try:
            manifest = json.loads(where.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise EmbeddingDataError(f"{where}: corrupt manifest: {e}") from None
        if not isinstance(manifest, dict):
            raise EmbeddingDataError(f"{where}: corrupt manifest: not a JSON object")
        self.manifest = manifest
        shards = manifest.get("shards")
        if not shards or not isinstance(shards, list):
            raise EmbeddingDataError(f"{where}: lists no shards")
        self._shards: list[EmbeddingSource] = []
        self._files: list[tuple[Path, str | None]] = []  # each shard's file and its recorded sha256
        for i, entry in enumerate(shards):
            if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
                raise EmbeddingDataError(f"{where}: shards[{i}] has no 'file'")
            try:
                path = inside(directory, entry["file"], f"{where}: shards[{i}].file")
            except ValueError as e:
                raise EmbeddingDataError(str(e)) from None
            if not path.is_file():  # a shard is one .npy or .safetensors file, never a folder (or this one)
                raise EmbeddingDataError(f"{where}: shards[{i}].file {entry['file']!r} is not a file in {directory}")
            shard = open_embeddings(str(path))
            if "n_rows" in entry and int(entry["n_rows"]) != shard.n_rows:
                raise EmbeddingDataError(f"{path}: manifest says {entry['n_rows']} rows, file has {shard.n_rows}")
            self._shards.append(shard)
            self._files.append((path, entry.get("sha256")))
        dims = {s.d_in for s in self._shards}
        if len(dims) != 1:
            raise EmbeddingDataError(f"{directory}: shards disagree on the embedding dimension: {sorted(dims)}")
        self.d_in = dims.pop()
        if "d_in" in manifest and int(manifest["d_in"]) != self.d_in:
            raise EmbeddingDataError(f"{directory}: manifest d_in={manifest['d_in']} but shards have {self.d_in}")
        self._offsets = np.cumsum([0] + [s.n_rows for s in self._shards])
        self.n_rows = int(self._offsets[-1])
        if "n_rows" in manifest and int(manifest["n_rows"]) != self.n_rows:
            raise EmbeddingDataError(f"{directory}: manifest n_rows={manifest['n_rows']} but shards hold {self.n_rows}")
        self.description = str(directory)

    def verify(self) -> int:
        """Check every shard against the sha256 the manifest records; the number checked (0 when the
        manifest records none). A shard that differs is an EmbeddingDataError naming it."""
        checked = 0
        for path, digest in self._files:
            if digest is None:
                continue
            if sha256_file(path) != digest:
                raise EmbeddingDataError(f"{path}: its sha256 differs from the one in {MANIFEST}; the shard is "
                                         "corrupt or was replaced (in an `msae embed` cache: delete it and its "
                                         ".rows.json, then rerun `msae embed` with the same --out)")
            checked += 1
        return checked

    def read(self, start: int, stop: int) -> np.ndarray:
        parts = []
        i = int(np.searchsorted(self._offsets, start, side="right") - 1)
        while start < stop:
            lo, hi = int(self._offsets[i]), int(self._offsets[i + 1])
            end = min(stop, hi)
            parts.append(self._shards[i].read(start - lo, end - lo))
            start, i = end, i + 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


class DatasetColumnSource:
    """One column of a Hugging Face `datasets.Dataset` (memory-mapped Arrow) holding vectors."""

    def __init__(self, dataset: Any, column: str, description: str):
        if column not in dataset.column_names:
            raise EmbeddingDataError(f"{description}: no column {column!r}; columns are {dataset.column_names}")
        self._ds = dataset.with_format("numpy", columns=[column])
        self._column = column
        self.n_rows = len(dataset)
        first = self._ds[0:1][column] if self.n_rows else np.zeros((0, 0), np.float32)
        if self.n_rows and np.asarray(first).ndim != 2:
            raise EmbeddingDataError(f"{description}: column {column!r} does not hold fixed-length vectors")
        self.d_in = int(np.asarray(first).shape[1]) if self.n_rows else 0
        self.description = description

    def read(self, start: int, stop: int) -> np.ndarray:
        block = self._ds[start:stop][self._column]
        if isinstance(block, list) or getattr(block, "dtype", None) == object:  # rows of different lengths
            lengths = sorted({len(v) for v in block})
            raise EmbeddingDataError(f"{self.description}: column {self._column!r} holds vectors of different "
                                     f"lengths ({lengths[:5]}) in rows {start}..{stop - 1}")
        return _as_float32(np.asarray(block), self.description)


def _split_spec(spec: str) -> tuple[str, str | None]:
    if "#" in spec:
        path, _, key = spec.rpartition("#")
        return path, key or None
    return spec, None


def open_embeddings(spec: str | Path | dict[str, Any]) -> EmbeddingSource:
    """Open an embedding matrix from any supported source (see module docstring)."""
    if isinstance(spec, dict) and "clip" in spec:
        from .embed.stream import ClipSource

        return ClipSource(**spec["clip"])
    if isinstance(spec, dict):
        path = str(spec["path"])
        key = spec.get("column") or spec.get("key")
        spec = f"{path}#{key}" if key else path
    spec = str(spec)
    if spec.startswith("hf://"):
        source = _open_hub_dataset(spec[len("hf://"):])
    else:
        path_str, key = _split_spec(spec)
        path = Path(path_str)
        if not path.exists():
            raise EmbeddingDataError(f"{path}: no such file or directory")
        if path.is_dir():
            if (path / MANIFEST).exists():
                source = ShardedSource(path)
            elif key is not None:
                import datasets

                try:
                    ds = datasets.load_from_disk(str(path))
                except Exception as e:
                    raise EmbeddingDataError(f"{path}: not a saved Hugging Face dataset: {e}") from e
                source = DatasetColumnSource(ds, key, spec)
            else:
                raise EmbeddingDataError(
                    f"{path}: a directory needs a {MANIFEST} (sharded store) or a '#column' (saved dataset)"
                )
        elif path.suffix == ".npy":
            source = NpySource(path)
        elif path.suffix == ".safetensors":
            source = SafetensorsSource(path, key)
        elif path.suffix == ".parquet":
            if key is None:
                raise EmbeddingDataError(f"{path}: name the embedding column as '{path}#COLUMN'")
            import datasets

            try:
                ds = datasets.Dataset.from_parquet(str(path))
            except Exception as e:
                raise EmbeddingDataError(f"{path}: not a readable parquet file: {e}") from e
            source = DatasetColumnSource(ds, key, spec)
        else:
            raise EmbeddingDataError(
                f"{path}: unknown embedding format {path.suffix!r}; use .npy, .safetensors, .parquet#COL, "
                f"a directory with {MANIFEST}, or a saved dataset DIR#COL"
            )
    if source.n_rows == 0:
        raise EmbeddingDataError(f"{source.description}: holds no rows")
    if source.d_in == 0:
        raise EmbeddingDataError(f"{source.description}: rows have dimension 0")
    return source


def _open_hub_dataset(spec: str) -> EmbeddingSource:
    name, column = _split_spec(spec)
    if column is None:
        raise EmbeddingDataError(f"hf://{spec}: name the embedding column as 'hf://NAME#COLUMN[@split]'")
    column, _, split = column.partition("@")
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:
        raise EmbeddingDataError(
            f"hf://{name}: could not load the dataset ({type(e).__name__}: {e}). Without network access, "
            "download it elsewhere, `save_to_disk` it, and pass DIR#COLUMN instead."
        ) from e
    return DatasetColumnSource(ds, column, f"hf://{spec}")


def verify_checksums(source: EmbeddingSource) -> int:
    """Shards of `source` checked against their recorded sha256 (0: nothing records one, as for a
    plain matrix); raises EmbeddingDataError on the first that differs."""
    verify = getattr(source, "verify", None)
    return verify() if verify is not None else 0


def check_dimension(source: EmbeddingSource, d_in: int) -> None:
    if source.d_in != d_in:
        raise EmbeddingDataError(
            f"{source.description}: embeddings have dimension {source.d_in}, the SAE expects d_in={d_in}"
        )


def iter_blocks(source: EmbeddingSource, block_rows: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
    for start in range(0, source.n_rows, block_rows):
        yield start, source.read(start, min(source.n_rows, start + block_rows))


def nonfinite_error(description: str, n_bad: int, first: int) -> EmbeddingDataError:
    return EmbeddingDataError(
        f"{description}: {n_bad} row(s) contain NaN or infinite values; the first is row {first}"
    )


def nonfinite_rows(block: np.ndarray) -> np.ndarray:
    """Boolean mask of the rows holding a NaN or an infinity."""
    return ~np.isfinite(block).all(axis=1)


def check_finite_block(block: np.ndarray, offset: int, description: str) -> None:
    """Raise if a block read at row `offset` holds NaN/inf rows (counted within the block)."""
    bad = nonfinite_rows(block)
    if bad.any():
        raise nonfinite_error(description, int(bad.sum()), offset + int(np.argmax(bad)))


def finite_blocks(source: EmbeddingSource, block_rows: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
    """`iter_blocks`, raising once every block has been read if any row held NaN or an infinity
    (the error names how many and the first)."""
    n_bad, first = 0, None
    for start, block in iter_blocks(source, block_rows):
        bad = nonfinite_rows(block)
        if bad.any():
            n_bad += int(bad.sum())
            first = first if first is not None else start + int(np.argmax(bad))
        yield start, block
    if n_bad:
        raise nonfinite_error(source.description, n_bad, first)  # type: ignore[arg-type]


def check_finite(source: EmbeddingSource, block_rows: int = 65536) -> None:
    """Raise if any row of the source holds NaN or an infinity (`finite_blocks`)."""
    for _ in finite_blocks(source, block_rows):
        pass


def read_all(source: EmbeddingSource, rows: np.ndarray | None = None) -> np.ndarray:
    """The whole matrix, or the given row indices, as float32 (for evaluation-size data)."""
    if rows is None:
        return source.read(0, source.n_rows)
    order = np.argsort(rows)
    out = np.empty((len(rows), source.d_in), np.float32)
    sorted_rows = rows[order]
    # read contiguous runs of the sorted indices
    start = 0
    while start < len(sorted_rows):
        end = start
        while end + 1 < len(sorted_rows) and sorted_rows[end + 1] == sorted_rows[end] + 1:
            end += 1
        out[order[start : end + 1]] = source.read(int(sorted_rows[start]), int(sorted_rows[end]) + 1)
        start = end + 1
    return out


@dataclass
class BatchStream:
    """Shuffled fixed-size batches over a finite source, epoch by epoch (see module docstring)."""

    source: EmbeddingSource
    batch_size: int
    seed: int = 0
    chunk_rows: int = 4096
    buffer_rows: int = 1 << 20

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.source.n_rows < self.batch_size:
            raise EmbeddingDataError(
                f"{self.source.description}: {self.source.n_rows} rows, fewer than one batch of {self.batch_size}"
            )
        self.chunk_rows = max(1, min(self.chunk_rows, self.source.n_rows))
        self.n_chunks = math.ceil(self.source.n_rows / self.chunk_rows)
        self.chunks_per_buffer = max(1, self.buffer_rows // self.chunk_rows)

    @property
    def batches_per_epoch(self) -> int:
        return self.source.n_rows // self.batch_size

    def _chunk_range(self, c: int) -> tuple[int, int]:
        return c * self.chunk_rows, min(self.source.n_rows, (c + 1) * self.chunk_rows)

    def epoch_plan(self, epoch: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """[(sorted chunk ids of a buffer, permutation of that buffer's rows)] for one epoch."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.n_chunks)
        plan = []
        for b in range(0, self.n_chunks, self.chunks_per_buffer):
            chunks = np.sort(order[b : b + self.chunks_per_buffer])
            n = sum(hi - lo for lo, hi in map(self._chunk_range, chunks))
            plan.append((chunks, rng.permutation(n)))
        return plan

    def epoch_row_order(self, epoch: int) -> np.ndarray:
        """The row indices of one epoch in the order they are served (for tests and audits)."""
        parts = []
        for chunks, perm in self.epoch_plan(epoch):
            rows = np.concatenate([np.arange(*self._chunk_range(c)) for c in chunks])
            parts.append(rows[perm])
        return np.concatenate(parts)

    def epoch_batches(self, epoch: int, start_batch: int = 0) -> Iterator[torch.Tensor]:
        """Batches of one epoch, starting at batch `start_batch` (exactly as if the first ones were served).

        A source with `will_read` (msae_ext.embed.ClipSource) is told the chunks of the epoch in
        order, so it can compute them ahead. A source may return fewer rows than asked (images it
        could not read); the buffer's permutation then keeps its entries that exist.
        """
        skip = start_batch * self.batch_size
        todo = []
        for chunks, perm in self.epoch_plan(epoch):
            if skip >= len(perm):
                skip -= len(perm)
                continue
            todo.append((chunks, perm, skip))
            skip = 0
        announce = getattr(self.source, "will_read", None)
        if announce is not None:
            announce([self._chunk_range(c) for chunks, _, _ in todo for c in chunks])
        served = self.batches_per_epoch - start_batch
        pending: list[np.ndarray] = []
        n_pending = 0
        for chunks, perm, skip in todo:
            if served <= 0:
                return
            block = np.concatenate([self.source.read(*self._chunk_range(c)) for c in chunks])
            if len(block) != len(perm):
                perm = perm[perm < len(block)]
            block = block[perm[skip:]]
            pending.append(block)
            n_pending += len(block)
            if n_pending < self.batch_size:
                continue
            rows = np.concatenate(pending)
            n_full = min(len(rows) // self.batch_size, served)
            for i in range(n_full):
                yield torch.from_numpy(rows[i * self.batch_size : (i + 1) * self.batch_size])
            served -= n_full
            rest = rows[n_full * self.batch_size :]
            pending, n_pending = ([rest], len(rest)) if len(rest) else ([], 0)


class ResidentBatches:
    """The batches of a `BatchStream`, served from one tensor that holds the whole set on `device`.

    For a GPU where the embedding set fits (CC3M ViT-L/14 is about 9 GB in float32): no loader, no
    host-to-device copy per batch. Batch i of an epoch is exactly batch i of `stream.epoch_batches`.
    """

    def __init__(self, stream: BatchStream, device: str | torch.device, dtype: torch.dtype = torch.float32):
        self.stream = stream
        self.batch_size = stream.batch_size
        self.batches_per_epoch = stream.batches_per_epoch
        self.data = torch.empty(stream.source.n_rows, stream.source.d_in, dtype=dtype, device=device)
        for start, block in iter_blocks(stream.source, stream.chunk_rows):
            self.data[start : start + len(block)] = torch.from_numpy(block).to(device=device, dtype=dtype)

    def epoch_batches(self, epoch: int, start_batch: int = 0) -> Iterator[torch.Tensor]:
        order = self.stream.epoch_row_order(epoch)[: self.batches_per_epoch * self.batch_size]
        order = torch.from_numpy(order).to(self.data.device)
        for i in range(start_batch, self.batches_per_epoch):
            yield self.data.index_select(0, order[i * self.batch_size : (i + 1) * self.batch_size])


def fits_on_device(source: EmbeddingSource, device: str | torch.device, fraction: float = 0.5) -> bool:
    """Whether the whole set in float32 takes at most `fraction` of the device's free memory."""
    device = torch.device(device)
    if device.type != "cuda" or hasattr(source, "will_read"):  # a streaming source (CLIP on the fly) stays one
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return source.n_rows * source.d_in * 4 <= fraction * free
