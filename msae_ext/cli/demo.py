"""`msae demo`: the main job, offline: train and compare the paper's SAEs on real text embeddings
made here, name their latents and open them in the concept browser (or, --synthetic, on data with
known features)."""

from __future__ import annotations

import argparse


def add_commands(sub) -> None:
    d = sub.add_parser(
        "demo", help="the main job, offline: train, evaluate, name and browse SAEs on real text embeddings",
        description="Embed WordNet's definitions with wordllama (a text encoder whose weights install with pip; it "
                    "stands in for CLIP's text tower, which cannot be downloaded here), train MSAE (RW, UW), TopK "
                    "and ReLU in one data pass, print Table 1 on held-out definitions, name the latents with the "
                    "shipped vocabulary, print a few with their top texts, and write the concept browser's static "
                    "site. --synthetic: sae-lens's synthetic hierarchical data instead, with ground-truth recovery.")
    d.add_argument("--out", default="msae_demo")
    d.add_argument("--quick", action="store_true", help="small sizes (under a minute), for smoke tests")
    d.add_argument("--synthetic", action="store_true", help="synthetic data with known features instead of real text")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    run_demo(args.out, quick=args.quick, synthetic=args.synthetic, progress=not args.no_progress)
    return 0
