"""Evaluate a saved SAE on an embedding set: the report behind `msae eval`.

The SAE is fed the modality's preprocessed embeddings (statistics saved with it); reconstructions
are mapped back to CLIP space, where FVU and cosine similarity are reported (FVU is the same in
both spaces; cosine is not). CKNNA compares the raw CLIP embeddings with the SAE activations on a
random subset of 10,000 rows.

Protocols: 'paper' removes any top-k at inference (ReLU only); 'native' uses each architecture's
own activation (TopK keeps its k, BatchTopK its learned threshold; MSAE and ReLU are unchanged).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .architectures import PaperSAE
from .config import TrainConfig
from .loading import load_sae
from .metrics import (
    cknna_subset,
    cosine_similarity,
    decoder_orthogonality,
    probe_agreement,
    probe_kl,
    progressive_recovery,
)
from .normalization import get_stats
from .store import EmbeddingDataError, EmbeddingSource, check_dimension, check_finite_block, open_embeddings, read_all

PROTOCOLS = ("paper", "native")

REPORT_KEYS = (
    "l0_sparsity", "l0_active", "fvu", "evr", "cos_sim", "cknna",
    "decoder_orthogonality", "dead_neurons", "n_samples",
)


def train_linear_probe(
    x: torch.Tensor,
    y: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    *,
    epochs: int = 20,
    lr: float = 1e-3,
    batch_size: int = 256,
    seed: int = 0,
) -> torch.nn.Linear:
    """Linear probe as in section 4.1: AdamW (lr 1e-3), ReduceLROnPlateau, batch 256.

    The epoch with the best validation accuracy is kept; the validation split must not be the
    one reported (the authors' code selects on the reported set).
    """
    g = torch.Generator().manual_seed(seed)
    n_classes = int(max(int(y.max()), int(y_val.max()))) + 1
    probe = torch.nn.Linear(x.shape[1], n_classes)
    with torch.no_grad():
        torch.nn.init.normal_(probe.weight, std=0.01, generator=g)
        probe.bias.zero_()
    probe = probe.to(x.device)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", patience=2)
    best_acc, best_state = -1.0, None
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g).to(x.device)
        for s in range(0, len(x), batch_size):
            idx = perm[s : s + batch_size]
            loss = torch.nn.functional.cross_entropy(probe(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            acc = float((probe(x_val).argmax(-1) == y_val).float().mean())
        sched.step(acc)
        if acc > best_acc:
            best_acc, best_state = acc, {k: v.clone() for k, v in probe.state_dict().items()}
    probe.load_state_dict(best_state)
    return probe


@torch.no_grad()
def evaluate_sae(
    sae: PaperSAE,
    data: EmbeddingSource | str | Path,
    *,
    modality: str | None = None,
    labels: np.ndarray | None = None,
    protocol: str = "paper",
    batch_size: int = 4096,
    cknna_rows: int = 10000,
    cknna_k: int = 10,
    recovery_rows: int = 10000,
    seed: int = 0,
    figure_dir: str | Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """The evaluation report (keys in REPORT_KEYS, plus curves and, with labels, lp_kl / lp_acc)."""
    source = open_embeddings(data) if isinstance(data, (str, Path, dict)) else data
    check_dimension(source, sae.cfg.d_in)
    modality = modality or sae.cfg.metadata.get("modality") or "image"
    stats = get_stats(sae, modality)
    sae.eval()
    # Any sae-lens SAE can be evaluated; only this package's family has the two protocols.
    has_protocols = hasattr(sae, "set_protocol")
    if has_protocols:
        sae.set_protocol(protocol)
    elif protocol != "paper":
        raise ValueError(f"{sae.cfg.architecture()} SAEs have a single activation; use protocol='paper'")
    device = sae.W_dec.device
    n = source.n_rows
    rng = np.random.default_rng(seed)
    sub_rows = np.sort(rng.choice(n, min(n, cknna_rows), replace=False))
    rec_rows = np.sort(rng.choice(n, min(n, recovery_rows), replace=False))

    sq_err = 0.0
    sum_x = torch.zeros(sae.cfg.d_in, dtype=torch.float64)
    sum_sq = 0.0
    cos_sum = 0.0
    zeros = 0
    active = 0
    fire_counts = torch.zeros(sae.cfg.d_sae, dtype=torch.long)
    hist_sample: list[torch.Tensor] = []
    from tqdm.auto import tqdm

    for start in tqdm(range(0, n, batch_size), desc="eval", disable=not progress, unit="batch"):
        block = source.read(start, min(n, start + batch_size))
        check_finite_block(block, start, source.description)
        x = torch.from_numpy(block).to(device)
        z = sae.encode(stats.apply(x))
        x_hat = stats.invert(sae.decode(z))
        x64, xh64 = x.double(), x_hat.double()
        sq_err += float((x64 - xh64).pow(2).sum())
        sum_x += x64.sum(0).cpu()
        sum_sq += float(x64.pow(2).sum())
        cos_sum += cosine_similarity(x, x_hat) * len(x)
        nz = z != 0
        zeros += int((~nz).sum())
        active += int(nz.sum())
        fire_counts += nz.sum(0).cpu()
        if len(hist_sample) < 64:
            vals = z[nz]
            if vals.numel() > 20000:
                vals = vals[torch.randperm(vals.numel(), generator=torch.Generator().manual_seed(start))[:20000]]
            hist_sample.append(vals.float().cpu())

    total_var = sum_sq - float(sum_x.pow(2).sum()) / n
    if not total_var > 0:
        raise EmbeddingDataError(f"{source.description}: its {n} row(s) do not vary (one row, or all identical), so "
                                 "FVU, which divides by their variance, is undefined; evaluate on more rows")
    fvu_value = sq_err / total_var
    report: dict[str, Any] = {
        "l0_sparsity": zeros / (n * sae.cfg.d_sae),
        "l0_active": active / n,
        "fvu": fvu_value,
        "evr": 1.0 - fvu_value,
        "cos_sim": cos_sum / n,
        "decoder_orthogonality": decoder_orthogonality(sae.W_dec),
        "dead_neurons": int((fire_counts == 0).sum()),
        "n_samples": n,
        "modality": modality,
        "protocol": protocol,
        "architecture": sae.cfg.architecture(),
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        "soft_cap": getattr(sae.cfg, "soft_cap", None),
    }

    x_sub = torch.from_numpy(read_all(source, sub_rows)).to(device)
    z_sub = sae.encode(stats.apply(x_sub))
    if len(x_sub) > cknna_k + 3:
        report["cknna"] = cknna_subset(x_sub, z_sub, k=cknna_k, n=cknna_rows, seed=seed)
    else:  # null in the report, and said why, rather than a NaN nobody asked about
        report["cknna"] = None
        report["cknna_undefined"] = f"CKNNA with k = {cknna_k} needs at least {cknna_k + 4} rows; the set has {len(x_sub)}"
        warnings.warn(f"{source.description}: {report['cknna_undefined']}", stacklevel=2)

    x_rec = torch.from_numpy(read_all(source, rec_rows)).to(device)
    z_rec = sae.encode(stats.apply(x_rec))
    report["progressive_recovery"] = progressive_recovery(
        x_rec, z_rec, lambda zk: stats.invert(sae.decode(zk))
    )

    if labels is not None:
        report.update(_probe_metrics(source, labels, sae, stats, seed))

    if figure_dir is not None:
        from .plots import activation_histogram, progressive_recovery_figure

        figure_dir = Path(figure_dir)
        figure_dir.mkdir(parents=True, exist_ok=True)
        values = torch.cat(hist_sample) if hist_sample else torch.zeros(0)
        report["figures"] = {
            "activation_histogram": str(activation_histogram(values, figure_dir / "activation_histogram.png")),
            "progressive_recovery": str(
                progressive_recovery_figure({report["architecture"]: report["progressive_recovery"]},
                                            figure_dir / "progressive_recovery.png")),
        }
    if has_protocols:
        sae.set_protocol("paper")
    return report


def _probe_metrics(source, labels: np.ndarray, sae: PaperSAE, stats, seed: int) -> dict[str, Any]:
    """Train a probe on original embeddings (70%), select on 10%, report KL and agreement on 20%."""
    n = source.n_rows
    if len(labels) != n:
        raise ValueError(f"labels have {len(labels)} rows but the embeddings have {n}")
    perm = np.random.default_rng(seed + 1).permutation(n)
    n_fit, n_val = int(0.7 * n), int(0.1 * n)
    fit, val, rep = perm[:n_fit], perm[n_fit : n_fit + n_val], perm[n_fit + n_val :]
    if min(len(fit), len(val), len(rep)) == 0:
        raise ValueError(f"too few labelled rows ({n}) to split 70/10/20 for the linear probe")
    device = sae.W_dec.device
    X = {name: torch.from_numpy(read_all(source, np.sort(rows))).to(device) for name, rows in
         (("fit", fit), ("val", val), ("rep", rep))}
    Y = {name: torch.from_numpy(labels[np.sort(rows)]).to(device) for name, rows in
         (("fit", fit), ("val", val), ("rep", rep))}
    with torch.enable_grad():
        probe = train_linear_probe(X["fit"], Y["fit"], X["val"], Y["val"], seed=seed).to(device)
    x = X["rep"]
    x_hat = stats.invert(sae.decode(sae.encode(stats.apply(x))))
    lo, lr = probe(x), probe(x_hat)
    return {
        "lp_kl": probe_kl(lo, lr),
        "lp_acc": probe_agreement(lo, lr),
        "lp_probe_acc": float((lo.argmax(-1) == Y["rep"]).float().mean()),
        "lp_split": {"fit": len(fit), "select": len(val), "report": len(rep)},
    }


def evaluate_protocols(sae: PaperSAE, data: EmbeddingSource | str | Path, protocols: list[str] | str = "paper",
                       **kwargs: Any) -> dict[str, Any]:
    """`evaluate_sae` under one protocol, or several ('both' is paper then native): the first
    protocol's report, with each further protocol's whole report under its name."""
    if protocols == "both":
        protocols = list(PROTOCOLS)
    elif isinstance(protocols, str):
        protocols = [protocols]
    figure_dir = kwargs.pop("figure_dir", None)
    report: dict[str, Any] = {}
    for i, protocol in enumerate(protocols):
        r = evaluate_sae(sae, data, protocol=protocol, figure_dir=figure_dir if i == 0 else None, **kwargs)
        if i == 0:
            report = r
        else:
            report[protocol] = r
    return report


def final_report(cfg: TrainConfig, progress: bool = False):
    """The evaluator of a training run (`msae_ext.train.train(..., evaluator=...)`): each trained
    SAE's report on the run's held-out `eval_data`, in the training modality."""

    def evaluator(sae_dir: Path) -> dict[str, Any]:
        return evaluate_sae(load_sae(sae_dir, device=cfg.device), cfg.eval_data, modality=cfg.modality,
                            progress=progress)

    return evaluator
