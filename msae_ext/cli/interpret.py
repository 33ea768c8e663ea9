"""Section 5 of the paper: `msae concepts` (name and validate neurons), `msae examples`
(top-activating examples), `msae search` (CLIP, SAE-space and concept-steered search) and
`msae bias` (concept associations of a downstream probe)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .args import existing, existing_data, positive_int, sae_data_args, sae_ref, split_list, write_json


def add_commands(sub) -> None:
    c = sub.add_parser(
        "concepts", help="name neurons with a vocabulary and validate the names (section 5.1, Table 3)",
        description="Embed a vocabulary with the CLIP text tower (or read precomputed embeddings), apply the SAE's "
                    "text preprocessing, and take cosine similarity with the unit-norm decoder directions (b_pre "
                    "kept, as the paper). Validations per neuron: similarity above --threshold, best vector (one "
                    "concept per neuron), best/second-best ratio above --ratio. Writes per-neuron concepts and the "
                    "Table 3 counts. For a release that publishes a concept matrix (the authors' msae-clip-vitl14-rw), "
                    "--sae RELEASE alone applies the same validations to that matrix, with no CLIP model.")
    c.add_argument("--sae", required=True, type=sae_ref,
                   help="SAE folder (needs text statistics: `msae stats --modality text`), or a release "
                        "(RELEASE[:SAE_ID]): without --clip / --vocab-embeddings, a release that publishes a concept "
                        "matrix is named from it, with no CLIP model")
    c.add_argument("--clip", help="open_clip model name or config .json to embed the vocabulary with")
    c.add_argument("--pretrained", help="its pretrained tag or checkpoint file (with --clip)")
    c.add_argument("--vocab-embeddings", type=existing, help="precomputed vocabulary embeddings: .npy aligned with "
                                                             "--vocab, or an `msae embed --modality text --dataset text:WORDS.txt` cache")
    c.add_argument("--vocab", type=existing, help="words, one per line (default: the shipped wordfreq English 10k list)")
    c.add_argument("--template", default="{}", help="prompt around each word, e.g. 'a photo of {}' (default: the word)")
    c.add_argument("--save-vocab-embeddings", help="with --clip: also save the vocabulary embeddings (.npy) for reuse")
    c.add_argument("--threshold", type=float, default=0.42, help="cosine similarity validation (default 0.42)")
    c.add_argument("--ratio", type=float, default=2.0, help="best/second-best validation (default 2)")
    c.add_argument("--top", type=positive_int, default=5, help="concepts listed per neuron")
    c.add_argument("--remove-b-pre", action="store_true", help="subtract b_pre from the vocabulary (Rao et al.)")
    c.add_argument("--stats-modality", choices=("text", "image"), default="text",
                   help="statistics applied to the vocabulary (default text, as the paper)")
    c.add_argument("--batch-size", type=positive_int, default=256)
    c.add_argument("--device", default="cpu")
    c.add_argument("--figures", help="folder for the per-word similarity histogram (figure 9)")
    c.add_argument("--out", required=True, help="concepts.json")
    c.set_defaults(func=run_concepts)

    ex = sub.add_parser("examples", help="top-activating examples and interval samples per neuron (+ image grids)")
    sae_data_args(ex, "embedding set: an `msae embed` cache (ids, captions, images known) or .npy/.safetensors/...")
    ex.add_argument("--captions", type=existing, help="captions file, one line per row (for plain matrices)")
    ex.add_argument("--neurons", help="comma-separated neuron indices or concept words (default: every neuron)")
    ex.add_argument("--valid-only", action="store_true", help="only neurons passing every validation of --concepts")
    ex.add_argument("--n-top", type=positive_int, default=10)
    ex.add_argument("--intervals", type=int, default=5, help="activation intervals sampled (0 = none)")
    ex.add_argument("--per-interval", type=int, default=3)
    ex.add_argument("--batch-size", type=positive_int, default=4096)
    ex.add_argument("--figures", help="folder for per-neuron image grids (when images can be read back)")
    ex.add_argument("--max-figures", type=int, default=64)
    ex.add_argument("--out", required=True, help="examples.json")
    ex.set_defaults(func=run_examples)

    se = sub.add_parser(
        "search", help="nearest neighbours in CLIP space explained by concepts; SAE-space and concept-steered search",
        description="Exact nearest neighbours over a memory-mapped embedding set, streamed in blocks. CLIP space: "
                    "cosine distance; with --sae each hit lists the concepts it shares with the query. --sae-space: "
                    "Manhattan distance between SAE activations. --steer CONCEPT=VALUE sets (=+VALUE raises) a "
                    "concept's magnitude in SAE space, decodes to CLIP space and searches again; several --steer "
                    "flags act together, and CONCEPT=20,30 gives one search per value.")
    se.add_argument("--index", required=True, type=existing_data, help="embedding set to search (an `msae embed` cache, .npy, ...)")
    se.add_argument("--captions", type=existing, help="captions file, one line per row (for plain matrices)")
    sae_data_args(se, None)
    se.add_argument("--query-row", type=int, help="query: this row of the index")
    se.add_argument("--query-id", help="query: the row with this id")
    se.add_argument("--query-embedding", help="query: FILE.npy[:ROW], a raw CLIP embedding")
    se.add_argument("--query-image", type=existing, help="query: an image file (needs --clip/--pretrained)")
    se.add_argument("--query-text", help="query: a text (needs --clip/--pretrained)")
    se.add_argument("--clip", help="open_clip model for --query-image/--query-text")
    se.add_argument("--pretrained")
    se.add_argument("--k", type=positive_int, default=8, help="neighbours per search")
    se.add_argument("--sae-space", action="store_true", help="also search by Manhattan distance of SAE activations")
    se.add_argument("--steer", action="append", default=[], metavar="CONCEPT=VALUE",
                    help="concept-steered search: word (with --concepts) or #neuron; =V sets, =+V raises")
    se.add_argument("--no-error-term", action="store_true",
                    help="decode the edited activations alone (the paper) instead of keeping the reconstruction error")
    se.add_argument("--n-concepts", type=positive_int, default=8, help="top concepts compared per hit")
    se.add_argument("--valid-only", action="store_true", help="explain with validated concepts only")
    se.add_argument("--figures", help="folder for a figure of the query and its neighbours (needs an index whose "
                                      "images are known: an `msae embed` cache of an image dataset)")
    se.add_argument("--no-verify", action="store_true",
                    help="skip checking the index's shards against the sha256 its manifest records (one extra read "
                         "of the files; a plain matrix records none and is never verified)")
    se.add_argument("--out", help="results.json")
    se.set_defaults(func=run_search)

    b = sub.add_parser(
        "bias", help="audit a logistic probe on CLIP embeddings for concept associations (section 5.3)",
        description="Train a logistic probe for a binary label on the embeddings (F1 on a held-out split), test "
                    "concept magnitudes against its predictions (Mann-Whitney U, rank-biserial, Cohen's d; density "
                    "and box plots) and draw counterfactual curves: the class probability as a concept's magnitude "
                    "is raised in SAE space and decoded.")
    sae_data_args(b, "embedding set with labels (an `msae embed` cache, e.g. of celeba:ROOT) or a matrix + --labels")
    b.add_argument("--labels", type=existing, help="binary labels aligned with rows (.npy or one per line)")
    b.add_argument("--attribute", help="attribute of the cache's labels (CelebA: Male, Eyeglasses, ...)")
    b.add_argument("--invert-label", action="store_true", help="use 1 - label (the paper: 1 = female = not Male)")
    b.add_argument("--concept", help="comma-separated concepts to test (words with --concepts, or #neuron)")
    b.add_argument("--screen", type=int, default=10, help="also test the N neurons with the largest |Cohen's d|")
    b.add_argument("--alpha", type=float, default=0.01, help="significance level (Bonferroni over tested concepts)")
    b.add_argument("--min-effect", type=float, default=0.1, help="smallest |rank-biserial| called an association")
    b.add_argument("--test-fraction", type=float, default=0.2)
    b.add_argument("--examples", help="comma-separated rows for counterfactual curves (default: one per class)")
    b.add_argument("--max-magnitude", type=float, help="end of the magnitude grid (default 1.5 x the largest seen)")
    b.add_argument("--no-error-term", action="store_true", help="decode edited activations alone (the paper)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--figures", help="folder for density/box plots and counterfactual curves")
    b.add_argument("--out", required=True, help="bias.json")
    b.set_defaults(func=run_bias)


def _open(args: argparse.Namespace, concepts: bool):
    """(SAE, ConceptTable or None) for --sae, a folder or a release, and --concepts."""
    from ..interpret import ConceptTable
    from ..publish import open_sae

    sae, doc = open_sae(args.sae, device=args.device, concepts=concepts and not getattr(args, "concepts", None))
    if getattr(args, "concepts", None):
        return sae, ConceptTable.load(args.concepts)
    return sae, ConceptTable(doc, f"{args.sae} (its published concept matrix)") if doc else None


def _space(args: argparse.Namespace):
    """--sae (and its concepts) as the ConceptSpace the examples, search and bias commands share."""
    from ..interpret import open_space

    sae, table = _open(args, concepts=True)
    return open_space(sae, args.modality, table, args.device)


def run_concepts(args: argparse.Namespace) -> int:
    if args.clip and args.vocab_embeddings:
        raise ValueError("give either --clip MODEL --pretrained TAG or --vocab-embeddings FILE, not both")
    if args.clip and not args.pretrained:
        raise ValueError("--clip needs --pretrained (a tag, a checkpoint file, or 'none')")
    from ..interpret import embed_vocabulary, load_vocabulary, name_concepts, read_vocab_embeddings

    if not args.clip and not args.vocab_embeddings:
        from ..publish.registry import release_concepts, split_spec

        parsed = None if Path(args.sae).is_dir() else split_spec(args.sae)
        result = release_concepts(*parsed, threshold=args.threshold, ratio=args.ratio, top=args.top) \
            if parsed else None
        if result is None:
            raise ValueError("give --clip MODEL --pretrained TAG or --vocab-embeddings FILE (only a release that "
                             "publishes a concept matrix is named without them)")
        return _print_concepts(args, result)
    sae, _ = _open(args, concepts=False)
    words = load_vocabulary(args.vocab) if (args.vocab or args.clip) else None
    if args.clip:
        from ..embed import load_clip

        clip = load_clip(args.clip, args.pretrained, device=args.device)
        vocab_emb = embed_vocabulary(words, clip, batch_size=args.batch_size, template=args.template)
        if args.save_vocab_embeddings:
            import numpy as np

            np.save(args.save_vocab_embeddings, vocab_emb)
    else:
        vocab_emb, words = read_vocab_embeddings(args.vocab_embeddings, words)
    result = name_concepts(sae, vocab_emb, words, threshold=args.threshold, ratio=args.ratio, top=args.top,
                           remove_b_pre=args.remove_b_pre, stats_modality=args.stats_modality, progress=True)
    result["sae"] = str(args.sae)
    result["vocabulary"] = str(args.vocab or args.vocab_embeddings or "default (wordfreq en 10k)")
    return _print_concepts(args, result)


def _print_concepts(args: argparse.Namespace, result: dict) -> int:
    if args.figures:
        from ..plots import concept_similarity_figure

        Path(args.figures).mkdir(parents=True, exist_ok=True)
        result["figures"] = {"similarity_histogram": str(concept_similarity_figure(
            [w["similarity"] for w in result["words"]], args.threshold, Path(args.figures) / "concept_similarity.png"))}
    out = write_json(args.out, result)
    import json

    print(json.dumps(result["counts"], indent=2))
    valid = sorted((n for n in result["neurons"] if "all" in n["valid"]), key=lambda n: -n["similarity"])
    print(f"{len(valid)} neurons pass every validation; strongest: "
          + ", ".join(f"#{n['index']} {n['label']} ({n['similarity']:.2f})" for n in valid[:10]))
    print(f"concepts written to {out}")
    return 0


def run_examples(args: argparse.Namespace) -> int:
    from ..interpret import open_rows, resolve_neurons, save_example_grids, top_activating

    space, table = _space(args)
    rows = open_rows(args.data, captions=args.captions)
    names = split_list(args.neurons)
    if names:
        neurons = resolve_neurons(names, table)
    elif args.valid_only:
        if table is None:
            raise ValueError("--valid-only needs --concepts concepts.json")
        neurons = [i for i, ok in enumerate(table.valid) if ok]
    else:
        neurons = None
    result = top_activating(space, rows, neurons, n_top=args.n_top, n_intervals=args.intervals,
                            per_interval=args.per_interval, batch_size=args.batch_size,
                            labels=table.labels if table else None, progress=True)
    if args.figures:
        figs = save_example_grids(rows, result, args.figures, max_figures=args.max_figures)
        result["figures"] = [str(f) for f in figs]
        print(f"{len(figs)} image grids in {args.figures}" if figs else
              "no image grids: the rows' images cannot be read back (text rows, or the dataset moved)")
    out = write_json(args.out, result)
    for e in result["neurons"][:5]:
        best = e["top"][0] if e["top"] else None
        print(f"#{e['index']} {e.get('label', '')}: max {e['max']:.3g}, fires on {e['frequency']:.2%}"
              + (f"; top: {best.get('caption') or best.get('image') or best['id']}" if best else ""))
    print(f"examples of {len(result['neurons'])} neurons written to {out}")
    return 0


def run_search(args: argparse.Namespace) -> int:
    if (args.sae_space or args.steer) and not args.sae:
        raise ValueError("--sae-space and --steer need --sae DIR")
    if (args.query_image or args.query_text) and not (args.clip and args.pretrained):
        raise ValueError("--query-image / --query-text need --clip MODEL --pretrained TAG (the index's CLIP model)")
    from ..interpret import open_rows, parse_steering, query_embedding, similarity_search
    from ..store import verify_checksums

    rows = open_rows(args.index, captions=args.captions)
    verified = 0 if args.no_verify else verify_checksums(rows.source)
    print(f"index: {verified} shard(s) match their recorded sha256" if verified else
          f"index: not verified ({'--no-verify' if args.no_verify else 'it records no checksums'})")
    if args.figures and rows.dataset is None:
        raise ValueError(f"--figures: {args.index} is a plain matrix whose rows' images are unknown; figures need an "
                         "`msae embed` cache of an image dataset")
    space, table = _space(args) if args.sae else (None, None)
    clip = None
    if args.query_image or args.query_text:
        from ..embed import load_clip

        clip = load_clip(args.clip, args.pretrained, device=args.device)
    query, described = query_embedding(rows, row=args.query_row, id=args.query_id, embedding=args.query_embedding,
                                       image=args.query_image, text=args.query_text, clip=clip)
    result = similarity_search(rows, query, space=space, table=table, k=args.k, sae_space=args.sae_space,
                               steer=parse_steering(args.steer, table), error_term=not args.no_error_term,
                               n_concepts=args.n_concepts, valid_only=args.valid_only, progress=True)
    result["query"] = described
    result["index_verified_shards"] = verified
    if args.figures:
        from ..interpret.search import save_search_figure

        fig = save_search_figure(rows, result, Path(args.figures) / "search.png")
        result["figure"] = str(fig) if fig else None
        print(f"figure: {fig}" if fig else "no figure: none of the rows' images could be read back")
    out = write_json(args.out, result) if args.out else None

    def show(title, hits):
        print(title)
        for h in hits:
            what = h.get("caption") or h.get("image") or h["id"]
            shared = ", ".join(h["concepts"]["shared"]) if "concepts" in h else ""
            print(f"  {h['distance']:.4f}  row {h['row']}  {what}" + (f"  [shared: {shared}]" if shared else ""))

    if "query_concepts" in result:
        print("query concepts: " + ", ".join(f"{c[0]} ({c[2]:.2f})" for c in result["query_concepts"]))
    show("CLIP space (cosine distance):", result["clip"])
    if "sae" in result:
        show("SAE space (Manhattan distance):", result["sae"])
    for s in result.get("steered", []):
        edits = ", ".join(f"{e['concept']} {e['original']:.2f}->{'+' if e['mode'] == 'add' else ''}{e['value']:g}"
                          for e in s["edits"])
        show(f"steered ({edits}; moved {s['distance_from_query']:.4f} from the query):", s["hits"])
    if out:
        print(f"results written to {out}")
    return 0


def run_bias(args: argparse.Namespace) -> int:
    import numpy as np

    from ..interpret import bias_analysis, open_rows, resolve_neurons
    from ..interpret.bias import save_bias_figures
    from ..loading import load_labels

    space, table = _space(args)
    rows = open_rows(args.data)
    labels = load_labels(args.labels) if args.labels else rows.label_column(args.attribute)
    if args.invert_label:
        labels = 1 - labels
    examples = [int(v) for v in split_list(args.examples)] or None
    report = bias_analysis(space, rows, np.asarray(labels), concepts=resolve_neurons(split_list(args.concept), table),
                           concept_names=table.labels if table else None, screen=args.screen, alpha=args.alpha,
                           min_effect=args.min_effect, test_fraction=args.test_fraction, examples=examples,
                           max_magnitude=args.max_magnitude, error_term=not args.no_error_term,
                           seed=args.seed, progress=True)
    if args.figures:
        report["figures"] = save_bias_figures(report, args.figures)
    report.pop("_arrays")
    out = write_json(args.out, report)
    p = report["probe"]
    print(f"probe: F1 {p['f1']:.4f}, accuracy {p['accuracy']:.4f} on {p['n_test']} held-out rows")
    for r in report["concepts"]:
        flag = f"associated with {r['direction']}" if r["associated"] else "no association"
        print(f"  {r['concept']} (#{r['neuron']}): rank-biserial {r['rank_biserial']:+.3f}, "
              f"Cohen's d {r['cohens_d']:+.3f}, p {r['p_value']:.2e} -> {flag}")
    print(f"report written to {out}")
    return 0
