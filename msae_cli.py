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
  msae embed --model ViT-L-14 --pretrained openai --modality image --dataset cc3m:/data/cc3m --out emb/cc3m_image
  msae embed --model ViT-L-14 --pretrained openai --modality text --dataset cc3m:/data/cc3m_val --out emb/cc3m_val_text
  torchrun --nproc_per_node 8 -m msae_cli embed --model ViT-L-14 --pretrained openai --dataset imagenet:/data/imagenet --out emb/in1k
  msae stats --sae runs/msae_rw --modality text --data emb/cc3m_text   # text statistics for an image-trained SAE
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


def _cmd_embed(args: argparse.Namespace) -> int:
    import torch

    from msae_ext.embed import embed_dataset, load_clip, open_items

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and "LOCAL_RANK" in __import__("os").environ:
        device = f"cuda:{__import__('os').environ['LOCAL_RANK']}"
    items = open_items(args.dataset, captions=args.captions)
    clip = load_clip(args.model, args.pretrained, device=device)
    out = embed_dataset(items, clip, args.out, modality=args.modality, batch_size=args.batch_size,
                        shard_items=args.shard_items, dtype=args.dtype, precision=args.precision,
                        num_workers=args.num_workers, resume=not args.no_resume, progress=not args.no_progress)
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        from msae_ext.embed import load_embeddings

        for sub in ([Path(out)] if args.modality != "both" else [Path(out) / "image", Path(out) / "text"]):
            m = load_embeddings(sub.parent if sub.name == "manifest.json" else sub).manifest
            print(f"{m['modality']}: {m['n_rows']} rows x {m['d_in']} ({m['dtype']}) of {m['n_items']} items, "
                  f"{len(m['failed'])} unreadable; manifest {sub if sub.name == 'manifest.json' else sub / 'manifest.json'}")
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from msae_ext.normalization import attach_stats_to_folder, compute_stats
    from msae_ext.store import open_embeddings

    stats = compute_stats(open_embeddings(args.data))
    path = attach_stats_to_folder(args.sae, args.modality, stats)
    print(f"{args.modality} statistics of {stats.source} ({stats.n_rows} rows, scale {stats.scale:.6g}) "
          f"attached to {path}")
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

    m = sub.add_parser(
        "embed", help="CLIP embeddings of a dataset into a sharded, resumable cache",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Embed a dataset with an open_clip model (encode_image / encode_text outputs: pooled, projected, "
                    "not normalised) into OUT: shards + manifest.json with ids, labels, captions and checksums. "
                    "A killed run rerun with the same --out resumes. Unreadable images are skipped and listed in "
                    "the manifest. Under torchrun each process embeds its share of the shards.",
        epilog="dataset specs:\n"
               "  imagenet:ROOT          ImageNet-1k class folders (ROOT/train/n01440764/*.JPEG), labels\n"
               "  cc3m:ROOT              img2dataset output: ROOT/*.tar (KEY.jpg + KEY.txt) or ROOT/00000/KEY.jpg + KEY.txt\n"
               "  celeba:ROOT[@SPLIT]    ROOT/img_align_celeba + list_attr_celeba.txt; 40 attribute labels\n"
               "  wds:PATTERN            webdataset tars (dir, glob or shards/{00000..00331}.tar)\n"
               "  folder:DIR             images (class subfolders -> labels; KEY.txt sidecars or --captions)\n"
               "  text:FILE              one caption per line\n"
               "  hf:NAME_OR_PATH[@SPLIT] Hugging Face dataset (Hub name, save_to_disk folder, parquet/arrow)\n"
               "a plain path is detected (.txt, .tar, folder, saved dataset, parquet).")
    m.add_argument("--model", required=True, help="open_clip model name (ViT-L-14, ViT-B-16, ...) or a model-config .json")
    m.add_argument("--pretrained", required=True,
                   help="pretrained tag (openai, laion2b_s32b_b82k, ...), a local checkpoint file, or 'none' (random)")
    m.add_argument("--modality", choices=("image", "text", "both"), default="image",
                   help="both: OUT/image and OUT/text with the same rows (image-caption datasets)")
    m.add_argument("--dataset", required=True, help="dataset spec (below)")
    m.add_argument("--captions", help="captions for folder:DIR (TSV path<TAB>caption, or JSON {path: caption})")
    m.add_argument("--out", required=True)
    m.add_argument("--batch-size", type=int, default=256)
    m.add_argument("--shard-items", type=int, default=65536, help="items per shard (the unit of resume)")
    m.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="dtype of the stored rows")
    m.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default=None,
                   help="autocast of the CLIP forward (default: fp16 on GPU as the paper's extraction, fp32 on CPU)")
    m.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    m.add_argument("--num-workers", type=int, default=4, help="image decoding processes")
    m.add_argument("--no-resume", action="store_true", help="refuse to continue an existing OUT")
    m.add_argument("--no-progress", action="store_true")
    m.set_defaults(func=_cmd_embed)

    st = sub.add_parser("stats", help="compute a modality's normalisation statistics from a cache and attach them "
                                      "to a saved SAE (e.g. text statistics for an image-trained SAE)")
    st.add_argument("--sae", required=True, help="SAE folder")
    st.add_argument("--modality", choices=("image", "text"), required=True)
    st.add_argument("--data", required=True, help="that modality's training embeddings (cache DIR, .npy, ...)")
    st.set_defaults(func=_cmd_stats)

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
    except (ValueError, FileNotFoundError) as e:  # the package raises ValueError subclasses for bad input
        print(f"msae {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
