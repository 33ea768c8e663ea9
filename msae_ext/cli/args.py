"""Argument types shared by the command groups: checked at parse time, before any heavy import."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def existing(path: str) -> str:
    """A file or folder that must exist."""
    if not Path(path).exists():
        raise argparse.ArgumentTypeError(f"{path}: no such file or directory")
    return path


def existing_data(spec: str) -> str:
    """An embedding spec (msae_ext.store): its path part must exist, unless it names a Hub dataset."""
    if spec.startswith("hf://"):
        return spec
    path = spec.rpartition("#")[0] if "#" in spec else spec
    existing(path)
    return spec


def sae_folder(path: str) -> str:
    """A trained SAE folder: it must hold a cfg.json."""
    folder = Path(path)
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"{path}: no such SAE folder")
    if not (folder / "cfg.json").is_file():
        raise argparse.ArgumentTypeError(f"{path}: no cfg.json; pass the --out folder of `msae train` or an SAE folder")
    return path


def release_names() -> list[str]:
    """The registry's releases, read from the YAML file without importing sae-lens."""
    import yaml

    registry = Path(__file__).resolve().parent.parent / "publish" / "pretrained_saes.yaml"
    return list(yaml.safe_load(registry.read_text()))


def sae_ref(spec: str) -> str:
    """An SAE folder (holding a cfg.json) or a release of the registry: RELEASE or RELEASE:SAE_ID."""
    if Path(spec).is_dir():
        return sae_folder(spec)
    if spec.partition(":")[0] in release_names():
        return spec
    raise argparse.ArgumentTypeError(f"{spec}: neither an SAE folder nor a release ({', '.join(release_names())}; "
                                     "RELEASE:SAE_ID picks one of its SAEs)")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def split_list(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def write_json(path: str | Path, data) -> Path:
    from ..fileio import write_text_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(data, indent=1))
    return path


def sae_data_args(p, data_help: str | None) -> None:
    """--sae, --data (when `data_help` is given), --modality, --concepts, --device: the options of
    every command that reads an SAE over an embedding set."""
    p.add_argument("--sae", required=data_help is not None, type=sae_ref,
                   help="SAE folder, or a release (RELEASE[:SAE_ID], e.g. msae-clip-vitl14-rw), whose concept names "
                        "come with it")
    if data_help:
        p.add_argument("--data", required=True, type=existing_data, help=data_help)
    p.add_argument("--modality", choices=("image", "text"), default=None,
                   help="which saved statistics to apply to the rows (default: the SAE's training modality)")
    p.add_argument("--concepts", type=existing, help="concepts.json from `msae concepts` (latent names and "
                                                     "validations; a release's come with it)")
    p.add_argument("--device", default="cpu")
