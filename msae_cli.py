"""`msae` command line: a thin layer over msae_ext.

It lives outside the package on purpose: `import msae_ext` registers the architectures with
sae-lens, which imports torch, transformers and wandb (seconds). Keeping the parser here and
importing msae_ext inside each command keeps `msae --help` instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EPILOG = """examples:
  msae demo                                    # offline end-to-end run on synthetic data
  msae train run.yaml --set lr=1e-4 --set wandb.mode=offline --out runs/msae_rw
  msae train sweep.yaml --out runs/sweep            # a config with `saes:` trains them all on one data pass
  torchrun --nproc_per_node 4 -m msae_cli train run.yaml --set device=cuda --out runs/msae_rw
  msae eval --sae runs/msae_rw --data imagenet_val.npy --modality image --out runs/msae_rw/imagenet.json
  msae report runs/*/eval.json --out report/
  msae export --sae runs/msae_rw --format standard --modality image --out exported/msae_rw_image
"""


def _cmd_train(args: argparse.Namespace) -> int:
    import os

    from msae_ext.config import load_config
    from msae_ext.train import train, train_many

    cfg = load_config(args.config, args.set)
    run = train_many if cfg.saes else train
    results = run(cfg, args.out, resume=not args.no_resume, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    for result in results if isinstance(results, list) else [results]:
        if result.resumed_from is not None:
            print(f"resumed from {result.resumed_from}")
        print(f"trained {result.steps} steps; SAE saved in {result.out_dir}")
        if result.eval_report:
            keys = ("l0_sparsity", "l0_active", "fvu", "cos_sim", "cknna", "dead_neurons")
            print(json.dumps({k: result.eval_report[k] for k in keys}, indent=2))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from msae_ext.evaluate import REPORT_KEYS, evaluate_sae, load_labels, load_sae

    sae = load_sae(args.sae, device=args.device)
    labels = load_labels(args.labels) if args.labels else None
    protocols = ["paper", "native"] if args.protocol == "both" else [args.protocol]
    report = None
    for protocol in protocols:
        r = evaluate_sae(sae, args.data, modality=args.modality, labels=labels, protocol=protocol,
                         batch_size=args.batch_size, figure_dir=args.figures if protocol == protocols[0] else None,
                         progress=True)
        if report is None:
            report = r
        else:
            report[protocol] = r
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    summary = {k: report[k] for k in REPORT_KEYS}
    print(json.dumps(summary, indent=2))
    print(f"report written to {out}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from msae_ext.report import load_report, table1_markdown, write_report

    names = args.names or [Path(p).stem if Path(p).suffix == ".json" and Path(p).stem != "eval"
                           else Path(p).parent.name if Path(p).suffix == ".json" else Path(p).name
                           for p in args.reports]
    if len(names) != len(args.reports):
        raise SystemExit(f"--names gives {len(names)} names for {len(args.reports)} reports")
    reports = {name: load_report(p) for name, p in zip(names, args.reports)}
    print(table1_markdown(reports))
    if args.out:
        table, figure = write_report(reports, args.out)
        print(f"\nwrote {table} and {figure}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from msae_ext.evaluate import load_sae
    from msae_ext.export import export_standard

    if args.format != "standard":
        raise SystemExit(f"unknown export format {args.format!r}; only 'standard' is supported")
    out = export_standard(load_sae(args.sae), args.modality, args.out)
    print(f"exported a sae-lens 'standard' SAE taking raw {args.modality} embeddings to {out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from msae_ext.demo import run_demo

    run_demo(args.out, quick=args.quick, progress=not args.no_progress)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="msae",
        description="Matryoshka sparse autoencoders for CLIP embeddings, on sae-lens.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one SAE (or several on one data pass) from a YAML config",
                       description="Train an SAE. Keys: see msae_ext/config.py (TrainConfig). A config with "
                                   "`saes:` (a list of per-SAE overrides) trains all of them on one stream of "
                                   "batches, each into --out/<name>/. A run killed and restarted with the same "
                                   "--out resumes from its last checkpoint. Under `torchrun --nproc_per_node N "
                                   "-m msae_cli train ...` each process trains on 1/N of every batch (DDP).")
    t.add_argument("config", nargs="?", help="YAML config (optional: everything can come from --set)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (YAML value; dots for nested keys, e.g. wandb.mode=offline)")
    t.add_argument("--out", required=True, help="output folder; becomes a loadable SAE folder")
    t.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints in --out")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="evaluate a saved SAE with the paper's metrics")
    e.add_argument("--sae", required=True, help="SAE folder (the --out folder of msae train)")
    e.add_argument("--data", required=True, help="embeddings: .npy, .safetensors[#key], DIR with manifest.json, "
                                                  "FILE.parquet#column, DATASET_DIR#column")
    e.add_argument("--modality", choices=("image", "text"), default=None,
                   help="which saved statistics to apply (default: the training modality)")
    e.add_argument("--labels", help="class labels aligned with rows (.npy ints or one per line): adds lp_kl, lp_acc")
    e.add_argument("--protocol", choices=("paper", "native", "both"), default="paper",
                   help="paper: ReLU only at inference; native: the architecture's own activation")
    e.add_argument("--figures", help="folder for the activation histogram and progressive-recovery figures")
    e.add_argument("--batch-size", type=int, default=4096)
    e.add_argument("--device", default="cpu")
    e.add_argument("--out", required=True, help="REPORT.json")
    e.set_defaults(func=_cmd_eval)

    r = sub.add_parser("report", help="reports -> Table 1 (markdown) and the sparsity-fidelity figure")
    r.add_argument("reports", nargs="+", help="REPORT.json files (or run folders holding eval.json)")
    r.add_argument("--names", nargs="+", help="row names, one per report")
    r.add_argument("--out", help="folder for table1.md and sparsity_fidelity.png")
    r.set_defaults(func=_cmd_report)

    x = sub.add_parser("export", help="export an MSAE as a plain sae-lens 'standard' SAE")
    x.add_argument("--sae", required=True)
    x.add_argument("--format", default="standard", help="only 'standard'")
    x.add_argument("--modality", choices=("image", "text"), required=True,
                   help="whose preprocessing is folded into the weights")
    x.add_argument("--out", required=True)
    x.set_defaults(func=_cmd_export)

    d = sub.add_parser("demo", help="offline end-to-end demo on synthetic hierarchical data")
    d.add_argument("--out", default="msae_demo")
    d.add_argument("--quick", action="store_true", help="tiny sizes (seconds), for smoke tests")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # EmbeddingDataError is a ValueError
        print(f"msae {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
