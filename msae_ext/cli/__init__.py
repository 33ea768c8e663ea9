"""`msae`: the command line, a thin layer over msae_ext's library functions.

Each command group is a module here that only parses and prints; the work is the library's, so a
notebook calls the same functions. Arguments are checked before anything heavy is imported (a
missing file is reported at once), and `msae --help` imports nothing but argparse.
"""

from __future__ import annotations

import argparse
import sys

from . import bench, browse, demo, embed, evaluate, interpret, publish, train

EPILOG = """examples:
  msae demo                                    # the main job: train, compare, name and browse SAEs offline
  msae embed --model ViT-L-14 --pretrained openai --modality image --dataset cc3m:/data/cc3m --out emb/cc3m_image
  msae train run.yaml --set lr=1e-4 --set wandb.mode=offline --out runs/msae_rw
  msae eval --sae runs/msae_rw --data emb/in1k --modality image --out runs/msae_rw/imagenet.json
  msae report runs/*/eval.json --out report/
  msae run recipes/vitl14_msae_x8.yaml --out runs/vitl14_msae_x8          # train, evaluate, report
  msae concepts --sae runs/msae_rw --clip ViT-L-14 --pretrained openai --out runs/msae_rw/concepts.json
  msae search --index emb/in1k_val --sae runs/msae_rw --concepts concepts.json --query-row 17 --steer germany=20,30
  msae serve --sae runs/msae_rw --data emb/in1k_val --concepts concepts.json   # the concept browser
  msae dashboard --sae runs/msae_rw --data emb/in1k_val --concepts concepts.json --out site/
  msae bench hierarchy --out bench/hierarchy   # recovery and absorption of a known feature hierarchy
  msae bench hierarchy-text --out bench/text  # the same on WordNet text: do coarse concepts enter at small k?
  msae publish --sae runs/msae_rw_x8 --repo you/msae-clip-vitl14-rw --dry-run --out release/
each command's --help lists its options; docs/ has a page per stage."""

#: command-group modules: the main job, then the stages in the order of the data
GROUPS = (demo, embed, train, evaluate, bench, interpret, browse, publish)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="msae", description="Matryoshka sparse autoencoders for CLIP embeddings, on sae-lens.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # the library raises these (and subclasses) for bad input
        print(f"msae {args.command}: error: {e}", file=sys.stderr)
        return 2
