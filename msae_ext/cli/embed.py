"""`msae embed` (CLIP embeddings of a dataset into a cache) and `msae stats` (a modality's
statistics attached to a trained SAE)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .args import existing_data, positive_int, sae_folder

DATASETS = """dataset specs:
  imagenet:ROOT          ImageNet-1k class folders (ROOT/train/n01440764/*.JPEG), labels
  cc3m:ROOT              img2dataset output: ROOT/*.tar (KEY.jpg + KEY.txt) or ROOT/00000/KEY.jpg + KEY.txt
  celeba:ROOT[@SPLIT]    ROOT/img_align_celeba + list_attr_celeba.txt; 40 attribute labels
  wds:PATTERN            webdataset tars (dir, glob or shards/{00000..00331}.tar)
  folder:DIR             images (class subfolders -> labels; KEY.txt sidecars or --captions)
  text:FILE              one caption per line
  wordnet[:POS]          WordNet 3.0 glosses, one per synset (POS noun|verb|adj|adv|all), 45 labels
  hf:NAME_OR_PATH[@SPLIT] Hugging Face dataset (Hub name, save_to_disk folder, parquet/arrow)
a plain path is detected (.txt, .tar, folder, saved dataset, parquet)."""


def add_commands(sub) -> None:
    m = sub.add_parser(
        "embed", help="CLIP embeddings of a dataset into a sharded, resumable cache",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=DATASETS,
        description="Embed a dataset with an open_clip model (encode_image / encode_text outputs: pooled, projected, "
                    "not normalised) into OUT: shards + manifest.json with ids, labels, captions and checksums. "
                    "A killed run rerun with the same --out resumes. Unreadable images are skipped and listed in "
                    "the manifest. Under torchrun each process embeds its share of the shards.")
    m.add_argument("--model", required=True, help="open_clip model name (ViT-L-14, ViT-B-16, ...) or a model-config "
                                                  ".json; or wordllama (--pretrained l2_supercat): a text encoder whose "
                                                  "weights install with pip, standing in for CLIP's text tower")
    m.add_argument("--pretrained", required=True,
                   help="pretrained tag (openai, laion2b_s32b_b82k, ...), a local checkpoint file, or 'none' (random)")
    m.add_argument("--modality", choices=("image", "text", "both"), default="image",
                   help="both: OUT/image and OUT/text with the same rows (image-caption datasets)")
    m.add_argument("--dataset", required=True, help="dataset spec (below)")
    m.add_argument("--captions", help="captions for folder:DIR (TSV path<TAB>caption, or JSON {path: caption})")
    m.add_argument("--out", required=True)
    m.add_argument("--batch-size", type=positive_int, default=256)
    m.add_argument("--shard-items", type=positive_int, default=65536, help="items per shard (the unit of resume)")
    m.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="dtype of the stored rows")
    m.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default=None,
                   help="autocast of the CLIP forward (default: fp16 on GPU as the paper's extraction, fp32 on CPU)")
    m.add_argument("--seed", type=int, default=0, help="draws the weights of --pretrained none (recorded in the "
                                                        "manifest; a resumed run must use the same)")
    m.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    m.add_argument("--num-workers", type=int, default=4, help="image decoding processes")
    m.add_argument("--no-resume", action="store_true", help="refuse to continue an existing OUT")
    m.add_argument("--no-progress", action="store_true")
    m.set_defaults(func=run_embed)

    st = sub.add_parser("stats", help="compute a modality's normalisation statistics from a cache and attach them "
                                      "to a saved SAE (e.g. text statistics for an image-trained SAE)")
    st.add_argument("--sae", required=True, type=sae_folder, help="SAE folder")
    st.add_argument("--modality", choices=("image", "text"), required=True)
    st.add_argument("--data", required=True, type=existing_data,
                    help="that modality's training embeddings (cache DIR, .npy, ...)")
    st.set_defaults(func=run_stats)


def run_embed(args: argparse.Namespace) -> int:
    from ..embed import embed_dataset, load_clip, load_embeddings, open_items
    from ..embed.extract import default_device

    items = open_items(args.dataset, captions=args.captions)
    clip = load_clip(args.model, args.pretrained, device=default_device(args.device), seed=args.seed)
    out = embed_dataset(items, clip, args.out, modality=args.modality, batch_size=args.batch_size,
                        shard_items=args.shard_items, dtype=args.dtype, precision=args.precision,
                        num_workers=args.num_workers, resume=not args.no_resume, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    for sub in ([Path(out).parent] if args.modality != "both" else [Path(out) / "image", Path(out) / "text"]):
        m = load_embeddings(sub).manifest
        print(f"{m['modality']}: {m['n_rows']} rows x {m['d_in']} ({m['dtype']}) of {m['n_items']} items, "
              f"{len(m['failed'])} unreadable; manifest {sub / 'manifest.json'}")
    return 0


def run_stats(args: argparse.Namespace) -> int:
    from ..normalization import attach_stats_to_folder, compute_stats
    from ..store import open_embeddings

    stats = compute_stats(open_embeddings(args.data))
    path = attach_stats_to_folder(args.sae, args.modality, stats)
    print(f"{args.modality} statistics of {stats.source} ({stats.n_rows} rows, scale {stats.scale:.6g}) attached to {path}")
    return 0
