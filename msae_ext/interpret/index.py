"""The latent index a concept browser reads: computed in one streamed pass over an embedding set,
saved once next to the SAE, then read a latent at a time.

Per latent, over every row of the set (the paper's inference: ReLU only):
    fires, sum, max          firing count, sum of activations (mean = sum / fires), maximum
    hist                     counts of its non-zero activations in `BIN_EDGES` (log-spaced bins)
    top_values, top_rows     its `n_top` largest activations and their rows
    band_rows                one row drawn uniformly from each histogram bin (-1: empty bin), the
                             samples of each activation band (a reservoir of one per bin)
    level_counts             over the first `nesting_rows` rows: how often the latent ranks inside
                             each Matryoshka level k (its k-list, or powers of two up to d_sae) but
                             not the one below; `nesting_level` is the level of its median rank

Memory is bounded by one (batch_size, d_sae) block plus O(d_sae x (n_top + bins)) state, whatever
the number of rows. What a page needs beyond this (the latents it co-fires with, its nearest
latents by decoder direction) is computed when the page is asked for, from these arrays and the
SAE's weights.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .examples import _merge_top
from .space import ConceptSpace

INDEX_FILE = "index.safetensors"
META_FILE = "index.json"
FORMAT = "msae-latent-index"
#: histogram bins of a non-zero activation, log-spaced over the range SAE activations take in the
#: paper's preprocessed space (inputs of norm sqrt(d_in)); the end bins catch everything outside
BIN_EDGES = np.concatenate([[0.0], np.logspace(-3, 3, 49), [np.inf]])


def levels_for(sae) -> list[int]:
    """The Matryoshka levels of an MSAE (its k-list), else powers of two up to d_sae."""
    from ..architectures import resolve_k_list

    return resolve_k_list(sae.cfg.d_sae, getattr(sae.cfg, "k_list", None) or None, k_min=1)


@torch.no_grad()
def build_index(space: ConceptSpace, source, out_dir: str | Path, *, n_top: int = 16, nesting_rows: int = 20_000,
                batch_size: int = 2048, seed: int = 0, progress: bool = True) -> Path:
    """One pass over `source` (an embedding source of raw CLIP rows): the index's arrays, written
    into out_dir (module docstring)."""
    from safetensors.torch import save_file

    d_sae, n = space.d_sae, source.n_rows
    edges = torch.from_numpy(BIN_EDGES[1:-1]).float()
    n_bins = len(BIN_EDGES) - 1
    levels = torch.tensor(levels_for(space.sae))
    fires = torch.zeros(d_sae, dtype=torch.int64)
    total = torch.zeros(d_sae, dtype=torch.float64)
    vmax = torch.zeros(d_sae)
    hist = torch.zeros(d_sae * n_bins, dtype=torch.int64)
    top_v = torch.full((0, d_sae), -float("inf"))
    top_r = torch.zeros((0, d_sae), dtype=torch.int64)
    band_key = torch.full((d_sae * n_bins,), -1.0)
    band_row = torch.full((d_sae * n_bins,), -1, dtype=torch.int64)
    level_counts = torch.zeros(d_sae * len(levels), dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    start_time = time.time()
    for start, _, z in tqdm(space.blocks(source, batch_size), total=-(-n // batch_size), desc="index",
                            unit="block", disable=not progress):
        z = z.float().cpu()
        b = len(z)
        fires += (z > 0).sum(0)
        total += z.sum(0, dtype=torch.float64)
        vmax = torch.maximum(vmax, z.max(0).values)
        v, i = z.topk(min(n_top, b), dim=0)  # the block's own top first: a (n_top, d_sae) merge
        top_v, top_r = _merge_top(top_v, top_r, v, i + start, n_top, largest=True)
        rows, cols = z.nonzero(as_tuple=True)
        vals = z[rows, cols]
        group = cols * n_bins + torch.bucketize(vals, edges)
        hist += torch.bincount(group, minlength=d_sae * n_bins)
        # a uniform sample per (latent, bin): the entry with the largest random key so far
        key = torch.rand(len(vals), generator=g)
        best = torch.full((d_sae * n_bins,), -1.0).scatter_reduce(0, group, key, "amax")
        won = key == best[group]
        better = best > band_key
        band_key = torch.where(better, best, band_key)
        winners = torch.full((d_sae * n_bins,), -1, dtype=torch.int64)
        winners[group[won]] = rows[won] + start
        band_row = torch.where(better, winners, band_row)
        if start < nesting_rows:
            zz = z[: max(0, min(b, nesting_rows - start))]
            order = zz.argsort(dim=1, descending=True)
            rank = torch.empty_like(order)
            rank.scatter_(1, order, torch.arange(d_sae).expand_as(order))
            r_rows, r_cols = (zz > 0).nonzero(as_tuple=True)
            lvl = torch.searchsorted(levels, rank[r_rows, r_cols] + 1)  # smallest k with rank < k
            level_counts += torch.bincount(r_cols * len(levels) + lvl, minlength=d_sae * len(levels))
    counts = level_counts.view(d_sae, len(levels))
    half = (counts.sum(1, keepdim=True) + 1) // 2
    median = (counts.cumsum(1) >= half).float().argmax(1)
    nesting = torch.where(counts.sum(1) > 0, levels[median], torch.zeros_like(median))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({"fires": fires, "sum": total, "max": vmax, "hist": hist.view(d_sae, n_bins),
               "top_values": top_v.contiguous(), "top_rows": top_r.contiguous(),
               "band_rows": band_row.view(d_sae, n_bins), "level_counts": counts.contiguous(),
               "nesting_level": nesting.contiguous()}, out / INDEX_FILE)
    meta = {"format": FORMAT, "n_rows": n, "d_sae": d_sae, "data": source.description, "modality": space.modality,
            "bin_edges": [float(e) for e in BIN_EDGES], "levels": levels.tolist(), "n_top": n_top,
            "nesting_rows": min(nesting_rows, n), "build_seconds": round(time.time() - start_time, 2)}
    (out / META_FILE).write_text(json.dumps(meta, indent=1))
    return out


class LatentIndex:
    """An index read back: the list view over every latent and one latent's page."""

    def __init__(self, path: str | Path, sae, labels: list[str] | None = None):
        from safetensors.torch import load_file

        path = Path(path)
        self.meta = json.loads((path / META_FILE).read_text())
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not a latent index (format {self.meta.get('format')!r})")
        if self.meta["d_sae"] != sae.cfg.d_sae:
            raise ValueError(f"{path}: an index of {self.meta['d_sae']} latents, the SAE has {sae.cfg.d_sae}")
        self.arrays = load_file(path / INDEX_FILE)
        self.sae = sae
        self.labels = labels
        self.frequency = (self.arrays["fires"].double() / max(1, self.meta["n_rows"])).numpy()
        self._decoder = torch.nn.functional.normalize(sae.W_dec.detach().float().cpu(), dim=-1)
        self._space = ConceptSpace(sae, self.meta["modality"])

    def listing(self, query: str = "", sort: str = "frequency", valid: list[bool] | None = None,
                valid_only: bool = False, limit: int = 100) -> list[dict[str, Any]]:
        """Latents matching `query` (a substring of the name, or #index), sorted by frequency, max
        activation or nesting level (coarsest first)."""
        return [self.summary(int(j)) for j in self.order(query, sort, valid, valid_only, limit)]

    def order(self, query: str = "", sort: str = "frequency", valid: list[bool] | None = None,
              valid_only: bool = False, limit: int | None = None) -> np.ndarray:
        """The indices `listing` shows, in its order."""
        keys = {"frequency": -self.frequency, "max": -self.arrays["max"].numpy(),
                "nesting": np.where(self.arrays["nesting_level"].numpy() > 0, self.arrays["nesting_level"].numpy(),
                                    np.iinfo(np.int64).max)}
        if sort not in keys:
            raise ValueError(f"sort must be one of {sorted(keys)}, got {sort!r}")
        mask = np.ones(self.meta["d_sae"], dtype=bool)
        q = query.strip().lower()
        if q.startswith("#") and q[1:].isdigit():
            mask[:] = False
            if int(q[1:]) < len(mask):
                mask[int(q[1:])] = True
        elif q:
            if self.labels is None:
                raise ValueError("searching by name needs concept names (give --concepts)")
            mask &= np.array([q in label.lower() for label in self.labels])
        if valid_only:
            if valid is None:
                raise ValueError("filtering by validation needs concept names (give --concepts)")
            mask &= np.asarray(valid, dtype=bool)
        return np.flatnonzero(mask)[np.argsort(keys[sort][mask], kind="stable")][:limit]

    def summary(self, j: int) -> dict[str, Any]:
        a = self.arrays
        fires = int(a["fires"][j])
        return {"index": j, "label": self.labels[j] if self.labels else None, "frequency": float(self.frequency[j]),
                "max": float(a["max"][j]), "mean_active": float(a["sum"][j]) / fires if fires else 0.0,
                "nesting_level": int(a["nesting_level"][j])}

    def page(self, j: int, n_neighbours: int = 8) -> dict[str, Any]:
        """Everything a latent's page shows that the index holds, plus its nearest latents by decoder
        direction and the latents it co-fires with on its top rows (coarser and finer levels)."""
        if not 0 <= j < self.meta["d_sae"]:
            raise ValueError(f"latent {j} does not exist; the SAE has {self.meta['d_sae']} latents")
        a = self.arrays
        out = self.summary(j)
        top = a["top_values"][:, j]
        keep = top > 0
        out["top"] = [{"row": int(r), "value": float(v)} for r, v in zip(a["top_rows"][:, j][keep], top[keep])]
        edges = self.meta["bin_edges"]
        out["histogram"] = [{"low": edges[b], "high": edges[b + 1], "count": int(c)}
                            for b, c in enumerate(a["hist"][j].tolist()) if c]
        out["bands"] = [{"low": edges[b], "high": edges[b + 1], "row": int(r)}
                        for b, r in enumerate(a["band_rows"][j].tolist()) if r >= 0]
        cos = self._decoder @ self._decoder[j]
        cos[j] = -2
        v, i = cos.topk(n_neighbours)
        out["decoder_neighbours"] = [self._named(int(k), cosine=float(c)) for k, c in zip(i, v)]
        out["level_counts"] = dict(zip(map(str, self.meta["levels"]), a["level_counts"][j].tolist()))
        return out

    def cofiring(self, j: int, top_x: torch.Tensor, n: int = 8) -> dict[str, list[dict[str, Any]]]:
        """The latents most active alongside j on its top rows (`top_x`, their raw embeddings), split
        into those of coarser and of finer nesting levels than j's."""
        z = self._space.encode(top_x).float().cpu()
        z = z[z[:, j] > 0]
        mean = z.mean(0) if len(z) else torch.zeros(self.meta["d_sae"])
        mean[j] = 0
        levels = self.arrays["nesting_level"]
        order = mean.argsort(descending=True)
        order = order[mean[order] > 0]
        coarser = (levels[order] > 0) & (levels[order] <= int(levels[j]))
        return {side: [self._named(int(k), mean_activation=float(mean[k]), nesting_level=int(levels[k]))
                       for k in order[mask][:n]]
                for side, mask in (("coarser", coarser), ("finer", ~coarser))}

    def _named(self, k: int, **extra: Any) -> dict[str, Any]:
        return {"index": k, "label": self.labels[k] if self.labels else None, **extra}
