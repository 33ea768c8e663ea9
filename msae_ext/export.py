"""Export an MSAE to a plain sae-lens `standard` SAE with one modality's preprocessing folded in.

Without soft-capping, an MSAE at inference is exactly sae-lens's `standard` SAE with
apply_b_dec_to_input (ReLU(W_enc (x - b_dec) + b_enc), W_dec z + b_dec). The preprocessing
y = s (x - mu) and its inverse x = y / s + mu are affine, so sae-lens's own
`fold_activation_whitening(mean=mu, whitening_matrix=s I, unwhitening_matrix=I / s)` absorbs
them: the exported SAE takes raw CLIP embeddings, returns reconstructions in CLIP space, and loads
with sae-lens alone (no `import msae_ext`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .architectures import PaperSAE
from .normalization import FOLDED_METADATA_KEY, METADATA_KEY, get_stats


def export_standard(sae: PaperSAE, modality: str, out_dir: str | Path) -> Path:
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig

    if sae.cfg.soft_cap is not None:
        raise ValueError(
            f"this SAE is soft-capped (soft_cap={sae.cfg.soft_cap}); tanh capping has no `standard` "
            "equivalent, so it can only be loaded through msae_ext's registered architecture"
        )
    if sae.cfg.inference_k is not None or sae.cfg.inference_threshold is not None:
        raise ValueError("export the ReLU-only SAE: inference_k / inference_threshold must be unset")
    stats = get_stats(sae, modality)
    metadata = sae.cfg.metadata.to_dict()
    # The statistics are now inside the weights: keep them under another key, so nothing applies
    # them a second time (msae_ext.get_stats treats an exported SAE as taking raw embeddings).
    metadata[FOLDED_METADATA_KEY] = {modality: metadata.pop(METADATA_KEY)[modality]}
    metadata.update({
        "msae_export": {"from_architecture": sae.cfg.architecture(), "modality": modality,
                        "folded": "x -> (x - mean) * scale; the SAE takes raw CLIP embeddings"},
        "modality": modality,
    })
    cfg = StandardSAEConfig(d_in=sae.cfg.d_in, d_sae=sae.cfg.d_sae, dtype="float32", device="cpu",
                            apply_b_dec_to_input=True)
    standard = StandardSAE(cfg)
    state = {k: v.detach().to("cpu", torch.float32) for k, v in sae.state_dict().items()}
    standard.load_state_dict({k: state[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")})
    d = sae.cfg.d_in
    eye = torch.eye(d, dtype=torch.float64)
    standard.fold_activation_whitening(
        mean=stats.mean.double(), whitening_matrix=stats.scale * eye, unwhitening_matrix=eye / stats.scale
    )
    standard.to(torch.float32)
    out_dir = Path(out_dir)
    standard.save_model(out_dir)
    cfg_path = out_dir / "cfg.json"
    cfg_dict = json.loads(cfg_path.read_text())
    cfg_dict["metadata"] = {**cfg_dict.get("metadata", {}), **metadata}
    cfg_path.write_text(json.dumps(cfg_dict))
    return out_dir
