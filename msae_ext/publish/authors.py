"""The authors' released checkpoints (WolodjaZ/MSAE, on GitHub and the Hugging Face Hub) as this
package's SAEs, and their concept-interpreter matrices as concept names.

Their training script saves `{"model": state_dict, "mean_center": (d_in,), "scaling_factor":
float, "target_norm": float}`; the state dict holds `pre_bias` (d_in), `encoder` (d_in, d_sae),
`latent_bias` (d_sae) and `decoder` (d_sae, d_in). A flat state dict with the statistics beside
the weights is read too. Their forward at inference (ReLU only, the paper's protocol):

    x' = (x - mean_center) * scaling_factor
    z  = ReLU((x' - pre_bias) @ encoder + latent_bias)
    x_hat = ((z @ decoder + pre_bias) / scaling_factor) + mean_center

which is eq. 1 with W_enc = encoder, b_enc = latent_bias, W_dec = decoder, b_dec = pre_bias and
the preprocessing (mean, scale) = (mean_center, scaling_factor). A `not_centered` release stores a
zero mean. Their scaling factor follows their own formula, target_norm / E||x - mu||^2 (no square
root, see paper-recipe.md), not the paper's sqrt(n) / E||x - mu||; it is kept as stored, because
the weights were trained on inputs scaled by it. The configuration is encoded in the file name,
`{d_sae}_{d_in}_{activation}_{k}_...`, e.g.
`6144_768_TopKReLU_64_RW_False_False_0.0_cc3m_ViT-L~14_train_image_2905936_768.pth`; shapes are
checked against it, and the architecture comes from it (RW/UW -> msae, TopKReLU -> topk,
BatchTopK -> batchtopk, ReLU -> relu). nn.Linear-style keys (`encoder.weight` (d_sae, d_in)) and
transposed matrices are recognised by their shapes.

Files are read with torch's weights-only unpickler (tensors, numbers and numpy scalars only), so a
file whose pickle would run code is refused.

Their concept interpreter (`sae_naming.py`) saves an (n_words, d_sae) matrix: the cosine of each
vocabulary word's raw CLIP text embedding with each decoder row mapped back to CLIP space
(decoder / scaling_factor + mean_center). `read_concept_matrix` reads it with its vocabulary.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..normalization import METADATA_KEY, ModalityStats

REQUIRED = ("pre_bias", "encoder", "latent_bias", "decoder")
STATS = ("mean_center", "scaling_factor")


class AuthorsCheckpointError(ValueError):
    pass


def parse_authors_name(name: str) -> dict[str, Any]:
    """What the authors' file name says: d_sae, d_in, activation, k, weighting, modality, model."""
    stem = Path(name).name.removesuffix(".pth").removesuffix(".pt")
    parts = stem.split("_")
    out: dict[str, Any] = {"file": Path(name).name}
    if len(parts) >= 2 and parts[0].isdigit() and parts[1].isdigit():
        out["d_sae"], out["d_in"] = int(parts[0]), int(parts[1])
    if len(parts) >= 3:
        out["activation"] = parts[2]
    if len(parts) >= 4 and re.fullmatch(r"\d+", parts[3]):
        out["k"] = int(parts[3])
    upper = [p.upper() for p in parts]
    if "RW" in upper or "UW" in upper:
        out["weighting"] = "rw" if "RW" in upper else "uw"
    for m in ("image", "text"):
        if m in parts:
            out["modality"] = m
    model = next((p for p in parts if p.startswith("ViT") or p.startswith("RN")), None)
    if model:
        out["clip_model"] = model.replace("~", "/")
    return out


def _architecture(info: dict[str, Any], override: str | None) -> str:
    if override:
        return override
    act = str(info.get("activation", "")).lower()
    if "weighting" in info or "matryoshka" in act or "msae" in act:
        return "msae"
    if "batchtopk" in act:
        return "batchtopk"
    if "topk" in act:
        return "topk"
    if "relu" in act:
        return "relu"
    raise AuthorsCheckpointError(
        f"{info.get('file')}: cannot tell the architecture from the file name (activation "
        f"{info.get('activation')!r}); pass architecture='msae'|'topk'|'batchtopk'|'relu'"
    )


def _matrix(state: dict[str, torch.Tensor], key: str, rows: int, cols: int, path: str) -> torch.Tensor:
    t = state.get(key, state.get(f"{key}.weight"))
    if t is None:
        raise AuthorsCheckpointError(f"{path}: no '{key}' in the state dict (keys: {sorted(state)[:10]})")
    t = t.detach().float()
    if tuple(t.shape) == (rows, cols):
        return t
    if tuple(t.shape) == (cols, rows):
        return t.T.contiguous()
    raise AuthorsCheckpointError(f"{path}: '{key}' has shape {tuple(t.shape)}, expected ({rows}, {cols})")


def _numpy_scalars() -> list[Any]:
    """What a pickled numpy scalar needs (their target_norm is np.sqrt(d_in), a numpy float64)."""
    return [np.float64(0).__reduce__()[0], np.dtype,
            *(type(np.dtype(t)) for t in (np.float64, np.float32, np.float16, np.int64, np.int32, np.bool_))]


def read_authors_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, statistics) of an authors' file; statistics are read beside `model` (their
    layout) or inside a flat state dict, and are {} when the file has none."""
    path = Path(path)
    if not path.exists():
        raise AuthorsCheckpointError(f"{path}: no such file")
    try:
        with torch.serialization.safe_globals(_numpy_scalars()):
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, a pickle of arbitrary objects, ...
        raise AuthorsCheckpointError(f"{path}: not a readable PyTorch checkpoint of tensors and numbers (a file "
                                     f"whose pickle would run code is refused): {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise AuthorsCheckpointError(f"{path}: expected a dict, got {type(raw).__name__}")
    nested = raw.get("model", raw.get("state_dict"))
    state = nested if isinstance(nested, dict) else raw
    missing = [k for k in REQUIRED if k not in state and f"{k}.weight" not in state]
    if missing:
        raise AuthorsCheckpointError(f"{path}: not an authors' MSAE checkpoint; missing {missing}")
    stats = {k: raw[k] for k in (*STATS, "target_norm") if k in raw}
    stats.update({k: state[k] for k in (*STATS, "target_norm") if k in state and k not in stats})
    return state, stats


def _number(value: Any, key: str, path: Path) -> float:
    t = torch.as_tensor(np.asarray(value, dtype=np.float64) if not isinstance(value, torch.Tensor) else value)
    if t.numel() != 1 or not torch.isfinite(t).all():
        raise AuthorsCheckpointError(f"{path}: {key} must be one finite number, got shape {tuple(t.shape)}")
    return float(t.reshape(-1)[0])


def convert_authors_checkpoint(path: str | Path, architecture: str | None = None, modality: str | None = None,
                               preprocessed: bool = False) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(sae-lens cfg dict, state dict) of our inference SAE equal to the authors' forward.

    A file without `mean_center` and `scaling_factor` is refused: its SAE would take inputs
    preprocessed by statistics nobody has. `preprocessed=True` accepts it, for an SAE whose inputs
    the caller prepares itself (no statistics are attached)."""
    path = Path(path)
    state, raw_stats = read_authors_checkpoint(path)
    info = parse_authors_name(str(path))
    b_dec = state["pre_bias"].detach().float().reshape(-1)
    b_enc = state["latent_bias"].detach().float().reshape(-1)
    d_in, d_sae = b_dec.numel(), b_enc.numel()
    for key, want in (("d_in", d_in), ("d_sae", d_sae)):
        if key in info and info[key] != want:
            raise AuthorsCheckpointError(f"{path}: the file name says {key}={info[key]}, the weights have {want}")
    W_enc = _matrix(state, "encoder", d_in, d_sae, str(path))
    W_dec = _matrix(state, "decoder", d_sae, d_in, str(path))
    arch = _architecture(info, architecture)
    modality = modality or info.get("modality") or "image"
    cfg: dict[str, Any] = {"architecture": {"msae": "msae", "topk": "msae_topk", "batchtopk": "msae_batchtopk",
                                            "relu": "msae_relu"}[arch],
                           "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
                           "apply_b_dec_to_input": True}
    if arch == "msae":
        from ..architectures import resolve_k_list

        cfg["k_list"] = resolve_k_list(d_sae, None, info.get("k", 64))
    if arch in ("topk", "batchtopk") and "k" in info:
        cfg["k"] = info["k"]
    from sae_lens import __version__ as sae_lens_version

    # a 6.x config: without the version sae-lens treats the dict as pre-6.0 and drops our metadata
    metadata: dict[str, Any] = {"modality": modality, "msae_authors": info, "sae_lens_version": sae_lens_version}
    if all(k in raw_stats for k in STATS):
        mean = torch.as_tensor(raw_stats["mean_center"]).detach().float().reshape(-1)
        if mean.numel() == 1:  # a scalar mean (0 for their not-centered runs) broadcasts
            mean = mean.expand(d_in).clone()
        if mean.numel() != d_in or not torch.isfinite(mean).all():
            raise AuthorsCheckpointError(f"{path}: mean_center has {mean.numel()} values (or non-finite ones), "
                                         f"the SAE has d_in={d_in}")
        scale = _number(raw_stats["scaling_factor"], "scaling_factor", path)
        stats = ModalityStats(mean=mean, scale=scale, n_rows=0,
                              source=f"authors' checkpoint {path.name} (their scaling formula)")
        metadata[METADATA_KEY] = {modality: stats.to_dict()}
        if "target_norm" in raw_stats:
            metadata["msae_authors"]["target_norm"] = _number(raw_stats["target_norm"], "target_norm", path)
    elif not preprocessed:
        raise AuthorsCheckpointError(
            f"{path}: no mean_center and scaling_factor, neither beside 'model' (the authors' layout) nor in the "
            "state dict, so the SAE's inputs cannot be prepared from raw CLIP embeddings; if you preprocess them "
            "yourself, pass preprocessed=True (msae convert --preprocessed-inputs)")
    cfg["metadata"] = metadata
    weights = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    return cfg, weights


def load_authors_sae(path: str | Path, architecture: str | None = None, modality: str | None = None,
                     device: str = "cpu", preprocessed: bool = False):
    """The authors' checkpoint as a PaperSAE (registered architecture; statistics attached)."""
    from sae_lens import SAE

    from ..architectures import register_all
    from sae_lens.loading.pretrained_sae_loaders import handle_config_defaulting

    register_all()
    cfg, weights = convert_authors_checkpoint(path, architecture, modality, preprocessed)
    cfg = handle_config_defaulting(cfg)
    cfg_cls = SAE.get_sae_config_class_for_architecture(cfg["architecture"])
    sae = SAE.get_sae_class_for_architecture(cfg["architecture"])(cfg_cls.from_dict(cfg))
    sae.load_state_dict(weights)
    return sae.to(device)


def read_concept_matrix(matrix_path: str | Path, vocab_path: str | Path) -> tuple[np.ndarray, list[str]]:
    """The authors' concept-interpreter matrix (n_words, d_sae), memory-mapped, and its vocabulary
    (one word per line, in row order)."""
    from ..fileio import FileFormatError, load_npy

    try:
        matrix = load_npy(matrix_path, mmap_mode="r")
    except FileFormatError as e:
        raise AuthorsCheckpointError(str(e)) from None
    words = [w.strip() for w in Path(vocab_path).read_text(encoding="utf-8").splitlines()]
    while words and not words[-1]:
        words.pop()
    if matrix.ndim != 2 or matrix.shape[0] != len(words):
        raise AuthorsCheckpointError(f"{matrix_path}: shape {matrix.shape}, expected ({len(words)}, d_sae): one row "
                                     f"per word of {Path(vocab_path).name}")
    if matrix.dtype.kind != "f":
        raise AuthorsCheckpointError(f"{matrix_path}: holds {matrix.dtype} values, not similarities")
    return matrix, words
