"""Seed stability of learned directions (appendix H, Table 18; Paulo & Belrose 2025).

For two SAEs trained on the same data with different seeds, the unit-normalised decoder
directions (sae-lens's W_dec rows) of one are matched one-to-one to those of the other so that
the total cosine is largest (the Hungarian assignment), and the same for the encoder directions
(W_enc columns). Reported per pair: the mean matched cosine and the fraction of matched latents
above 0.7; over all pairs of a group, their mean and standard deviation.

Up to `EXACT_MAX` latents the assignment is solved on the dense cosine matrix
(scipy.optimize.linear_sum_assignment). Wider dictionaries keep each latent's `candidates` most
similar partners from both sides and solve the assignment on that sparse graph
(scipy.sparse.csgraph.min_weight_full_bipartite_matching, exact on the graph it is given); the
tests show it equals the dense assignment on related and on unrelated dictionaries small enough
to run both, and the report names the method used.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import torch

THRESHOLD = 0.7
EXACT_MAX = 8192
KINDS = ("decoder", "encoder")


def directions(sae: Any, kind: str) -> torch.Tensor:
    """(d_sae, d_in) unit vectors: the decoder rows or the encoder columns."""
    if kind not in KINDS:
        raise ValueError(f"unknown direction kind {kind!r}; expected one of {KINDS}")
    w = sae.W_dec if kind == "decoder" else sae.W_enc.T
    return torch.nn.functional.normalize(w.detach().float().cpu(), dim=-1)


def _candidates(a: torch.Tensor, b: torch.Tensor, m: int, block: int) -> tuple[np.ndarray, ...]:
    """Edges (row, col, cosine) joining each row of `a` to its m most similar rows of `b`, and each
    row of `b` to its m most similar rows of `a`; cosines computed a block at a time."""
    rows, cols, vals = [], [], []
    for x, y, flip in ((a, b, False), (b, a, True)):
        k = min(m, len(y))
        for s in range(0, len(x), block):
            v, idx = (x[s : s + block] @ y.T).topk(k, dim=1)
            here = np.repeat(np.arange(s, s + len(idx)), k)
            (cols if flip else rows).append(here)
            (rows if flip else cols).append(idx.reshape(-1).numpy())
            vals.append(v.reshape(-1).double().numpy())
    key, first = np.unique(np.concatenate(rows).astype(np.int64) * len(b) + np.concatenate(cols), return_index=True)
    return key // len(b), key % len(b), np.concatenate(vals)[first]


def match(a: torch.Tensor, b: torch.Tensor, exact_max: int = EXACT_MAX, candidates: int = 64,
          block: int = 2048) -> tuple[np.ndarray, str]:
    """Cosines of the one-to-one matching of unit rows of `a` to unit rows of `b` that maximises
    their sum (min(len(a), len(b)) of them), and the method that found it."""
    from scipy.optimize import linear_sum_assignment

    if a.shape[1] != b.shape[1]:
        raise ValueError(f"directions of dimension {a.shape[1]} and {b.shape[1]} cannot be matched (different d_in)")
    if max(len(a), len(b)) <= exact_max:
        cos = (a.double() @ b.double().T).numpy()
        r, c = linear_sum_assignment(cos, maximize=True)
        return cos[r, c], "exact"
    import scipy.sparse as sp
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    m = candidates
    while True:
        r, c, cos = _candidates(a, b, m, block)
        graph = sp.csr_matrix((2.0 - cos, (r, c)), shape=(len(a), len(b)))  # weights > 0: 0 means no edge
        try:
            rr, cc = min_weight_full_bipartite_matching(graph)
        except ValueError:  # no full matching among the candidates: widen them
            if m >= max(len(a), len(b)):
                raise
            m *= 2
            continue
        matched = np.einsum("ij,ij->i", a[rr].double().numpy(), b[cc].double().numpy())
        return matched, f"sparse ({m} candidates per latent)"


def pair_stability(sae_a: Any, sae_b: Any, threshold: float = THRESHOLD, **kw: Any) -> dict[str, Any]:
    """Matched-cosine statistics of two SAEs' decoder and encoder directions."""
    if sae_a.cfg.d_in != sae_b.cfg.d_in:
        raise ValueError(f"the SAEs have d_in {sae_a.cfg.d_in} and {sae_b.cfg.d_in}: not the same embeddings")
    out: dict[str, Any] = {}
    for kind in KINDS:
        cos, method = match(directions(sae_a, kind), directions(sae_b, kind), **kw)
        out[f"{kind}_mean_cos"] = float(cos.mean())
        out[f"{kind}_frac_above_{threshold}"] = float((cos > threshold).mean())
        out[f"{kind}_method"] = method
    return out


def stability(saes: dict[str, Any], threshold: float = THRESHOLD, progress: bool = False, **kw: Any) -> dict[str, Any]:
    """Every pair of `saes` (name -> SAE) and the mean and standard deviation over the pairs."""
    if len(saes) < 2:
        raise ValueError("stability compares SAEs: give at least two (the same config, different seeds)")
    pairs = []
    names = list(saes)
    for a, b in itertools.combinations(names, 2):
        if progress:
            print(f"matching {a} and {b} ...", flush=True)
        pairs.append({"a": a, "b": b, **pair_stability(saes[a], saes[b], threshold, **kw)})
    keys = [k for k in pairs[0] if k.endswith("_cos") or "_frac_above_" in k]
    summary = {k: float(np.mean([p[k] for p in pairs])) for k in keys}
    spread = {k: float(np.std([p[k] for p in pairs], ddof=1)) if len(pairs) > 1 else 0.0 for k in keys}
    return {"format": "msae-stability", "threshold": threshold, "saes": names, "pairs": pairs,
            "mean": summary, "std": spread}


def expected_chance_max(n: int, d: int) -> float:
    """E[max of n cosines] between one random unit vector and n others in d dimensions, each cosine
    taken as N(0, 1/d): the most any latent of an unrelated dictionary can expect, an upper bound
    on the mean matched cosine of two unrelated dictionaries of n latents."""
    from scipy import integrate, stats

    f = lambda x: x * n * stats.norm.pdf(x) * stats.norm.cdf(x) ** (n - 1)  # noqa: E731
    return float(integrate.quad(f, -10, 10, limit=200)[0]) / np.sqrt(d)


def load_stability(path: str | Path) -> dict[str, Any]:
    import json

    doc = json.loads(Path(path).read_text())
    if doc.get("format") != "msae-stability":
        raise ValueError(f"{path}: not a stability report written by `msae stability`")
    return doc
