"""`msae publish`: trained SAEs -> a Hugging Face repository in sae-lens's format, with a model card.

Per SAE, a folder SAE_ID/ holding cfg.json (the normalisation statistics in its metadata),
sae_weights.safetensors and sparsity.safetensors, exactly what `SAE.from_pretrained(repo, SAE_ID)`
reads. `format='msae'` publishes the registered architecture (needs `import msae_ext` to load;
soft-capped SAEs need it); `format='standard'` publishes sae-lens's own `standard` SAE with the
modality's preprocessing folded in (loads with sae-lens alone). The repository's README.md is a
model card: evaluation table, recipe, CLIP model and data provenance.
"""

from __future__ import annotations

import json
import shutil
import re
import tempfile
from pathlib import Path
from typing import Any

import yaml

from ..fileio import plain_name, write_text_atomic
from ..normalization import FOLDED_METADATA_KEY, METADATA_KEY

EVAL_COLUMNS = (("l0_sparsity", "L0 (frac. zeros)"), ("l0_active", "active latents"), ("fvu", "FVU"),
                ("cos_sim", "CS"), ("cknna", "CKNNA"), ("dead_neurons", "NDN"))


class PublishError(ValueError):
    pass


_LOCAL_PATH = re.compile(r"(?<![\w.~/])(?:~|/(?!/))[^\s'\",;()]*")  # not a URL's //


def public_text(text: str) -> str:
    """`text` with every absolute or home path cut to its last two components: a model card names
    data, never the publisher's file system (/home/me/data/cc3m/train.npy -> .../cc3m/train.npy)."""
    def cut(m: re.Match) -> str:
        parts = [p for p in m.group(0).split("/") if p and p != "~"]
        return ".../" + "/".join(parts[-2:]) if parts else m.group(0)

    return _LOCAL_PATH.sub(cut, text)


def sae_id_for(cfg: dict[str, Any], modality: str) -> str:
    expansion = cfg["d_sae"] // cfg["d_in"]
    return f"{modality}_x{expansion}" if cfg["d_sae"] % cfg["d_in"] == 0 else f"{modality}_d{cfg['d_sae']}"


def _stage_one(sae_dir: Path, out: Path, modality: str | None, fmt: str) -> dict[str, Any]:
    from ..loading import load_sae
    from ..export import export_standard

    cfg = json.loads((sae_dir / "cfg.json").read_text())
    sae = load_sae(sae_dir)
    modality = modality or sae.cfg.metadata.get("modality") or "image"
    from ..normalization import get_stats

    get_stats(sae, modality)  # the modality's statistics must travel with the SAE
    if fmt == "standard":
        export_standard(sae, modality, out)
    elif fmt == "msae":
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy2(sae_dir / "sae_weights.safetensors", out / "sae_weights.safetensors")
        cfg.setdefault("metadata", {})["modality"] = modality
        write_text_atomic(out / "cfg.json", json.dumps(cfg, indent=2))
    else:
        raise PublishError(f"unknown format {fmt!r}; expected 'msae' or 'standard'")
    if (sae_dir / "sparsity.safetensors").exists():
        shutil.copy2(sae_dir / "sparsity.safetensors", out / "sparsity.safetensors")
    entry = {"architecture": cfg.get("architecture"), "d_in": cfg["d_in"], "d_sae": cfg["d_sae"],
             "modality": modality, "format": fmt, "metadata": cfg.get("metadata", {})}
    for name in ("eval.json", "train_config.yaml"):
        if (sae_dir / name).exists():
            entry[name] = (sae_dir / name).read_text()
    entry["provenance"] = _provenance(entry)
    if "train_config.yaml" in entry:  # the recipe as shown on the card, without the publisher's paths
        entry["train_config.yaml"] = public_text(entry["train_config.yaml"])
    return entry


def _provenance(entry: dict[str, Any]) -> dict[str, Any]:
    """Training data and CLIP model: from the SAE's metadata, else from the manifest of the
    `msae embed` cache its recipe trained on."""
    meta = entry["metadata"]
    out: dict[str, Any] = {"clip": meta.get("clip_model")}
    train_data = None
    if "train_config.yaml" in entry:
        train_data = (yaml.safe_load(entry["train_config.yaml"]) or {}).get("train_data")
    if isinstance(train_data, (str, Path)):
        out["train_data"] = public_text(str(train_data))
        manifest = Path(train_data) / "manifest.json"
        if manifest.exists():  # the data named by its manifest: model, dataset, rows
            m = json.loads(manifest.read_text())
            out["clip"] = out["clip"] or f"{m.get('model')} ({m.get('pretrained')})"
            out["dataset"] = public_text(str(m.get("source"))) if m.get("source") else None
            out["rows"] = m.get("n_rows")
    elif isinstance(train_data, dict) and "clip" in train_data:
        c = train_data["clip"]
        out["clip"] = out["clip"] or f"{c.get('model')} ({c.get('pretrained')})"
        out["dataset"] = public_text(str(c.get("dataset")))
    return out


def model_card(repo: str, entries: dict[str, dict[str, Any]], title: str | None = None) -> str:
    """README.md for the repository: front matter, evaluation table, recipes, provenance, usage."""
    lines = ["---", "library_name: saelens", "license: mit",
             "tags:", "- sparse-autoencoder", "- matryoshka", "- clip", "- interpretability", "- msae_ext", "---", "",
             f"# {title or repo}", "",
             "Matryoshka (hierarchical) sparse autoencoders on CLIP embeddings "
             "(Zaigrajew et al., *Interpreting CLIP with Hierarchical Sparse Autoencoders*, ICML 2025), "
             "trained and published with msae_ext, an extension of sae-lens.", "",
             "## SAEs", "",
             "| sae_id | architecture | d_in | d_sae | modality | format | " + " | ".join(c for _, c in EVAL_COLUMNS) + " |",
             "|" + "---|" * (6 + len(EVAL_COLUMNS))]
    for sae_id, e in entries.items():
        report = json.loads(e["eval.json"]) if "eval.json" in e else {}
        vals = [f"{report[k]:.4g}" if isinstance(report.get(k), float) else
                ("-" if report.get(k) is None else str(report[k])) for k, _ in EVAL_COLUMNS]
        lines.append(f"| `{sae_id}` | {e['architecture']} | {e['d_in']} | {e['d_sae']} | {e['modality']} | "
                     f"{e['format']} | " + " | ".join(vals) + " |")
    lines += ["", "L0 is the paper's: the mean fraction of zero latents (higher is sparser); active latents is "
              "the usual L0. FVU and CS are measured in CLIP space on the held-out set named in each recipe; "
              "'-' means the SAE was published without an evaluation report.", ""]
    lines += ["## Provenance", ""]
    for sae_id, e in entries.items():
        m, p = e["metadata"], e["provenance"]
        stats = m.get("msae_normalization") or m.get("msae_folded_normalization") or {}
        src = {mod: public_text(str(s.get("source", ""))) for mod, s in stats.items()}
        data = (f"trained on {p['dataset']} ({p.get('rows') or '?'} rows)" if p.get("dataset")
                else f"trained on {p['train_data']}" if p.get("train_data") else "training data not recorded")
        lines.append(f"- `{sae_id}`: CLIP {p.get('clip') or 'model not recorded'}; {data}; normalisation statistics from "
                     + (", ".join(f"{mod}: {s or 'unknown'}" for mod, s in src.items()) or "none recorded")
                     + ("; statistics folded into the weights (takes raw CLIP embeddings)"
                        if e["format"] == "standard" else "; statistics in cfg.json metadata"))
    lines += ["", "## Recipes", ""]
    for sae_id, e in entries.items():
        if "train_config.yaml" in e:
            lines += [f"`{sae_id}`:", "", "```yaml", e["train_config.yaml"].rstrip(), "```", ""]
    ex_id = next(iter(entries))
    lines += ["## Usage", "", "```python"]
    if any(e["format"] == "msae" for e in entries.values()):
        lines += ["import msae_ext  # registers the architectures", "from sae_lens import SAE",
                  f'sae = SAE.from_pretrained("{repo}", "{ex_id}")',
                  f'stats = msae_ext.get_stats(sae, "{entries[ex_id]["modality"]}")',
                  "z = sae.encode(stats.apply(clip_embeddings))     # concept magnitudes",
                  "recon = stats.invert(sae.decode(z))              # back to CLIP space"]
    else:
        lines += ["from sae_lens import SAE  # no msae_ext needed",
                  f'sae = SAE.from_pretrained("{repo}", "{ex_id}")',
                  "recon = sae(clip_embeddings)  # raw CLIP embeddings in, CLIP space out"]
    lines += ["```", ""]
    return "\n".join(lines)


def stage_release(sae_dirs: list[str | Path], repo: str, out: str | Path, *, sae_ids: list[str] | None = None,
                  modality: str | None = None, fmt: str = "msae", title: str | None = None) -> Path:
    """Write the repository tree (one folder per SAE + README.md) into `out`."""
    if sae_ids is not None and len(sae_ids) != len(sae_dirs):
        raise PublishError(f"{len(sae_ids)} --sae-id values for {len(sae_dirs)} SAEs")
    for sae_id in sae_ids or []:
        plain_name(sae_id, "--sae-id")
    if "/" not in repo or repo.count("/") != 1:
        raise PublishError(f"--repo {repo!r}: expected OWNER/NAME")
    ids: dict[str, Path] = {}  # every id checked before anything is written
    for i, d in enumerate(map(Path, sae_dirs)):
        if not (d / "cfg.json").exists():
            raise PublishError(f"{d}: no cfg.json; pass the --out folder of `msae train`")
        cfg = json.loads((d / "cfg.json").read_text())
        m = modality or (cfg.get("metadata") or {}).get("modality") or "image"
        sae_id = sae_ids[i] if sae_ids else sae_id_for(cfg, m)
        if sae_id in ids:
            raise PublishError(f"two SAEs would be published as {sae_id!r}; give --sae-id for each")
        meta = cfg.get("metadata") or {}
        if m not in {**(meta.get(METADATA_KEY) or {}), **(meta.get(FOLDED_METADATA_KEY) or {})}:
            raise PublishError(f"{d}: no {m} statistics in cfg.json, so the published SAE could not take raw {m} "
                               f"embeddings; attach them with `msae stats --sae {d} --modality {m} --data ...`")
        ids[sae_id] = d
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    entries = {sae_id: _stage_one(d, out / sae_id, modality, fmt) for sae_id, d in ids.items()}
    write_text_atomic(out / "README.md", model_card(repo, entries, title))
    (out / "msae_release.json").write_text(json.dumps(
        {"repo": repo, "saes": {k: {kk: v for kk, v in e.items() if kk in ("architecture", "d_in", "d_sae",
                                                                        "modality", "format")}
                                for k, e in entries.items()}}, indent=2))
    return out


def publish(sae_dirs: list[str | Path], repo: str, *, out: str | Path | None = None, dry_run: bool = False,
            sae_ids: list[str] | None = None, modality: str | None = None, fmt: str = "msae",
            private: bool = False, token: str | None = None, title: str | None = None) -> Path | str:
    """Stage the release and upload it with huggingface_hub (or, with dry_run, leave it in `out`)."""
    if dry_run:
        if out is None:
            raise PublishError("--dry-run needs --out LOCAL_DIR")
        return stage_release(sae_dirs, repo, out, sae_ids=sae_ids, modality=modality, fmt=fmt, title=title)
    from huggingface_hub import HfApi

    with tempfile.TemporaryDirectory(prefix="msae_publish_") as tmp:
        staged = stage_release(sae_dirs, repo, out or tmp, sae_ids=sae_ids, modality=modality, fmt=fmt, title=title)
        api = HfApi(token=token)
        try:
            api.create_repo(repo, private=private, exist_ok=True)
            info = api.upload_folder(folder_path=str(staged), repo_id=repo,
                                     commit_message=f"msae publish: {', '.join(sorted(p.name for p in staged.iterdir() if p.is_dir()))}")
        except Exception as e:  # offline, no token, no rights: say so, keep nothing half-done locally
            raise PublishError(f"upload to the Hugging Face Hub failed ({type(e).__name__}: {e}). Check the network "
                               "and `huggingface-cli login`; `--dry-run --out DIR` writes the same tree locally") from e
    return str(getattr(info, "commit_url", info))

