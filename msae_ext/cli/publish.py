"""`msae publish` (SAE folders -> a Hugging Face Hub release in sae-lens format), `msae export` (an
MSAE as sae-lens's own `standard` SAE) and `msae convert` (the authors' released checkpoints)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .args import existing, sae_folder, split_list


def add_commands(sub) -> None:
    pu = sub.add_parser(
        "publish", help="publish trained SAEs to the Hugging Face Hub in sae-lens format, with a model card",
        description="Per SAE, writes SAE_ID/cfg.json (normalisation statistics in its metadata), "
                    "sae_weights.safetensors and sparsity.safetensors, plus README.md (model card: evaluation "
                    "table, recipe, CLIP model, data provenance), and uploads with huggingface_hub. SAE ids default "
                    "to MODALITY_xEXPANSION, the ids of the release registry (hf_hub/pretrained_saes.yaml).")
    pu.add_argument("--sae", nargs="+", required=True, type=sae_folder, help="SAE folders (the --out folders of msae train)")
    pu.add_argument("--repo", required=True, help="OWNER/NAME on the Hub")
    pu.add_argument("--sae-id", help="comma-separated ids, one per --sae (default MODALITY_xEXPANSION)")
    pu.add_argument("--modality", choices=("image", "text"), help="default modality of the published SAEs "
                                                                   "(default: each SAE's training modality)")
    pu.add_argument("--format", choices=("msae", "standard"), default="msae",
                    help="msae: the registered architecture (needs msae_ext to load); standard: sae-lens's own "
                         "architecture with the modality's preprocessing folded in (loads with sae-lens alone)")
    pu.add_argument("--title", help="model card title (default: the repo)")
    pu.add_argument("--private", action="store_true")
    pu.add_argument("--dry-run", action="store_true", help="write the tree into --out instead of uploading")
    pu.add_argument("--out", help="LOCAL_DIR for --dry-run (or to keep a copy of what is uploaded)")
    pu.set_defaults(func=run_publish)

    x = sub.add_parser("export", help="export an MSAE as a plain sae-lens 'standard' SAE")
    x.add_argument("--sae", required=True, type=sae_folder)
    x.add_argument("--format", default="standard", choices=("standard",), help="only 'standard'")
    x.add_argument("--modality", choices=("image", "text"), required=True,
                   help="whose preprocessing is folded into the weights")
    x.add_argument("--out", required=True)
    x.set_defaults(func=run_export)

    cv = sub.add_parser("convert", help="convert the authors' released .pth checkpoints into an SAE folder")
    cv.add_argument("--from", dest="source", default="authors", choices=("authors",),
                    help="checkpoint family: authors (WolodjaZ/MSAE)")
    cv.add_argument("file", type=existing, help="the .pth file (its name encodes the configuration)")
    cv.add_argument("--architecture", choices=("msae", "topk", "batchtopk", "relu"), help="override what the file name says")
    cv.add_argument("--modality", choices=("image", "text"), help="which modality the stored statistics are "
                                                                   "(default: from the file name, else image)")
    cv.add_argument("--preprocessed-inputs", action="store_true",
                    help="accept a file without mean_center / scaling_factor: the SAE then takes inputs you "
                         "preprocess yourself (no statistics are attached)")
    cv.add_argument("--out", required=True)
    cv.set_defaults(func=run_convert)


def run_publish(args: argparse.Namespace) -> int:
    from ..publish import publish

    result = publish(args.sae, args.repo, out=args.out, dry_run=args.dry_run, sae_ids=split_list(args.sae_id) or None,
                     modality=args.modality, fmt=args.format, private=args.private, title=args.title)
    if args.dry_run:
        print(f"wrote the repository tree for {args.repo} into {result} (nothing uploaded):")
        for f in sorted(str(p.relative_to(result)) for p in Path(result).rglob("*") if p.is_file()):
            print(f"  {f}")
    else:
        print(f"uploaded to https://huggingface.co/{args.repo}: {result}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from ..export import export_standard
    from ..loading import load_sae

    out = export_standard(load_sae(args.sae), args.modality, args.out)
    print(f"exported a sae-lens 'standard' SAE taking raw {args.modality} embeddings to {out}")
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from ..publish import load_authors_sae

    sae = load_authors_sae(args.file, architecture=args.architecture, modality=args.modality,
                           preprocessed=args.preprocessed_inputs)
    sae.save_model(Path(args.out))
    stats = ", ".join(sorted((sae.cfg.metadata.get("msae_normalization") or {}).keys())) or "no"
    print(f"{args.file}: {sae.cfg.architecture()} d_in={sae.cfg.d_in} d_sae={sae.cfg.d_sae} ({stats} statistics) "
          f"saved to {args.out}")
    return 0
