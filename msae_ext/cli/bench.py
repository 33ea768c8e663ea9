"""`msae bench hierarchy`: the Matryoshka family on data with a known hierarchy of features."""

from __future__ import annotations

import argparse

from .args import positive_int, split_list


def add_commands(sub) -> None:
    b = sub.add_parser("bench", help="hierarchy benchmarks: a known forest of features, and real text")
    bs = b.add_subparsers(dest="bench", required=True)
    h = bs.add_parser(
        "hierarchy", help="recovery, absorption and nesting of true hierarchical features at matched L0",
        description="Sample data from sae-lens's synthetic module with a known forest of features (roots, children, "
                    "grandchildren; mutually exclusive siblings; Zipf-like firing), train every architecture in "
                    "one data pass at each target L0 and seed, and score each against the true forest at matched "
                    "L0 (each row keeps its L0 largest activations): MCC, true features recovered at cosine > 0.9 "
                    "(overall and per depth), absorption (a child fires while its parent's latent stays off), the "
                    "parent latent's miss rate when the parent fires alone, and the nesting level at which each "
                    "depth's latents enter; beside them, the same scores of the true features cut to each L0 (what "
                    "the cut costs the true dictionary itself). Writes hierarchy.json, hierarchy.md and hierarchy.png.")
    h.add_argument("--out", required=True)
    h.add_argument("--l0", default="4,8,16", help="target L0s, comma-separated (default 4,8,16; the data's mean is about 4)")
    h.add_argument("--seeds", default="0,1,2", help="seeds, comma-separated (default 0,1,2)")
    h.add_argument("--families", help="architectures, comma-separated (default all: TopK, BatchTopK, MSAE (RW), "
                                      "MSAE (UW), Matryoshka BatchTopK, HierarchicalTopK, Matryoshka TopK, ReLU, "
                                      "JumpReLU)")
    h.add_argument("--features", type=positive_int, help="number of true features (default 256)")
    h.add_argument("--hidden-dim", type=positive_int, help="dimension of the data (default 64)")
    h.add_argument("--roots", type=positive_int, help="number of trees (default 16)")
    h.add_argument("--branching", type=positive_int, help="children per parent (default 3)")
    h.add_argument("--depth", type=positive_int, help="levels below the roots (default 2)")
    h.add_argument("--train-rows", type=positive_int, help="training rows (default 100,000)")
    h.add_argument("--epochs", type=positive_int, help="passes over the training rows (default 15)")
    h.add_argument("--quick", action="store_true", help="small sizes (under a minute), for smoke tests")
    h.add_argument("--no-progress", action="store_true")
    h.set_defaults(func=run_hierarchy)
    t = bs.add_parser(
        "hierarchy-text", help="the same architectures on real text embeddings: fidelity and whether coarse "
                               "concepts enter at small k",
        description="Train the architectures of `msae bench hierarchy` on the demo's real embeddings (WordNet noun "
                    "definitions embedded by wordllama, the stand-in for CLIP's text tower; cached in OUT/data), "
                    "and score each at matched L0 on the held-out verb definitions: FVU, dead latents, validated "
                    "concept names, and, over the latents a WordNet noun names, Spearman's rho between the "
                    "Matryoshka level k at which a latent enters its rows' top-k and the noun's depth in "
                    "WordNet (positive: coarse concepts enter at small k). Writes hierarchy_text.json and .md; "
                    "`msae serve --sae OUT/runs/RUN --data OUT/data/wordnet_noun --clip wordllama --protocol native` "
                    "browses a run with its latents' nesting levels.")
    t.add_argument("--out", required=True)
    t.add_argument("--l0", default="16,32", help="target L0s, comma-separated (default 16,32)")
    t.add_argument("--seeds", default="0", help="seeds, comma-separated (default 0)")
    t.add_argument("--families", help="architectures, comma-separated (default all, as bench hierarchy)")
    t.add_argument("--epochs", type=positive_int, default=4, help="passes over the 82,115 nouns (default 4)")
    t.add_argument("--expansion-factor", type=positive_int, default=4, help="latents per input dimension (default 4)")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=run_hierarchy_text)


def _targets(args: argparse.Namespace) -> tuple[list[int], list[int]]:
    try:
        return [int(v) for v in split_list(args.l0)], [int(v) for v in split_list(args.seeds)]
    except ValueError:
        raise ValueError(f"--l0 and --seeds take comma-separated integers, got {args.l0!r} and {args.seeds!r}") from None


def run_hierarchy(args: argparse.Namespace) -> int:
    l0, seeds = _targets(args)
    from dataclasses import replace

    from ..hierarchy import BENCH_QUICK, BenchSize, run_hierarchy_bench

    size = BENCH_QUICK if args.quick else BenchSize()
    sizes = {"num_features": args.features, "hidden_dim": args.hidden_dim, "roots": args.roots,
             "branching": args.branching, "depth": args.depth, "train_rows": args.train_rows, "epochs": args.epochs}
    size = replace(size, **{k: v for k, v in sizes.items() if v is not None})
    result = run_hierarchy_bench(args.out, l0_targets=l0, seeds=seeds, size=size,
                                 families=split_list(args.families) or None, progress=not args.no_progress)
    from ..hierarchy import hierarchy_markdown

    print(hierarchy_markdown(result["summary"]))
    print(f"wrote {args.out}/hierarchy.json, hierarchy.md and hierarchy.png")
    return 0


def run_hierarchy_text(args: argparse.Namespace) -> int:
    l0, seeds = _targets(args)
    from ..hierarchy_text import run_text_hierarchy, text_markdown

    doc = run_text_hierarchy(args.out, l0_targets=l0, seeds=seeds, families=split_list(args.families) or None,
                             expansion_factor=args.expansion_factor, epochs=args.epochs,
                             progress=not args.no_progress)
    print(text_markdown(doc["runs"]))
    print(f"wrote {args.out}/hierarchy_text.json and hierarchy_text.md")
    return 0
