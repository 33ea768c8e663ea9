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

The benchmark also scores the true features themselves at each L0 (`ORACLE`): the true dictionary
with each row's L0 largest true activations. Recovery and MCC are 1; its absorption and FVU are
what cutting the rows to L0 features costs the true dictionary itself, a reference for the SAEs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

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
    return _match(cosines(decoder, true_features))


def _match(cos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from scipy.optimize import linear_sum_assignment

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

    cos = cosines(decoder, true_features)  # one (num_features, d_sae) matrix for the matching and recovery
    latent, matched = _match(cos)
    best = cos.max(axis=1)
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


def entry_levels(z: torch.Tensor, levels: Sequence[int]) -> torch.Tensor:
    """(rows, d_sae): the smallest level k of `levels` whose top-k of the row holds the latent
    (its rank in the row below k); past the largest level, the largest."""
    lv = torch.as_tensor(sorted(levels))
    order = z.argsort(dim=1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(z.shape[1]).expand_as(order))  # 0 = the row's largest
    return lv[torch.searchsorted(lv, rank + 1).clamp_max(len(lv) - 1)]


def nesting_levels(z: torch.Tensor, fires: np.ndarray, latent: np.ndarray, depth: np.ndarray,
                   levels: Sequence[int]) -> dict[str, Any]:
    """Per true feature, the median level at which its matched latent enters its rows' top-k."""
    entered = entry_levels(z, levels)[:, torch.as_tensor(latent)].numpy()
    active = fires & (z[:, torch.as_tensor(latent)] > 0).cpu().numpy()
    per_feature = np.array([np.median(entered[active[:, f], f]) if active[:, f].any() else np.nan
                            for f in range(len(latent))])
    keep = (depth >= 0) & ~np.isnan(per_feature)
    return {"nesting_level_by_depth": {str(d): float(np.median(per_feature[keep & (depth == d)]))
                                       for d in sorted(set(depth[keep].tolist()))},
            "nesting_level_per_feature": [None if np.isnan(v) else float(v) for v in per_feature]}


# -- the benchmark: `msae bench hierarchy` ---------------------------------------------------------

@dataclass
class BenchSize:
    num_features: int = 256
    hidden_dim: int = 64
    roots: int = 16
    branching: int = 3
    depth: int = 2
    exclusive: float = 0.5  # fraction of parents whose children are mutually exclusive
    train_rows: int = 100_000
    eval_rows: int = 4_000
    epochs: int = 15
    batch_size: int = 512


BENCH_QUICK = BenchSize(num_features=64, hidden_dim=32, roots=4, branching=3, train_rows=4_000, eval_rows=1_000,
                        epochs=2, batch_size=256)

@dataclass(frozen=True)
class Family:
    slug: str  # its runs' folder names
    entry: Callable[[int], dict[str, Any]]  # the run-config entry for a target L0 t
    t_free: bool = False  # its model does not depend on t: trained once per seed


#: every architecture of the benchmark. Each is compared at matched L0: each eval row keeps its t
#: largest activations (MSAE's nested levels, ReLU and JumpReLU included)
FAMILY = {
    "TopK": Family("topk", lambda t: {"architecture": "topk", "k": t, "lr": 3e-3}),
    "BatchTopK": Family("batchtopk", lambda t: {"architecture": "batchtopk", "k": t, "lr": 3e-3}),
    "MSAE (RW)": Family("msae_rw", lambda t: {"architecture": "msae", "weighting": "rw", "k_min": 4, "lr": 3e-3},
                        t_free=True),
    "MSAE (UW)": Family("msae_uw", lambda t: {"architecture": "msae", "weighting": "uw", "k_min": 4, "lr": 3e-3},
                        t_free=True),
    # sae-lens's latent-prefix Matryoshka (Bussmann et al. 2025), here as `architecture: matryoshka`
    "Matryoshka BatchTopK": Family("matryoshka", lambda t: {"architecture": "matryoshka", "k": t, "lr": 3e-3}),
    # HierarchicalTopK (every k up to K, per sample, equal weights): MSAE's one-sort loss over k = 1..t
    "HierarchicalTopK": Family("htopk", lambda t: {"architecture": "msae", "k_list": list(range(1, t + 1)),
                                                   "weighting": "uw", "lr": 3e-3}),
    # msae_ext's variant: nested by latent prefix and by k, balanced weights (matryoshka_topk.py)
    "Matryoshka TopK": Family("mtopk", lambda t: {"architecture": "matryoshka_topk", "k": t, "lr": 3e-3}),
    "ReLU": Family("relu", lambda t: {"architecture": "relu", "l1_coefficient": 0.01, "lr": 3e-3}, t_free=True),
    "JumpReLU": Family("jumprelu", lambda t: {"architecture": "jumprelu", "l0_coefficient": 0.01, "lr": 3e-3},
                       t_free=True),
}


def family_runs(families: Sequence[str] | None, l0_targets: Sequence[int], seeds: Sequence[int],
                **overrides: Any) -> tuple[list[dict[str, Any]], list[tuple[str, int, int, str]]]:
    """The run-config entries of every family (default all of FAMILY) at every target L0 and seed,
    and per entry (family, trained L0, seed, run name); a t-free family trains once per seed."""
    families = list(families or FAMILY)
    unknown = [f for f in families if f not in FAMILY]
    if unknown:
        raise ValueError(f"unknown families {unknown}; choose from {list(FAMILY)}")
    entries, members = [], []
    for seed in seeds:
        for fam in families:
            for t in ([max(l0_targets)] if FAMILY[fam].t_free else l0_targets):
                name = f"{FAMILY[fam].slug}_t{t}_s{seed}"
                entries.append({"name": name, "seed": seed, **FAMILY[fam].entry(t), **overrides})
                members.append((fam, t, seed, name))
    return entries, members


#: the row of the true features cut to each L0 (module docstring)
ORACLE = "true features, top-L0"


def synthetic_hierarchy(size: BenchSize, seed: int = 0):
    """sae-lens's synthetic model with a forest of `roots` trees: (model, forest)."""
    in_trees = size.roots * sum(size.branching ** d for d in range(size.depth + 1))
    if in_trees > size.num_features:
        raise ValueError(f"{size.roots} trees of branching {size.branching} and depth {size.depth} need "
                         f"{in_trees} features, more than num_features={size.num_features}")
    from sae_lens.synthetic import HierarchyConfig, SyntheticModel, SyntheticModelConfig, ZipfianFiringProbabilityConfig

    cfg = SyntheticModelConfig(
        num_features=size.num_features, hidden_dim=size.hidden_dim,
        firing_probability=ZipfianFiringProbabilityConfig(max_prob=0.4, min_prob=0.01),
        hierarchy=HierarchyConfig(total_root_nodes=size.roots, branching_factor=size.branching, max_depth=size.depth,
                                  mutually_exclusive_portion=size.exclusive, compensate_probabilities=True),
        std_firing_magnitudes=0.2, seed=seed)
    model = SyntheticModel(cfg)
    return model, Forest.from_roots(model.hierarchy.roots, size.num_features)


def run_hierarchy_bench(out_dir: str | Path, *, l0_targets: Sequence[int] = (4, 8, 16), seeds: Sequence[int] = (0, 1, 2),
                        size: BenchSize | None = None, families: Sequence[str] | None = None,
                        progress: bool = True) -> dict[str, Any]:
    """Train every family (FAMILY) at every target L0 and seed in one data pass on synthetic
    hierarchical data, score each against the true forest (`hierarchy_report`), and write
    hierarchy.json, hierarchy.md and hierarchy.png (mean and std over seeds) into out_dir."""
    import json

    from .architectures import resolve_k_list
    from .config import TrainConfig
    from .loading import load_sae
    from .metrics import fvu, keep_topk_by_magnitude
    from .normalization import get_stats
    from .train import train_many

    size = size or BenchSize()
    entries, members = family_runs(families, l0_targets, seeds)
    out = Path(out_dir)
    (out / "data").mkdir(parents=True, exist_ok=True)
    model, forest = synthetic_hierarchy(size)
    torch.manual_seed(0)
    x_train, _ = model.sample_with_features(size.train_rows)
    x_eval, f_eval = model.sample_with_features(size.eval_rows)
    np.save(out / "data" / "train.npy", x_train.numpy().astype(np.float32))
    truth = model.feature_dict.feature_vectors.detach()
    cfg = TrainConfig.from_dict(dict(train_data=str(out / "data" / "train.npy"), architecture="topk",
                                     d_sae=size.num_features, epochs=size.epochs,
                                     batch_size=size.batch_size, eval_every=0, checkpoint_every=0, final_eval=False,
                                     saes=entries))
    train_many(cfg, out / "runs", resume=True, progress=progress)
    rows = []
    for fam, t_trained, seed, name in members:
        sae = load_sae(out / "runs" / name)
        stats = get_stats(sae, "image")
        x = stats.apply(x_eval.float())
        with torch.no_grad():
            z_all = sae.encode(x)
        levels = resolve_k_list(sae.cfg.d_sae, getattr(sae.cfg, "k_list", None) or None, k_min=1)
        for t in (l0_targets if FAMILY[fam].t_free else [t_trained]):
            z = keep_topk_by_magnitude(z_all, t)
            r = hierarchy_report(z, f_eval, sae.W_dec, truth, forest, levels=levels)
            r.pop("nesting_level_per_feature")
            with torch.no_grad():
                r["fvu"] = fvu(x, sae.decode(z))
            rows.append({"family": fam, "l0": t, "seed": seed, **r})
    for t in l0_targets:  # the reference: the true dictionary, each row cut to its t largest true activations
        z = keep_topk_by_magnitude(f_eval.float(), t)
        r = hierarchy_report(z, f_eval, truth, truth, forest, levels=resolve_k_list(size.num_features, None, k_min=1))
        r.pop("nesting_level_per_feature")
        with torch.no_grad():
            r["fvu"] = fvu(x_eval, model.feature_dict(z))
        rows.append({"family": ORACLE, "l0": t, "seed": None, **r})
    summary = _summarise(rows)
    (out / "hierarchy.json").write_text(json.dumps({"size": size.__dict__, "l0_targets": list(l0_targets),
                                                    "seeds": list(seeds), "runs": rows, "summary": summary}, indent=1))
    (out / "hierarchy.md").write_text(hierarchy_markdown(summary))
    hierarchy_figure(summary, out / "hierarchy.png")
    return {"runs": rows, "summary": summary}


METRICS = ("mcc", "recovered", "absorption", "parent_alone_miss", "fvu")


def _summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out, order = [], [*FAMILY, ORACLE]
    for key in sorted({(r["family"], r["l0"]) for r in rows}, key=lambda k: (k[1], order.index(k[0]))):
        group = [r for r in rows if (r["family"], r["l0"]) == key]
        s: dict[str, Any] = {"family": key[0], "l0": key[1], "seeds": len(group)}
        for m in METRICS:
            vals = np.array([r[m] for r in group if r[m] is not None], dtype=float)
            s[m], s[f"{m}_std"] = (float(vals.mean()), float(vals.std())) if len(vals) else (None, None)
        for m in ("recovered_by_depth", "nesting_level_by_depth"):
            depths = sorted({d for r in group for d in r.get(m, {})})
            s[m] = {d: float(np.nanmean([r[m].get(d, np.nan) for r in group])) for d in depths}
        out.append(s)
    return out


def hierarchy_markdown(summary: list[dict[str, Any]]) -> str:
    def cell(s, m):
        return "–" if s[m] is None else f"{s[m]:.3f} ± {s[m + '_std']:.3f}"

    depths = sorted({d for s in summary for d in s["recovered_by_depth"]})
    head = ("| L0 | architecture | MCC ↑ | recovered (cos > 0.9) ↑ | " + " | ".join(f"recovered, depth {d}" for d in depths)
            + " | absorption ↓ | parent-alone miss ↓ | FVU ↓ | nesting level k by depth |")
    lines = [head, "|" + "---:|---|" + "---:|" * (5 + len(depths)) + "---|"]
    for s in summary:
        nest = ", ".join(f"{d}: {v:.3g}" for d, v in s["nesting_level_by_depth"].items())
        lines.append(f"| {s['l0']} | {s['family']} | {cell(s, 'mcc')} | {cell(s, 'recovered')} | "
                     + " | ".join(f"{s['recovered_by_depth'].get(d, float('nan')):.3f}" for d in depths)
                     + f" | {cell(s, 'absorption')} | {cell(s, 'parent_alone_miss')} | {cell(s, 'fvu')} | {nest} |")
    return "\n".join(lines) + "\n"


def hierarchy_figure(summary: list[dict[str, Any]], path: str | Path) -> Path:
    """Recovery and absorption against L0, one line per architecture, seed std as error bars."""
    from .plots import _plt

    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.6))
    for fam in dict.fromkeys(s["family"] for s in summary):
        pts = [s for s in summary if s["family"] == fam]
        for ax, m in zip(axes, ("recovered", "absorption", "mcc")):
            style = {"color": "black", "linestyle": "--"} if fam == ORACLE else {}
            ax.errorbar([p["l0"] for p in pts], [p[m] for p in pts], yerr=[p[m + "_std"] for p in pts],
                        marker="o", capsize=3, label=fam, **style)
    for ax, title in zip(axes, ("true features recovered (cos > 0.9) ↑", "absorption ↓", "MCC ↑")):
        ax.set_title(title)
        ax.set_xlabel("L0 (active latents per row)")
        ax.set_xscale("log", base=2)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=5, fontsize=8)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
