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
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
