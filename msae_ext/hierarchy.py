"""Does an SAE recover a known hierarchy of features? Metrics against a ground-truth forest.

The data come from sae-lens's synthetic module (`sae_lens.synthetic`): true feature directions
(a dictionary) and a forest over them (roots, children, grandchildren; a child fires only with its
parent). Given an SAE's decoder and activations on rows whose true feature activations are known:

    matching      true feature -> latent, one-to-one, maximising the total cosine between true
                  directions and decoder rows (Hungarian; scipy's linear_sum_assignment)
    matched_cosine  mean cosine over that matching; `mcc` is sae-lens's mean_correlation_coefficient
                  (the same matching on absolute cosines)
    recovered     fraction of true features some latent's decoder row matches at cosine > 0.9,
                  overall and per tree depth (0 = roots)
    absorption    over events (row, child c) where c fires: the fraction in which the latent
                  matched to c's parent is off, i.e. the child's latent absorbed the parent
                  (Chanin et al. 2024); per depth of the child as well
    parent_alone_miss   over events where a parent fires and none of its children does: the
                  fraction in which its latent is off (a latent that is simply weak, not absorbed)
    nesting       for nested models: the Matryoshka level k (the smallest k of `levels` with the
                  latent's rank in its row below k) at which each true feature's latent typically
                  enters, median over the rows where both fire; coarse features should enter early
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

RECOVERED_AT = 0.9


@dataclass
class Forest:
    """parent[f] (-1: a root, or a feature outside every tree) and depth[f] (-1: outside)."""

    parent: np.ndarray
    depth: np.ndarray

    @classmethod
    def from_roots(cls, roots: Sequence[Any], num_features: int) -> "Forest":
        """From sae-lens's `HierarchyNode` trees (`SyntheticModel.hierarchy.roots`)."""
        parent = np.full(num_features, -1, dtype=np.int64)
        depth = np.full(num_features, -1, dtype=np.int64)

        def walk(node: Any, up: int, d: int) -> None:
            here = node.feature_index
            if here is not None:
                parent[here], depth[here] = up, d
            for child in node.children:
                walk(child, here if here is not None else up, d + 1 if here is not None else d)

        for root in roots:
            walk(root, -1, 0)
        return cls(parent, depth)

    def children(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for c, p in enumerate(self.parent.tolist()):
            if p >= 0:
                out.setdefault(p, []).append(c)
        return out


def cosines(decoder: torch.Tensor, true_features: torch.Tensor) -> np.ndarray:
    """(num_features, d_sae) cosine of every true direction with every decoder row."""
    a = torch.nn.functional.normalize(true_features.detach().double().cpu(), dim=-1)
    b = torch.nn.functional.normalize(decoder.detach().double().cpu(), dim=-1)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"true features of dimension {a.shape[1]}, decoder rows of dimension {b.shape[1]}")
    return (a @ b.T).numpy()


def match_features(decoder: torch.Tensor, true_features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(latent matched to each true feature, its cosine): the one-to-one matching of largest total
    cosine. Needs at least as many latents as true features."""
    from scipy.optimize import linear_sum_assignment

    cos = cosines(decoder, true_features)
    if cos.shape[0] > cos.shape[1]:
        raise ValueError(f"{cos.shape[0]} true features but only {cos.shape[1]} latents to match them to")
    rows, cols = linear_sum_assignment(cos, maximize=True)
    latent = np.empty(cos.shape[0], dtype=np.int64)
    latent[rows] = cols
    return latent, cos[np.arange(len(latent)), latent]


def _by_depth(values: np.ndarray, depth: np.ndarray) -> dict[str, float]:
    return {str(d): float(values[depth == d].mean()) for d in sorted(set(depth.tolist())) if d >= 0}


@torch.no_grad()
def hierarchy_report(z: torch.Tensor, true_acts: torch.Tensor, decoder: torch.Tensor, true_features: torch.Tensor,
                     forest: Forest, levels: Sequence[int] | None = None) -> dict[str, Any]:
    """The metrics of the module docstring, from activations `z` (rows, d_sae) and the true feature
    activations `true_acts` (rows, num_features) of the same rows."""
    if len(z) != len(true_acts):
        raise ValueError(f"{len(z)} rows of activations but {len(true_acts)} rows of true activations")
    from sae_lens.synthetic import mean_correlation_coefficient

    latent, matched = match_features(decoder, true_features)
    best = cosines(decoder, true_features).max(axis=1)
    fires = (true_acts > 0).cpu().numpy()
    on = (z[:, torch.as_tensor(latent)] > 0).cpu().numpy()  # (rows, num_features): the matched latent is on
    depth = forest.depth
    in_forest = depth >= 0
    report: dict[str, Any] = {
        "mcc": mean_correlation_coefficient(decoder.detach().float().cpu(), true_features.detach().float().cpu()),
        "matched_cosine": float(matched.mean()),
        "recovered": float((best > RECOVERED_AT).mean()),
        "recovered_by_depth": _by_depth((best > RECOVERED_AT).astype(float), np.where(in_forest, depth, -1)),
        "matched_cosine_by_depth": _by_depth(matched, np.where(in_forest, depth, -1)),
    }
    # absorption: pooled over (row, child) events; per depth of the child
    events = missed = 0
    by_depth: dict[int, list[int]] = {}
    for c in np.flatnonzero(forest.parent >= 0):
        p = forest.parent[c]
        rows = fires[:, c]
        n, m = int(rows.sum()), int((rows & ~on[:, p]).sum())
        events, missed = events + n, missed + m
        acc = by_depth.setdefault(int(depth[c]), [0, 0])
        acc[0], acc[1] = acc[0] + n, acc[1] + m
    report["absorption"] = missed / events if events else None
    report["absorption_by_depth"] = {str(d): (m / n if n else None) for d, (n, m) in sorted(by_depth.items())}
    report["child_events"] = events
    alone = alone_missed = 0
    for p, kids in forest.children().items():
        rows = fires[:, p] & ~fires[:, kids].any(axis=1)
        alone, alone_missed = alone + int(rows.sum()), alone_missed + int((rows & ~on[:, p]).sum())
    report["parent_alone_miss"] = alone_missed / alone if alone else None
    if levels:
        report.update(nesting_levels(z, fires, latent, depth, levels))
    return report


def nesting_levels(z: torch.Tensor, fires: np.ndarray, latent: np.ndarray, depth: np.ndarray,
                   levels: Sequence[int]) -> dict[str, Any]:
    """Per true feature, the median level at which its matched latent enters its rows' top-k."""
    lv = torch.as_tensor(sorted(levels))
    order = z.argsort(dim=1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(z.shape[1]).expand_as(order))  # 0 = the row's largest
    entered = lv[torch.searchsorted(lv, rank[:, torch.as_tensor(latent)] + 1).clamp_max(len(lv) - 1)].numpy()
    active = fires & (z[:, torch.as_tensor(latent)] > 0).cpu().numpy()
    per_feature = np.array([np.median(entered[active[:, f], f]) if active[:, f].any() else np.nan
                            for f in range(len(latent))])
    keep = (depth >= 0) & ~np.isnan(per_feature)
    return {"nesting_level_by_depth": {str(d): float(np.median(per_feature[keep & (depth == d)]))
                                       for d in sorted(set(depth[keep].tolist()))},
            "nesting_level_per_feature": [None if np.isnan(v) else float(v) for v in per_feature]}
