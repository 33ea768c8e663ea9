"""`msae train` (one SAE, or several on one data pass), `msae run` (a paper recipe: train,
evaluate, report) and `msae sweep` (a wandb sweep file, locally or for `wandb agent`)."""

from __future__ import annotations

import argparse
import json
import os

from .args import existing


def add_commands(sub) -> None:
    t = sub.add_parser("train", help="train one SAE (or several on one data pass) from a YAML config",
                       description="Train an SAE. A config holds run keys (msae_ext/config.py: TrainConfig) and "
                                   "the architecture's options (k, k_list, weighting, l1_coefficient, soft_cap, ...). "
                                   "A config with `saes:` (a list of per-SAE overrides) trains all of them on one "
                                   "stream of batches, each into --out/<name>/. A run killed and restarted with the "
                                   "same --out resumes from its last checkpoint. With eval_data, each SAE's held-out "
                                   "report goes to eval.json. Under `torchrun --nproc_per_node N -m msae_ext.cli "
                                   "train ...` each process trains on 1/N of every batch (DDP).")
    t.add_argument("config", nargs="?", type=existing, help="YAML config (optional: everything can come from --set)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (YAML value; dots for nested keys, e.g. wandb.mode=offline)")
    t.add_argument("--out", required=True, help="output folder; becomes a loadable SAE folder")
    t.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints in --out")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=run_train)

    rr = sub.add_parser("run", help="train, evaluate and report a paper recipe (recipes/*.yaml)",
                        description="A recipe is a training config (usually a family of SAEs trained on one data "
                                    "pass) plus `evaluate:` entries. Trains into --out, writes eval_NAME.json per SAE "
                                    "and --out/report_NAME/ (Table 1 markdown and the sparsity-fidelity figure). "
                                    "Every input is checked before training; rerunning resumes.")
    rr.add_argument("recipe", type=existing)
    rr.add_argument("--out", required=True)
    rr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a recipe key (e.g. train_data=..., device=cpu, epochs=1)")
    rr.add_argument("--no-train", action="store_true", help="only evaluate and report already trained SAEs")
    rr.add_argument("--no-resume", action="store_true")
    rr.add_argument("--no-progress", action="store_true")
    rr.set_defaults(func=run_recipe)

    sw = sub.add_parser("sweep", help="run a wandb sweep file: --local (grid, no server) or --agent (for wandb agent)",
                        description="Sweep files (recipes/sweeps/) are wandb sweep configurations over config keys "
                                    "whose command names the recipe. `wandb sweep FILE` registers one; its agents call "
                                    "`msae sweep FILE --agent --recipe RECIPE --out DIR --key=value ...`. `--local` runs "
                                    "a grid here with no server, all combinations as one multi-SAE run. WANDB_MODE=offline "
                                    "runs can be synced later with `wandb sync`.")
    sw.add_argument("sweep", type=existing)
    sw.add_argument("--local", action="store_true")
    sw.add_argument("--agent", action="store_true")
    sw.add_argument("--check", action="store_true", help="only validate the sweep file")
    sw.add_argument("--recipe", help="the recipe to vary (default: the --recipe in the sweep's command)")
    sw.add_argument("--out", default="runs/sweep")
    sw.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override recipe keys (--local)")
    sw.add_argument("--no-progress", action="store_true")
    sw.set_defaults(func=run_sweep, accepts_extra=True)  # wandb agents append --key=value arguments


def run_train(args: argparse.Namespace) -> int:
    from ..config import load_config

    cfg = load_config(args.config, args.set)  # a bad config fails here, before the heavy imports
    from ..recipes import train_and_evaluate

    results = train_and_evaluate(cfg, args.out, resume=not args.no_resume, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    for result in results:
        if result.resumed_from is not None:
            print(f"resumed from {result.resumed_from}")
        print(f"trained {result.steps} steps; SAE saved in {result.out_dir}")
        if result.eval_report:
            keys = ("l0_sparsity", "l0_active", "fvu", "cos_sim", "cknna", "dead_neurons", "dead_neurons_train")
            print(json.dumps({k: result.eval_report.get(k) for k in keys}, indent=2))
    return 0


def run_recipe(args: argparse.Namespace) -> int:
    from ..recipes import run_recipe

    summary = run_recipe(args.recipe, args.out, args.set, resume=not args.no_resume, progress=not args.no_progress,
                         train=not args.no_train)
    print(f"trained and evaluated {len(summary['saes'])} SAEs in {args.out}")
    for name, paths in summary["reports"].items():
        print(f"  {name}: " + ", ".join(paths))
    return 0


def run_sweep(args: argparse.Namespace) -> int:
    from ..recipes import load_sweep, run_sweep_agent, run_sweep_local

    if args.extra and not args.agent:
        raise ValueError(f"unrecognized arguments: {' '.join(args.extra)}")
    if args.check:
        load_sweep(args.sweep)
        print(f"{args.sweep}: valid")
        return 0
    if args.local == args.agent:
        raise ValueError("give --local (run the grid here, no wandb server) or --agent (started by `wandb agent`)")
    if args.local:
        summary = run_sweep_local(args.sweep, args.out, args.set, progress=not args.no_progress, recipe=args.recipe)
    else:
        summary = run_sweep_agent(args.sweep, args.extra, args.out, progress=not args.no_progress, recipe=args.recipe)
    print(f"swept {len(summary['saes'])} SAEs into {args.out}; reports: {summary['reports']}")
    return 0
