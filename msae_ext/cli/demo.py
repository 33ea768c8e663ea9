"""`msae demo`: the main job, offline: train and compare the paper's SAEs on synthetic data."""

from __future__ import annotations

import argparse


def add_commands(sub) -> None:
    d = sub.add_parser("demo", help="offline end-to-end demo on synthetic hierarchical data (a few minutes)")
    d.add_argument("--out", default="msae_demo")
    d.add_argument("--quick", action="store_true", help="tiny sizes (seconds), for smoke tests")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    run_demo(args.out, quick=args.quick, progress=not args.no_progress)
    return 0
