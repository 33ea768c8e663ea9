"""Several evaluation reports -> the paper's Table 1 layout (markdown) and the Figure 2 scatter."""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path
from typing import Any

import numpy as np

#: (column title, report key, format) in the order of the paper's Table 1.
TABLE1_COLUMNS = (
    ("L0 (frac. zeros) ↑", "l0_sparsity", "{:.3f}"),
    ("active latents", "l0_active", "{:.1f}"),
    ("FVU ↓", "fvu", "{:.3f}"),
    ("EVR ↑", "evr", "{:.3f}"),
    ("CS ↑", "cos_sim", "{:.3f}"),
    ("LP KL (×1e6) ↓", "lp_kl", "{:.2f}"),
    ("LP Acc ↑", "lp_acc", "{:.3f}"),
    ("CKNNA ↑", "cknna", "{:.3f}"),
    ("DO ↓", "decoder_orthogonality", "{:.3f}"),
    ("NDN ↓", "dead_neurons", "{}"),
)


def load_report(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / "eval.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: no such report (write one with `msae eval ... --out REPORT.json`)") from e


def _cell(report: dict[str, Any], key: str, fmt: str) -> str:
    value = report.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if key == "lp_kl":
        value = value * 1e6
    if key == "dead_neurons" and report.get("dead_neurons_train") is not None:
        return f"{value} ({report['dead_neurons_train']})"
    return fmt.format(value)


def table1_markdown(reports: dict[str, dict[str, Any]]) -> str:
    """Markdown table, one row per model; NDN shows eval (train) counts when both are known."""
    columns = [c for c in TABLE1_COLUMNS if any(r.get(c[1]) is not None for r in reports.values())]
    head = "| model | " + " | ".join(c[0] for c in columns) + " |"
    rule = "|---|" + "|".join("---:" for _ in columns) + "|"
    rows = [f"| {name} | " + " | ".join(_cell(r, key, fmt) for _, key, fmt in columns) + " |"
            for name, r in reports.items()]
    return "\n".join([head, rule, *rows])


#: the seed part of a run's name ("k-64_seed-1" -> "k-64"): runs differing only there are seeds of one setting
SEED_PART = re.compile(r"(^|_)seed-?\d+(?=_|$)")
PARETO_KEYS = ("l0_sparsity", "fvu", "cos_sim")


def pareto_points(reports: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One point per (architecture, setting): the mean and standard deviation over its seeds of
    sparsity, FVU and cosine, and whether it is on the frontier (no other point is at least as
    sparse with lower FVU)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for name, r in reports.items():
        setting = SEED_PART.sub("", name).strip("_") or name
        groups.setdefault((str(r.get("architecture", "?")), setting), []).append(r)
    points = []
    for (series, setting), rs in groups.items():
        p: dict[str, Any] = {"series": series, "setting": setting, "seeds": len(rs)}
        for key in PARETO_KEYS:
            values = [float(r[key]) for r in rs if isinstance(r.get(key), (int, float))]
            p[key] = float(np.mean(values)) if values else float("nan")
            p[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        points.append(p)
    for p in points:
        p["frontier"] = not any(q is not p and q["l0_sparsity"] >= p["l0_sparsity"] and q["fvu"] < p["fvu"]
                                for q in points)
    return sorted(points, key=lambda p: (p["series"], p["l0_sparsity"]))


def pareto_markdown(points: list[dict[str, Any]]) -> str:
    lines = ["| architecture | setting | seeds | L0 (frac. zeros) ↑ | FVU ↓ | CS ↑ | frontier |", "|---|---|---:|---:|---:|---:|:-:|"]
    for p in points:
        cells = [f"{p[k]:.3f} ± {p[f'{k}_std']:.3f}" for k in PARETO_KEYS]
        lines.append(f"| {p['series']} | {p['setting']} | {p['seeds']} | " + " | ".join(cells)
                     + f" | {'●' if p['frontier'] else ''} |")
    return "\n".join(lines)


def write_report(reports: dict[str, dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """table1.md and sparsity_fidelity.png in out_dir, and the Pareto view over seeds: pareto.md,
    pareto.json (the points the figure draws) and pareto.png under the paper's protocol, and
    pareto_native.* under each architecture's own activation when the reports hold it."""
    from .plots import pareto_figure, sparsity_fidelity_figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = out_dir / "table1.md"
    table.write_text(table1_markdown(reports) + "\n")
    points = [{"name": name, **r} for name, r in reports.items()]
    figure = sparsity_fidelity_figure(points, out_dir / "sparsity_fidelity.png")
    written = [table, figure]
    # the paper's protocol (ReLU only at inference) for every architecture; and each architecture's
    # own activation (TopK's k, JumpReLU's thresholds, ...) where the reports hold it
    native = {name: {"architecture": r.get("architecture"), **r["native"]} if "native" in r else r
              for name, r in reports.items()}
    for suffix, view in (("", reports), ("_native", native)):
        if suffix and all("native" not in r for r in reports.values()):
            continue
        pareto = pareto_points(view)
        (out_dir / f"pareto{suffix}.md").write_text(pareto_markdown(pareto) + "\n")
        (out_dir / f"pareto{suffix}.json").write_text(json.dumps(pareto, indent=1))
        written += [out_dir / f"pareto{suffix}.md", pareto_figure(pareto, out_dir / f"pareto{suffix}.png")]
    return written


def table18_markdown(groups: dict[str, tuple[list[dict[str, Any]], dict[str, Any]]]) -> str:
    """The paper's Table 18: per group of seeds, sparsity (L0, fraction of zeros) and FVU as mean
    (± std over the seeds' reports) and decoder / encoder stability (mean over seed pairs), rows
    sorted by sparsity, sparsest first."""
    def mean_std(reports: list[dict[str, Any]], key: str) -> tuple[float, float] | None:
        values = [r[key] for r in reports if isinstance(r.get(key), (int, float))]
        if not values:
            return None
        return float(sum(values) / len(values)), (float(statistics.stdev(values)) if len(values) > 1 else 0.0)

    def cell(ms: tuple[float, float] | None) -> str:
        return "–" if ms is None else f"{ms[0]:.3f}" + (f" ± {ms[1]:.3f}" if ms[1] else "")

    rows = []
    for name, (reports, stab) in groups.items():
        l0, fvu_ = mean_std(reports, "l0_sparsity"), mean_std(reports, "fvu")
        m, t = stab["mean"], stab["threshold"]
        rows.append((l0[0] if l0 else -1.0, f"| {name} | {len(stab['saes'])} | {cell(l0)} | {cell(fvu_)} | "
                     f"{m['decoder_mean_cos']:.3f}/{m['encoder_mean_cos']:.3f} | "
                     f"{m[f'decoder_frac_above_{t}']:.3f}/{m[f'encoder_frac_above_{t}']:.3f} |"))
    head = ["| model | seeds | Sparsity (L0) ↑ | Reconstruction (FVU) ↓ | Stability (decoder/encoder) ↑ | "
            "matched above 0.7 (decoder/encoder) ↑ |", "|---|---:|---:|---:|---:|---:|"]
    return "\n".join(head + [r for _, r in sorted(rows, key=lambda t: -t[0])])
