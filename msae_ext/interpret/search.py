"""Concept-based similarity search (section 5.2, appendix G.2).

Three searches over an embedding set, all exact (brute force) and streamed in blocks, so the
index stays memory-mapped: a million 768-d float32 rows are 3 GB on disk and one block in memory.
  * CLIP space: cosine distance 1 - cos(q, x), each hit explained by the concepts (most active
    SAE neurons) it shares with the query (figure 21).
  * SAE space: Manhattan (L1) distance between activation vectors (appendix G.2). Rows are
    encoded on the fly: a pass costs one SAE forward over the index.
  * Concept-steered: set or raise concept magnitudes of the query in SAE space, decode to CLIP
    space, search again, and report how far the edit moved the query (figure 7).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..store import check_dimension, check_finite_block
from .concepts import ConceptTable
from .rows import RowSet
from .space import ConceptSpace, Edit


@dataclass
class Neighbours:
    distances: torch.Tensor  # (q, k), ascending
    rows: torch.Tensor  # (q, k)


def _merge(best_d: torch.Tensor, best_r: torch.Tensor, d: torch.Tensor, r: torch.Tensor, k: int):
    dd = torch.cat([best_d, d], dim=1)
    rr = torch.cat([best_r, r], dim=1)
    v, i = dd.topk(min(k, dd.shape[1]), dim=1, largest=False)
    return v, torch.gather(rr, 1, i)


@torch.no_grad()
def search_clip(rows: RowSet, queries: torch.Tensor | np.ndarray, k: int = 8, batch_size: int = 65536,
                progress: bool = False) -> Neighbours:
    """k nearest rows by cosine distance in CLIP space, for each query row."""
    q = torch.as_tensor(np.asarray(queries, dtype=np.float32)) if isinstance(queries, np.ndarray) else queries.float().cpu()
    q = q[None] if q.ndim == 1 else q
    check_dimension(rows.source, q.shape[1])
    qn = torch.nn.functional.normalize(q, dim=-1)
    best_d = torch.zeros(len(q), 0)
    best_r = torch.zeros(len(q), 0, dtype=torch.long)
    n = rows.n_rows
    for start in tqdm(range(0, n, batch_size), desc="CLIP search", unit="block", disable=not progress):
        block = rows.source.read(start, min(n, start + batch_size))
        check_finite_block(block, start, rows.source.description)
        x = torch.nn.functional.normalize(torch.from_numpy(np.asarray(block, np.float32)), dim=-1)
        d = 1.0 - qn @ x.T
        r = torch.arange(start, start + len(x)).expand(len(q), -1)
        best_d, best_r = _merge(best_d, best_r, d, r, k)
    return Neighbours(best_d.clamp_min(0), best_r)


@torch.no_grad()
def search_sae(space: ConceptSpace, rows: RowSet, query_z: torch.Tensor, k: int = 8, batch_size: int = 8192,
               progress: bool = False) -> Neighbours:
    """k nearest rows by Manhattan distance between SAE activations (appendix G.2)."""
    zq = query_z[None] if query_z.ndim == 1 else query_z
    zq = zq.to(space.device).float()
    best_d = torch.zeros(len(zq), 0)
    best_r = torch.zeros(len(zq), 0, dtype=torch.long)
    total = -(-rows.n_rows // batch_size)
    for start, _, z in tqdm(space.blocks(rows.source, batch_size), total=total, desc="SAE search",
                            unit="block", disable=not progress):
        d = torch.cdist(zq, z.float(), p=1).cpu()
        r = torch.arange(start, start + len(z)).expand(len(zq), -1)
        best_d, best_r = _merge(best_d, best_r, d, r, k)
    return Neighbours(best_d, best_r)


def shared_concepts(z_a: torch.Tensor, z_b: torch.Tensor, table: ConceptTable | None, n: int = 8,
                    valid_only: bool = False) -> dict[str, list]:
    """The `n` most active concepts of each vector and those they share (figure 21's bottom row)."""
    labels = table.labels if table is not None else [f"#{i}" for i in range(z_a.numel())]
    valid = torch.tensor(table.valid) if (table is not None and valid_only) else None

    def top(z: torch.Tensor) -> list[tuple[int, float]]:
        z = z.detach().float().cpu().clone()
        if valid is not None:
            z[~valid] = 0
        v, i = z.topk(min(n, z.numel()))
        return [(int(j), float(x)) for x, j in zip(v, i) if x > 0]

    ta, tb = top(z_a), top(z_b)
    in_b = {j for j, _ in tb}
    return {
        "query": [[labels[j], j, v] for j, v in ta],
        "result": [[labels[j], j, v] for j, v in tb],
        "shared": [labels[j] for j, _ in ta if j in in_b],
    }


def _hits(rows: RowSet, nb: Neighbours, qi: int, space: ConceptSpace | None, query_z: torch.Tensor | None,
          table: ConceptTable | None, n_concepts: int, valid_only: bool, watch: list[int] | None = None) -> list[dict]:
    hit_rows = nb.rows[qi].tolist()
    z_hits = None
    if space is not None:
        z_hits = torch.cat([z.cpu() for _, _, z in space.blocks(rows.source, 4096, rows=np.array(hit_rows))])
    out = []
    for j, (d, r) in enumerate(zip(nb.distances[qi].tolist(), hit_rows)):
        hit = {**rows.describe(r), "distance": d}
        if z_hits is not None and query_z is not None:
            hit["concepts"] = shared_concepts(query_z, z_hits[j], table, n_concepts, valid_only)
            if watch:
                hit["steered_magnitudes"] = {str(w): float(z_hits[j, w]) for w in watch}
        out.append(hit)
    return out


def similarity_search(rows: RowSet, query: torch.Tensor | np.ndarray, *, space: ConceptSpace | None = None,
                      table: ConceptTable | None = None, k: int = 8, sae_space: bool = False,
                      steer: list[list[Edit]] | None = None, error_term: bool = True, n_concepts: int = 8,
                      valid_only: bool = False, progress: bool = False) -> dict[str, Any]:
    """All three searches for one query embedding (module docstring) as a JSON-ready dict.

    `steer` is a list of edit sets; each gives one steered search (e.g. a concept at 20, then 30).
    """
    q = torch.as_tensor(np.asarray(query, dtype=np.float32)).reshape(1, -1)
    result: dict[str, Any] = {"k": k}
    zq = space.encode(q)[0].cpu() if space is not None else None
    if zq is not None:
        result["query_concepts"] = shared_concepts(zq, zq, table, n_concepts, valid_only)["query"]
    nb = search_clip(rows, q, k, progress=progress)
    result["clip"] = _hits(rows, nb, 0, space, zq, table, n_concepts, valid_only)
    if sae_space:
        if space is None:
            raise ValueError("SAE-space search needs an SAE")
        nb = search_sae(space, rows, zq, k, progress=progress)
        result["sae"] = _hits(rows, nb, 0, space, zq, table, n_concepts, valid_only)
    for edits in steer or []:
        if space is None:
            raise ValueError("steered search needs an SAE")
        x_new = space.edit(q, edits, error_term=error_term).cpu()
        drift = float(1.0 - torch.nn.functional.cosine_similarity(x_new, q.to(x_new))[0])
        nb = search_clip(rows, x_new, k, progress=progress)
        watch = [e.index for e in edits]
        entry = {
            "edits": [{"neuron": e.index, "concept": table.labels[e.index] if table else f"#{e.index}",
                       "mode": e.mode, "value": e.value, "original": float(zq[e.index])} for e in edits],
            "distance_from_query": drift,
            "hits": _hits(rows, nb, 0, space, zq, table, n_concepts, valid_only, watch),
        }
        result.setdefault("steered", []).append(entry)
    return result


def parse_steering(specs: list[str], table: ConceptTable | None) -> list[list[Edit]]:
    """Steered searches from specs such as ['germany=20,30', 'police=+5']: one search per value
    position, every spec acting together in each ('police' the same in both searches here)."""
    parsed = []
    for spec in specs:
        name, _, values = spec.partition("=")
        parsed.append([parse_steer(f"{name}={v}", table) for v in values.split(",")] if values else [parse_steer(spec, table)])
    n = max((len(p) for p in parsed), default=0)
    if any(len(p) not in (1, n) for p in parsed):
        raise ValueError(f"steering value lists must have the same length (or a single value): {specs}")
    return [[p[min(i, len(p) - 1)] for p in parsed] for i in range(n)]


def query_embedding(rows: RowSet, *, row: int | None = None, id: str | None = None, embedding: str | None = None,
                    image: Any = None, text: str | None = None, clip: Any = None) -> tuple[np.ndarray, dict]:
    """One query as a raw CLIP embedding, and how to describe it: a row of `rows` (by number or
    id), FILE.npy[:ROW] (a raw embedding), or an image (a path, the file's bytes or a PIL image) or
    a text through `clip` (a LoadedClip)."""
    given = [k for k, v in dict(row=row, id=id, embedding=embedding, image=image, text=text).items() if v is not None]
    if len(given) != 1:
        raise ValueError("give exactly one query: a row, an id, an embedding file, an image or a text")
    if id is not None:
        if id not in rows.ids:
            raise ValueError(f"no row with id {id!r} in {rows.source.description}")
        row = rows.ids.index(id)
    if row is not None:
        if not 0 <= row < rows.n_rows:
            raise ValueError(f"query row {row}: the data has {rows.n_rows} rows")
        return rows.source.read(row, row + 1)[0], rows.describe(row)
    if embedding is not None:
        from ..fileio import load_npy

        path, _, r = embedding.partition(":")
        m = load_npy(path)
        vec = m[int(r or 0)] if m.ndim == 2 else m
        return np.asarray(vec, np.float32), {"embedding": embedding}
    if clip is None:
        raise ValueError("an image or text query needs a CLIP model (--clip MODEL --pretrained TAG: the index's)")
    from ..embed.extract import encode_images, encode_texts

    if text is not None:
        return encode_texts(clip, [text])[0], {"text": text}
    from PIL import Image, UnidentifiedImageError

    described = {"image": image if isinstance(image, (str, Path)) else "uploaded image"}
    if not isinstance(image, Image.Image):
        try:
            image = Image.open(io.BytesIO(image) if isinstance(image, bytes) else image)
        except (UnidentifiedImageError, OSError):
            raise ValueError(f"{described['image']}: not an image that PIL can read") from None
    return encode_images(clip, clip.preprocess(image.convert("RGB"))[None])[0], described


def parse_steer(spec: str, table: ConceptTable | None) -> Edit:
    """'CONCEPT=VALUE' sets a magnitude, 'CONCEPT=+VALUE' / '=-VALUE' raises / lowers it. CONCEPT is a
    word of the concepts file or a neuron index ('#123')."""
    name, sep, value = spec.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise ValueError(f"--steer {spec!r}: expected CONCEPT=VALUE (set) or CONCEPT=+VALUE (raise)")
    value = value.strip()
    mode = "add" if value[0] in "+-" else "set"
    try:
        v = float(value)
    except ValueError:
        raise ValueError(f"--steer {spec!r}: {value!r} is not a number") from None
    if table is not None:
        index = table.resolve(name)
    elif name.strip().lstrip("#").isdigit():
        index = int(name.strip().lstrip("#"))
    else:
        raise ValueError(f"--steer {spec!r}: naming a concept by word needs --concepts concepts.json")
    return Edit(index=index, value=v, mode=mode)


def save_search_figure(rows: RowSet, result: dict[str, Any], path) -> Any:
    """Query and neighbours as images (figures 7, 21), when the rows' images can be read back."""
    from ..plots import image_grid

    panels = []
    q = result.get("query", {})
    if "row" in q:
        img = rows.load_image(q["row"])
        if img is not None:
            panels.append((img, "query"))
    sections = [("CLIP", result["clip"])] + ([("SAE", result["sae"])] if "sae" in result else [])
    sections += [(f"steered {i + 1}", s["hits"]) for i, s in enumerate(result.get("steered", []))]
    for name, hits in sections:
        for h in hits:
            img = rows.load_image(h["row"])
            if img is not None:
                shared = ", ".join(h["concepts"]["shared"][:3]) if "concepts" in h else ""
                panels.append((img, f"{name} {h['distance']:.3f}" + (f"\n{shared}" if shared else "")))
    if not panels:
        return None
    return image_grid(panels, path, "similarity search", cols=min(len(panels), result["k"] + 1))
