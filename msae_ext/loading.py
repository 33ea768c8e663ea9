"""Reading back what the pipeline wrote: trained SAE folders and class labels.

Every later stage (training's final report, evaluation, interpretation, publishing) loads SAEs
and labels through here, so a damaged file gets the same clear error everywhere: the file, and
what is wrong with it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .fileio import load_npy


class LoadError(ValueError):
    """A file that cannot be read back as what it claims to be."""


def load_sae(path: str | Path, device: str = "cpu"):
    """An SAE folder in sae-lens format (the --out folder of `msae train`, or one `msae publish`
    wrote), as the sae-lens SAE its cfg.json names."""
    from safetensors import SafetensorError

    from .architectures import register_all

    path = Path(path)
    cfg_path, weights = path / "cfg.json", path / "sae_weights.safetensors"
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such SAE folder")
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{path}: no cfg.json; pass the --out folder of `msae train` or an SAE folder")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoadError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or "architecture" not in cfg or "d_in" not in cfg or "d_sae" not in cfg:
        raise LoadError(f"{cfg_path}: not an SAE config (it needs architecture, d_in and d_sae)")
    if not weights.is_file():
        raise FileNotFoundError(f"{path}: no sae_weights.safetensors beside cfg.json")
    register_all()
    from sae_lens import SAE
    from sae_lens.registry import SAE_CLASS_REGISTRY

    if cfg["architecture"] not in SAE_CLASS_REGISTRY:
        raise LoadError(f"{cfg_path}: unknown architecture {cfg['architecture']!r}; "
                        f"registered ones are {sorted(SAE_CLASS_REGISTRY)}")
    try:
        return SAE.load_from_disk(path, device=device)
    except SafetensorError as e:
        raise LoadError(f"{weights}: not a readable safetensors file (corrupt or truncated?): {e}") from None
    except (RuntimeError, KeyError) as e:  # shapes or names that do not match cfg.json
        raise LoadError(f"{weights}: does not hold the weights {cfg_path.name} describes ({e})") from None


def load_labels(path: str | Path) -> np.ndarray:
    """Integer class labels, one per row: an .npy of integers, or a text file with one label (an
    integer or a class name) per line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such labels file")
    if path.suffix == ".npy":
        labels = load_npy(path)
    else:
        try:
            lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
        except UnicodeDecodeError:
            raise LoadError(f"{path}: not a text file of labels (one per line) nor an .npy") from None
        try:
            labels = np.array([int(v) for v in lines])
        except ValueError:
            index = {name: i for i, name in enumerate(sorted(set(lines)))}
            labels = np.array([index[v] for v in lines])
    labels = np.asarray(labels).reshape(-1)
    if labels.dtype.kind not in "iu":
        raise LoadError(f"{path}: labels must be integers (or one class name per line), got {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise LoadError(f"{path}: labels are class indices and must be >= 0; row {int(np.argmin(labels))} "
                        f"holds {int(labels.min())}")
    return labels.astype(np.int64)
