"""`msae embed`: CLIP embeddings of a dataset into a sharded, resumable, exactly aligned cache.

Layout of OUT (one modality; `--modality both` writes OUT/image/ and OUT/text/ with the same rows):
    manifest.json               format "msae-embeddings" (read by msae_ext.store and load_embeddings):
                                model, pretrained, modality, dtype, d_in, n_rows, source, label
                                names, the shards in row order with their sha256, and the items that
                                could not be read (id, index, error)
    {modality}_00000.npy        rows = encode_image / encode_text outputs (not normalised)
    {modality}_00000.rows.json  that shard's per-row ids, item indices, labels, captions, sha256
    embed_state.json            the run's defining parameters, checked on resume

Items are cut into shards of `shard_items` consecutive items; shard s holds items
[s * shard_items, (s + 1) * shard_items) minus the unreadable ones, in item order. A shard is
written to a temporary name and renamed; its rows file is written last, so a shard with a rows
file is complete. A killed run restarted with the same OUT skips complete shards (after checking
their sha256) and redoes the rest: no duplicate, no missing row. Under torchrun, rank r embeds
shards r, r + N, ...; rank 0 writes the manifest once every shard is there.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..fileio import FileFormatError, exclusive, fsync_dir, load_npy, sha256_file, write_text_atomic
from .clip import LoadedClip
from .datasets import Items

MANIFEST = "manifest.json"  # read by msae_ext.store as a sharded embedding source
STATE = "embed_state.json"
FORMAT = "msae-embeddings"
MODALITIES = ("image", "text")


class EmbedError(ValueError):
    """A cache that cannot be written or read as asked (settings differ on resume, corrupt shard)."""

    pass



def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npy")
    np.save(tmp, array)
    with tmp.open("rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class _ImageDataset(torch.utils.data.Dataset):
    """Item index -> (index, preprocessed image or None, error or None), decoded in workers."""

    def __init__(self, items: Items, preprocess: Any):
        self.items, self.preprocess = items, preprocess

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        try:
            return i, self.preprocess(self.items.load_image(i)), None
        except Exception as e:  # unreadable or corrupt: reported in the manifest, never dropped silently
            return i, None, f"{type(e).__name__}: {e}"


def _collate(batch):
    return batch


def _autocast(device: torch.device, precision: str):
    if precision == "fp32" or device.type == "cpu":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16)


@torch.no_grad()
def encode_images(clip: LoadedClip, images: torch.Tensor, precision: str = "fp32") -> np.ndarray:
    """`model.encode_image` of a preprocessed batch, as float32 numpy."""
    with _autocast(clip.device, precision):
        out = clip.model.encode_image(images.to(clip.device))
    return out.float().cpu().numpy()


@torch.no_grad()
def encode_texts(clip: LoadedClip, texts: list[str], precision: str = "fp32") -> np.ndarray:
    """`model.encode_text` of tokenized captions (77-token truncation), as float32 numpy."""
    tokens = clip.tokenizer(texts)
    with _autocast(clip.device, precision):
        out = clip.model.encode_text(tokens.to(clip.device))
    return out.float().cpu().numpy()


def batch_indices(start: int, stop: int, batch_size: int) -> list[list[int]]:
    """Items start..stop cut into consecutive batches (the batch composition every path shares)."""
    return [list(range(a, min(stop, a + batch_size))) for a in range(start, stop, batch_size)]


@dataclass
class EmbedPlan:
    n_items: int
    shard_items: int

    @property
    def n_shards(self) -> int:
        return max(1, -(-self.n_items // self.shard_items))

    def items_of(self, shard: int) -> range:
        return range(shard * self.shard_items, min(self.n_items, (shard + 1) * self.shard_items))


def _modality_dirs(out: Path, modality: str) -> dict[str, Path]:
    if modality == "both":
        return {m: out / m for m in MODALITIES}
    if modality not in MODALITIES:
        raise EmbedError(f"unknown modality {modality!r}; expected image, text or both")
    return {modality: out}


def _shard_name(modality: str, shard: int) -> str:
    return f"{modality}_{shard:05d}"


def _complete(directory: Path, modality: str, shard: int, verify: bool) -> bool:
    rows_file = directory / f"{_shard_name(modality, shard)}.rows.json"
    npy = directory / f"{_shard_name(modality, shard)}.npy"
    if not rows_file.exists() or not npy.exists():
        return False
    if verify:
        meta = json.loads(rows_file.read_text())
        if sha256_file(npy) != meta["sha256"]:
            raise EmbedError(f"{npy}: checksum differs from {rows_file.name}; the shard is corrupt. Delete both "
                             "files and rerun to embed it again.")
    return True


def _check_state(out: Path, state: dict[str, Any], resume: bool) -> None:
    path = out / STATE
    if path.exists():
        old = json.loads(path.read_text())
        if not resume:
            raise EmbedError(f"{out} already holds an embedding run; use another --out or remove it")
        diff = {k: (old.get(k), v) for k, v in state.items() if old.get(k) != v}
        if diff:
            detail = "; ".join(f"{k}: was {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise EmbedError(f"{out} was started with other settings ({detail}); use another --out to embed anew")


def default_device(device: str | None = None) -> str:
    """`device`, or cuda when torch sees one (under torchrun this process's GPU), else cpu."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    return device


def embed_dataset(
    items: Items,
    clip: LoadedClip,
    out: str | Path,
    modality: str = "image",
    batch_size: int = 256,
    shard_items: int = 65536,
    dtype: str = "float32",
    precision: str | None = None,
    num_workers: int = 4,
    resume: bool = True,
    progress: bool = True,
) -> Path:
    """Embed `items` into OUT (module docstring). Returns the manifest path (OUT/manifest.json, or
    OUT for `both`). Under torchrun every rank calls this with the same arguments."""
    from ..distributed import init_distributed

    out = Path(out)
    if modality in ("image", "both") and not items.has_images:
        raise EmbedError(f"{items.description}: has no images; use --modality text")
    if modality in ("text", "both") and not items.has_text:
        raise EmbedError(f"{items.description}: has no captions; use --modality image (or give --captions)")
    if dtype not in ("float32", "float16"):
        raise EmbedError(f"dtype must be float32 or float16, got {dtype!r}")
    if len(items) == 0:
        raise EmbedError(f"{items.description}: no items")
    precision = precision or ("fp16" if clip.device.type == "cuda" else "fp32")
    if precision not in ("fp32", "fp16", "bf16"):
        raise EmbedError(f"precision must be fp32, fp16 or bf16, got {precision!r}")
    env, _ = init_distributed(str(clip.device))

    def write() -> Path:
        dirs = _modality_dirs(out, modality)
        plan = EmbedPlan(len(items), shard_items)
        state = {"model": clip.name, "pretrained": clip.pretrained, "seed": clip.seed, "modality": modality,
                 "source": items.description, "n_items": len(items), "shard_items": shard_items, "dtype": dtype,
                 "precision": precision}
        if env.is_main:
            for d in dirs.values():
                d.mkdir(parents=True, exist_ok=True)
            _check_state(out, state, resume)
            write_text_atomic(out / STATE, json.dumps(state, indent=2))
        env.barrier()

        mine = [s for s in range(plan.n_shards) if s % env.world == env.rank]
        todo = [s for s in mine if not all(_complete(dirs[m], m, s, verify=True) for m in dirs)]
        n_todo = sum(len(plan.items_of(s)) for s in todo)
        if env.is_main and len(todo) < len(mine):
            print(f"resuming: {len(mine) - len(todo)} of {len(mine)} shards already complete")
        bar = None
        if progress and env.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=n_todo, unit="item", desc=f"embed {modality}" + (f" (rank 0 of {env.world})" if env.enabled else ""),
                       smoothing=0.05)
        loader = None
        if "image" in dirs and todo:
            batches = [b for s in todo for b in batch_indices(plan.items_of(s).start, plan.items_of(s).stop, batch_size)]
            loader = iter(torch.utils.data.DataLoader(
                _ImageDataset(items, clip.preprocess), batch_sampler=batches, num_workers=num_workers,
                collate_fn=_collate, persistent_workers=False, prefetch_factor=4 if num_workers else None))
        for shard in todo:
            rows: list[int] = []
            failed: list[dict[str, Any]] = []
            parts: dict[str, list[np.ndarray]] = {m: [] for m in dirs}
            span = plan.items_of(shard)
            for idx in batch_indices(span.start, span.stop, batch_size):
                if loader is not None:
                    batch = next(loader)
                    assert [b[0] for b in batch] == idx  # the loader serves exactly this shard's items, in order
                    ok = [b for b in batch if b[1] is not None]
                    failed += [{"index": i, "id": items.ids[i], "error": err} for i, _, err in batch if err is not None]
                    kept = [i for i, _, _ in ok]
                    if ok:
                        parts["image"].append(encode_images(clip, torch.stack([t for _, t, _ in ok]), precision))
                else:
                    kept = idx
                if "text" in dirs and kept:
                    parts["text"].append(encode_texts(clip, [items.text(i) for i in kept], precision))
                rows += kept
                if bar is not None:
                    bar.update(len(idx))
            for m, d in dirs.items():
                matrix = (np.concatenate(parts[m]) if parts[m] else np.zeros((0, clip.embed_dim), np.float32)).astype(dtype)
                name = _shard_name(m, shard)
                _save_npy_atomic(d / f"{name}.npy", matrix)
                meta = {"shard": shard, "n_rows": len(rows), "sha256": sha256_file(d / f"{name}.npy"),
                        "first_item": span.start, "n_items": len(span), "items": rows,
                        "ids": [items.ids[i] for i in rows], "failed": failed}
                if items.labels is not None:
                    meta["labels"] = [items.labels[i] for i in rows]
                if items.has_text:
                    meta["captions"] = [items.text(i) for i in rows]
                write_text_atomic(d / f"{name}.rows.json", json.dumps(meta))
        if bar is not None:
            bar.close()
        env.barrier()
        if env.is_main:
            for m, d in dirs.items():
                write_manifest(d, m, plan, clip, items, dtype, precision)
        env.barrier()
        return out / MANIFEST if modality != "both" else out

    # one writer per cache folder (rank 0 holds it for every rank)
    with exclusive(out, "msae embed") if env.is_main else contextlib.nullcontext():
        return write()


def write_manifest(directory: Path, modality: str, plan: EmbedPlan, clip: LoadedClip, items: Items,
                   dtype: str, precision: str) -> Path:
    shards, failed, n_rows = [], [], 0
    for s in range(plan.n_shards):
        name = _shard_name(modality, s)
        rows_file = directory / f"{name}.rows.json"
        if not rows_file.exists():
            raise EmbedError(f"{directory}: shard {s} is missing; rerun the same command to finish it")
        meta = json.loads(rows_file.read_text())
        failed += meta["failed"]
        n_rows += meta["n_rows"]
        if meta["n_rows"]:
            shards.append({"file": f"{name}.npy", "n_rows": meta["n_rows"], "sha256": meta["sha256"],
                           "rows": rows_file.name, "first_item": meta["first_item"]})
    if n_rows == 0:
        raise EmbedError(f"{items.description}: no item could be embedded ({len(failed)} failed)")
    manifest = {
        "format": FORMAT, "version": 1, "modality": modality, "d_in": clip.embed_dim, "n_rows": n_rows,
        "dtype": dtype, "precision": precision, **clip.describe(), "source": items.description,
        "n_items": plan.n_items, "shard_items": plan.shard_items, "label_kind": items.label_kind,
        "label_names": items.label_names, "has_captions": items.has_text, "shards": shards, "failed": failed,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path = directory / MANIFEST
    write_text_atomic(path, json.dumps(manifest, indent=1))
    return path


@dataclass
class Embeddings:
    """An embedding cache read back: the matrix and its rows' metadata, in row order."""

    matrix: np.ndarray  # (n_rows, d_in); memory-mapped when the cache has one shard
    ids: list[str]
    labels: list[Any] | None
    captions: list[str] | None
    manifest: dict[str, Any]

    @property
    def failed(self) -> list[dict[str, Any]]:
        return self.manifest.get("failed", [])


def load_embeddings(directory: str | Path, verify: bool = False) -> Embeddings:
    """Read a cache written by `msae embed`. `verify` checks every shard's sha256."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.exists():
        sub = [m for m in MODALITIES if (directory / m / MANIFEST).exists()]
        hint = f"; it holds {sub}: pass {directory / sub[0]}" if sub else ""
        raise EmbedError(f"{directory}: no {MANIFEST}{hint}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EmbedError(f"{path}: corrupt manifest: {e}") from e
    if manifest.get("format") != FORMAT:
        raise EmbedError(f"{path}: not an msae embedding manifest (format {manifest.get('format')!r})")
    mats = []
    for entry in manifest["shards"]:
        npy = directory / entry["file"]
        if not npy.exists():
            raise EmbedError(f"{npy}: listed in the manifest but missing")
        if verify and sha256_file(npy) != entry["sha256"]:
            raise EmbedError(f"{npy}: checksum differs from the manifest; the file is corrupt")
        try:
            m = load_npy(npy, mmap_mode="r")
        except FileFormatError as e:
            raise EmbedError(str(e)) from None
        if m.shape[0] != entry["n_rows"]:
            raise EmbedError(f"{npy}: manifest says {entry['n_rows']} rows, file has {m.shape[0]}")
        mats.append(m)
    rows = read_row_metadata(directory, manifest)
    matrix = mats[0] if len(mats) == 1 else np.concatenate(mats)
    n = matrix.shape[0]
    labels, captions = rows["labels"], rows["captions"]
    return Embeddings(matrix, rows["ids"], labels if len(labels) == n and manifest.get("label_kind") else None,
                      captions if len(captions) == n and manifest.get("has_captions") else None, manifest)


def read_row_metadata(directory: str | Path, manifest: dict[str, Any]) -> dict[str, list[Any]]:
    """Per-row ids, labels, captions and dataset item indices of a cache, in row order (a list is
    empty when the cache does not record it); each rows file must match its shard's row count."""
    directory = Path(directory)
    out: dict[str, list[Any]] = {"ids": [], "labels": [], "captions": [], "items": []}
    for entry in manifest["shards"]:
        path = directory / entry["rows"]
        meta = json.loads(path.read_text())
        if len(meta["ids"]) != entry["n_rows"]:
            raise EmbedError(f"{path}: {len(meta['ids'])} ids for {entry['n_rows']} rows")
        for key in out:
            out[key] += meta.get(key) or []
    return out
