"""`msae eval` (the paper's metrics for one SAE on one embedding set) and `msae report` (reports ->
the paper's Table 1 and the sparsity-fidelity figure)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .args import existing, existing_data, positive_int, sae_ref, write_json


def add_commands(sub) -> None:
    e = sub.add_parser("eval", help="evaluate a saved SAE with the paper's metrics")
    e.add_argument("--sae", required=True, type=sae_ref,
                   help="SAE folder (the --out folder of msae train), or a release (RELEASE[:SAE_ID])")
    e.add_argument("--data", required=True, type=existing_data,
                   help="embeddings: .npy, .safetensors[#key], DIR with manifest.json, FILE.parquet#column, DATASET_DIR#column")
    e.add_argument("--modality", choices=("image", "text"), default=None,
                   help="which saved statistics to apply (default: the training modality)")
    e.add_argument("--labels", type=existing, help="class labels aligned with rows (.npy ints or one per line): adds lp_kl, lp_acc")
    e.add_argument("--protocol", choices=("paper", "native", "both"), default="paper",
                   help="paper: ReLU only at inference; native: the architecture's own activation; both: each")
    e.add_argument("--figures", help="folder for the activation histogram and progressive-recovery figures")
    e.add_argument("--batch-size", type=positive_int, default=4096)
    e.add_argument("--device", default="cpu")
    e.add_argument("--out", required=True, help="REPORT.json")
    e.set_defaults(func=run_eval)

    r = sub.add_parser("report", help="reports -> Table 1 (markdown) and the sparsity-fidelity figure")
    r.add_argument("reports", nargs="+", type=existing, help="REPORT.json files (or run folders holding eval.json)")
    r.add_argument("--names", nargs="+", help="row names, one per report")
    r.add_argument("--out", help="folder for table1.md and sparsity_fidelity.png")
    r.set_defaults(func=run_report)


def run_eval(args: argparse.Namespace) -> int:
    from ..evaluate import PROTOCOLS, REPORT_KEYS, evaluate_protocols
    from ..loading import load_labels
    from ..publish import open_sae

    labels = load_labels(args.labels) if args.labels else None
    sae = open_sae(args.sae, device=args.device)[0]
    report = evaluate_protocols(sae, args.data, args.protocol, modality=args.modality, labels=labels,
                                batch_size=args.batch_size, figure_dir=args.figures, progress=True)
    out = write_json(args.out, report)
    for protocol in PROTOCOLS:
        r = report if report["protocol"] == protocol else report.get(protocol)
        if r is not None:
            print(f"{protocol} protocol:")
            print(json.dumps({k: r[k] for k in REPORT_KEYS}, indent=2))
    print(f"report written to {out}")
    return 0


def run_report(args: argparse.Namespace) -> int:
    from ..report import load_report, table1_markdown, write_report

    names = args.names or [Path(p).stem if Path(p).suffix == ".json" and Path(p).stem != "eval"
                           else Path(p).parent.name if Path(p).suffix == ".json" else Path(p).name
                           for p in args.reports]
    if len(names) != len(args.reports):
        raise ValueError(f"--names gives {len(names)} names for {len(args.reports)} reports")
    reports = {name: load_report(p) for name, p in zip(names, args.reports)}
    print(table1_markdown(reports))
    if args.out:
        table, figure = write_report(reports, args.out)
        print(f"\nwrote {table} and {figure}")
    return 0
