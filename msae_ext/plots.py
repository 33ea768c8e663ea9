"""Figures people would rather look at than read: histograms, recovery curves, Pareto fronts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: str | Path, dpi: int) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def activation_histogram(values: torch.Tensor, path: str | Path, bins: int = 80) -> Path:
    """Histogram of non-zero activation magnitudes (section 4.6), log-scaled counts."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    v = values.detach().float().cpu().numpy()
    if v.size:
        ax.hist(v, bins=bins, color="#3b6ea8")
        ax.set_yscale("log")
    ax.set_xlabel("activation magnitude (non-zero latents)")
    ax.set_ylabel("count")
    ax.set_title("SAE activation magnitudes")
    return _save(plt, fig, path, dpi=120)


def progressive_recovery_figure(curves: dict[str, list[dict[str, Any]]], path: str | Path) -> Path:
    """FVU and cosine similarity against the number of kept activations (section 4.7)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, curve in curves.items():
        ks = [p["k"] for p in curve]
        axes[0].plot(ks, [p["fvu"] for p in curve], marker="o", label=name)
        axes[1].plot(ks, [p["cos_sim"] for p in curve], marker="o", label=name)
    for ax, label in zip(axes, ("FVU (lower is better)", "cosine similarity (higher is better)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("top-k activations kept (by magnitude)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Progressive recovery")
    return _save(plt, fig, path, dpi=120)


def sparsity_fidelity_figure(points: list[dict[str, Any]], path: str | Path) -> Path:
    """The paper's Figure 2: L0 (fraction of zeros, higher = sparser) against EVR."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    markers = {"msae": "*", "msae_topk": "s", "msae_batchtopk": "D", "msae_relu": "o"}
    for p in points:
        ax.scatter(p["l0_sparsity"], p["evr"], s=90, marker=markers.get(p.get("architecture", ""), "o"),
                   label=p["name"])
    ax.set_xlabel("L0, fraction of zero latents (→ sparser)")
    ax.set_ylabel("EVR (→ better reconstruction)")
    ax.set_title("Sparsity–fidelity trade-off")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(plt, fig, path, dpi=120)


def pareto_figure(points: list[dict[str, Any]], path: str | Path) -> Path:
    """Sparsity against FVU and against cosine similarity: one curve per architecture through its
    settings, error bars the standard deviation over seeds, the frontier ringed and joined."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    series = sorted({p["series"] for p in points})
    for ax, key, label in ((axes[0], "fvu", "FVU (← better reconstruction)"),
                           (axes[1], "cos_sim", "cosine similarity (→ better reconstruction)")):
        for name in series:
            ps = sorted((p for p in points if p["series"] == name), key=lambda p: p["l0_sparsity"])
            ax.errorbar([p["l0_sparsity"] for p in ps], [p[key] for p in ps],
                        xerr=[p["l0_sparsity_std"] for p in ps], yerr=[p[f"{key}_std"] for p in ps],
                        marker="o", ms=4, capsize=3, label=name)
        front = sorted((p for p in points if p["frontier"]), key=lambda p: p["l0_sparsity"])
        ax.plot([p["l0_sparsity"] for p in front], [p[key] for p in front], "k--", lw=0.8, label="frontier")
        ax.scatter([p["l0_sparsity"] for p in front], [p[key] for p in front], s=110, facecolors="none",
                   edgecolors="k", lw=1)
        ax.set_xlabel("L0, fraction of zero latents (→ sparser)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle("Sparsity–reconstruction Pareto view (mean ± std over seeds)")
    return _save(plt, fig, path, dpi=120)


def image_grid(images: list[tuple[Any, str]], path: str | Path, title: str = "", cols: int = 3) -> Path:
    """A grid of (PIL image, caption) pairs: top-activating examples (figures 18, 22)."""
    plt = _plt()
    cols = max(1, min(cols, len(images)))
    rows = -(-len(images) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.6 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (img, caption) in zip(axes.flat, images):
        ax.imshow(img)
        ax.set_title(caption, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(plt, fig, path, dpi=100)


def concept_similarity_figure(best_per_word: list[float], threshold: float, path: str | Path) -> Path:
    """Distribution of each word's highest neuron similarity (appendix A, figure 9)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(best_per_word, bins=60, color="#3b6ea8")
    ax.axvline(threshold, color="#c0392b", linestyle="--", label=f"threshold {threshold}")
    ax.set_xlabel("highest cosine similarity with a decoder direction, per word")
    ax.set_ylabel("words")
    ax.legend()
    return _save(plt, fig, path, dpi=120)


def concept_distribution_figure(magnitudes: dict[str, Any], pred: Any, path: str | Path) -> Path:
    """Per concept: density and box plot of its magnitude by predicted class (figure 24)."""
    import numpy as np

    plt = _plt()
    names = list(magnitudes)
    fig, axes = plt.subplots(len(names), 2, figsize=(9, 2.6 * len(names)), squeeze=False)
    colors = {0: "#3b6ea8", 1: "#d9822b"}
    for (ax_d, ax_b), name in zip(axes, names):
        a = np.asarray(magnitudes[name], dtype=np.float64)
        groups = {c: a[np.asarray(pred) == c] for c in (0, 1)}
        hi = float(a.max()) if a.size and a.max() > 0 else 1.0
        grid = np.linspace(0.0, hi, 200)
        for c, g in groups.items():
            if g.size > 1 and np.ptp(g) > 0:
                from scipy.stats import gaussian_kde

                ax_d.plot(grid, gaussian_kde(g)(grid), color=colors[c], label=f"predicted {c}")
            elif g.size:
                ax_d.axvline(float(g.mean()), color=colors[c], label=f"predicted {c} (constant)")
        ax_d.set_title(f"{name}: density", fontsize=9)
        ax_d.set_xlabel("concept magnitude")
        ax_d.legend(fontsize=7)
        ax_b.boxplot([groups[0], groups[1]], showfliers=False)
        ax_b.set_xticks([1, 2], ["0", "1"])
        ax_b.set_title(f"{name}: box plot", fontsize=9)
        ax_b.set_xlabel("probe prediction")
        ax_b.set_ylabel("concept magnitude")
    return _save(plt, fig, path, dpi=110)


def counterfactual_figure(curves: list[dict[str, Any]], path: str | Path) -> Path:
    """Class probability against a concept's magnitude for one example (figures 6, 23)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(curves), figsize=(3.6 * len(curves), 3.2), squeeze=False)
    for ax, c in zip(axes[0], curves):
        ax.plot(c["magnitudes"], c["probabilities"], color="#3b6ea8", label="class probability")
        ax.axvline(c["original_magnitude"], color="#2e8b57", linestyle=":", label="original value")
        ax.axhline(0.5, color="#c0392b", linestyle="--", label="threshold")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("neuron magnitude")
        ax.set_title(f"effect of concept {c['concept']}", fontsize=9)
    axes[0][0].set_ylabel("class probability")
    axes[0][-1].legend(fontsize=7)
    first = curves[0]
    fig.suptitle(f"row {first['row']} ({first['id']}); p(class 1) = {first['probability']:.2f}", fontsize=10)
    return _save(plt, fig, path, dpi=110)
