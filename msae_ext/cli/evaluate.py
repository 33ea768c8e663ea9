"""`msae eval` (the paper's metrics for one SAE on one embedding set), `msae stability` (matched
directions of SAEs trained with different seeds, appendix H) and `msae report` (reports -> the
paper's Table 1 and the sparsity-fidelity figure; with stability reports, its Table 18)."""

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

    st = sub.add_parser(
        "stability", help="seed stability: Hungarian-matched decoder and encoder directions (appendix H)",
        description="For every pair of SAEs (one config, different seeds), match the unit-normalised decoder "
                    "directions one-to-one to maximise the total cosine (Hungarian assignment; Paulo & Belrose "
                    "2025), and the encoder directions likewise. Reports per pair the mean matched cosine and the "
                    "fraction matched above --threshold, and their mean and std over pairs. Exact (dense) up to "
                    "--exact-max latents; wider SAEs are matched on each latent's --candidates most similar "
                    "partners. Train the seeds in one data pass with `saes: [{name: s0, seed: 0}, ...]`.")
    st.add_argument("saes", nargs="+", type=sae_ref, help="SAE folders (at least two)")
    st.add_argument("--threshold", type=float, default=0.7, help="matched-cosine threshold (default 0.7)")
    st.add_argument("--exact-max", type=positive_int, default=8192, help="widest SAE matched on the dense matrix")
    st.add_argument("--candidates", type=positive_int, default=64, help="partners kept per latent above --exact-max")
    st.add_argument("--out", required=True, help="STABILITY.json")
    st.set_defaults(func=run_stability)

    r = sub.add_parser("report", help="reports -> Table 1 (markdown), the sparsity-fidelity figure and the "
                                      "Pareto view over seeds; with --stability, Table 18",
                       description="Reports whose names differ only by a seed part (k-64_seed-0, k-64_seed-1: "
                                   "what `msae sweep --local` names grid runs) are one setting: pareto.md, "
                                   "pareto.json and pareto.png give its mean and standard deviation over the "
                                   "seeds, one curve per architecture, the frontier marked.")
    r.add_argument("reports", nargs="*", type=existing, help="REPORT.json files (or run folders holding eval.json)")
    r.add_argument("--stability", nargs="+", type=existing, default=[],
                   help="STABILITY.json files from `msae stability`: one Table 18 row each, its seeds' eval.json "
                        "giving sparsity and FVU")
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


def run_stability(args: argparse.Namespace) -> int:
    from ..publish import open_sae
    from ..stability import stability

    if len(args.saes) < 2:
        raise ValueError("give at least two SAEs (one config trained with different seeds)")
    saes = {str(s): open_sae(s)[0] for s in args.saes}
    result = stability(saes, threshold=args.threshold, exact_max=args.exact_max, candidates=args.candidates,
                       progress=True)
    out = write_json(args.out, result)
    t = args.threshold
    for p in result["pairs"]:
        print(f"{p['a']} ~ {p['b']}: decoder {p['decoder_mean_cos']:.3f} ({p[f'decoder_frac_above_{t}']:.1%} > {t}), "
              f"encoder {p['encoder_mean_cos']:.3f} ({p[f'encoder_frac_above_{t}']:.1%} > {t}) [{p['decoder_method']}]")
    m, sd = result["mean"], result["std"]
    print(f"mean over {len(result['pairs'])} pairs: decoder {m['decoder_mean_cos']:.3f} ± {sd['decoder_mean_cos']:.3f}, "
          f"encoder {m['encoder_mean_cos']:.3f} ± {sd['encoder_mean_cos']:.3f}")
    print(f"written to {out}")
    return 0


def run_report(args: argparse.Namespace) -> int:
    from ..report import load_report, table1_markdown, table18_markdown, write_report

    if not args.reports and not args.stability:
        raise ValueError("give REPORT.json files, --stability STABILITY.json files, or both")
    if args.stability:
        from ..stability import load_stability

        groups = {}
        for path in args.stability:
            doc = load_stability(path)
            groups[Path(path).stem] = ([load_report(s) for s in doc["saes"] if Path(s).is_dir()], doc)
        print(table18_markdown(groups))
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "table18.md").write_text(table18_markdown(groups) + "\n")
        if not args.reports:
            return 0
        print()

    def default_name(path: Path) -> str:  # a run's eval_*.json is named by its run (and sweep) folders
        if path.suffix != ".json":
            return path.name
        if path.stem == "eval" or path.stem.startswith("eval_"):
            return f"{path.parent.parent.name}/{path.parent.name}"
        return path.stem

    names = args.names or [default_name(Path(p)) for p in args.reports]
    if len(names) != len(args.reports):
        raise ValueError(f"--names gives {len(names)} names for {len(args.reports)} reports")
    if len(set(names)) != len(names):
        raise ValueError("two reports would have the same row name; give --names")
    reports = {name: load_report(p) for name, p in zip(names, args.reports)}
    print(table1_markdown(reports))
    if args.out:
        written = write_report(reports, args.out)
        print("\nwrote " + ", ".join(str(p) for p in written))
    return 0
