"""open_clip models for embedding: a name or a model-config JSON, weights from a tag or a file.

`load_clip("ViT-L-14", "openai")` is the paper's model (open_clip's `ViT-L-14` with the OpenAI
weights is the same network as OpenAI's `clip` package). A path to an open_clip model-config JSON
registers that config under its file stem (custom architectures, and the small test models).
Weights: a pretrained tag (downloaded into the Hugging Face cache once; offline, an error says
which file to put where), a local checkpoint file, or none (`pretrained=None`, random weights).
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch


class ClipLoadError(ValueError):
    """The model or its weights cannot be built here (unknown name, missing file, no network)."""


@dataclass
class LoadedClip:
    """A CLIP model ready to embed: eval mode, on its device."""

    model: Any
    preprocess: Callable  # PIL image -> (3, H, W) tensor: the model's own eval transform
    tokenizer: Callable  # list[str] -> (N, context_length) token ids
    name: str  # open_clip model name (the config's stem for a JSON)
    pretrained: str | None  # tag, file path, or None
    config: dict[str, Any]  # the open_clip model config
    device: torch.device
    seed: int | None = None  # what drew the random weights when there is no pretrained file

    @property
    def embed_dim(self) -> int:
        return int(self.config["embed_dim"])

    def describe(self) -> dict[str, Any]:
        return {"model": self.name, "pretrained": self.pretrained, "model_config": self.config,
                **({"seed": self.seed} if self.pretrained is None else {})}


def _resolve_model_name(model: str) -> str:
    import open_clip

    path = Path(model)
    if path.suffix == ".json":
        if not path.is_file():
            raise ClipLoadError(f"{path}: no such open_clip model-config file")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ClipLoadError(f"{path}: not valid JSON: {e}") from e
        missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
        if missing:
            raise ClipLoadError(f"{path}: not an open_clip model config (missing {missing})")
        open_clip.add_model_config(path)
        return path.stem
    if open_clip.get_model_config(model) is None and not model.startswith(("hf-hub:", "local-dir:")):
        close = [m for m in open_clip.list_models() if model.lower() in m.lower()][:8]
        raise ClipLoadError(
            f"unknown open_clip model {model!r}" + (f"; did you mean one of {close}?" if close else "")
            + " (open_clip.list_models() lists them; a path to a model-config .json adds a custom one)"
        )
    return model


def _network_available(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _check_tag_available(name: str, tag: str, cache_dir: str | None) -> None:
    """Fail at once, with instructions, when a tag's weights are neither cached nor downloadable."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(name) if hasattr(open_clip, "list_pretrained_tags_by_model") else []
        raise ClipLoadError(
            f"{name}: unknown pretrained tag {tag!r}" + (f"; known tags: {tags}" if tags else "")
            + ". Pass a tag, a local checkpoint file, or 'none'."
        )
    hub = (cfg.get("hf_hub") or "").rstrip("/")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            hit = try_to_load_from_cache(hub, filename, cache_dir=cache_dir)
            if isinstance(hit, str):
                return
    if _network_available():
        return
    where = (f"the file open_clip_pytorch_model.bin (or open_clip_model.safetensors) of the Hugging Face repo {hub}"
             if hub else f"the file at {cfg.get('url')}")
    raise ClipLoadError(
        f"the weights of {name} / {tag} are not on this machine and there is no network to download them. "
        f"On a machine with network, either run `python -c \"import open_clip; open_clip.create_model('{name}', "
        f"pretrained='{tag}')\"` and copy its Hugging Face cache (HF_HOME, default ~/.cache/huggingface) to the "
        f"same place here, or download {where}, copy it here and pass --pretrained /path/to/that/file."
    )


def load_clip(
    model: str,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    cache_dir: str | None = None,
    seed: int = 0,
) -> LoadedClip:
    """An open_clip model, its eval preprocessing and its tokenizer (module docstring). Random
    weights (`pretrained` None) are drawn from `seed`, so every process and every resumption of an
    embedding run gets the same model. `wordllama` is the text-only stand-in (`load_wordllama`)."""
    import open_clip

    if model == "wordllama":
        return load_wordllama(pretrained or WORDLLAMA_CONFIG, device)
    name = _resolve_model_name(model)
    if pretrained in ("", "none", "None"):
        pretrained = None
    if pretrained is not None and not Path(pretrained).exists():
        if any(sep in pretrained for sep in ("/", os.sep)) or Path(pretrained).suffix:
            raise ClipLoadError(f"--pretrained {pretrained}: no such checkpoint file")
        _check_tag_available(name, pretrained, cache_dir)
    try:
        with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
            torch.manual_seed(seed)
            clip, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, device=device, cache_dir=cache_dir)
    except (RuntimeError, OSError, KeyError, ValueError) as e:
        raise ClipLoadError(f"could not build {name} with pretrained={pretrained!r}: {e}") from e
    clip.eval()
    tokenizer = open_clip.get_tokenizer(name, cache_dir=cache_dir)
    config = open_clip.get_model_config(name) or {}
    return LoadedClip(clip, preprocess, tokenizer, name, pretrained, config, torch.device(device),
                      seed if pretrained is None else None)


# --------------------------------------------------------------------------------------------
# A text encoder whose weights install from PyPI: the stand-in for CLIP's text tower where CLIP's
# weights cannot be downloaded (the demo's real embeddings)
# --------------------------------------------------------------------------------------------

WORDLLAMA_CONFIG = "l2_supercat"


class _Texts(list):
    """What the wordllama 'tokenizer' hands on: the texts themselves (it tokenizes inside embed)."""

    def to(self, device):  # the embedding loop moves token tensors to the model's device
        return self


class _WordLlamaText(torch.nn.Module):
    """encode_text over raw strings: WordLlama's average-pooled token embeddings, not normalised."""

    def __init__(self, wl):
        super().__init__()
        self.wl = wl

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.wl.embed(list(texts), norm=False), dtype=np.float32))

    def encode_image(self, images):
        raise ClipLoadError("wordllama is a text encoder: embed --modality text")


def load_wordllama(config: str = WORDLLAMA_CONFIG, device: str | torch.device = "cpu") -> LoadedClip:
    """WordLlama (pip install wordllama), whose 256-d weights ship inside its wheel: loaded offline.
    Version 0.4 bundles its tokenizer config under `tokenizers/` but looks for it under
    `tokenizer/` or in a cache folder's `tokenizers/`, so the bundled file is copied into a cache
    folder of ours."""
    import shutil

    try:
        import wordllama
        from wordllama import WordLlama
    except ImportError as e:
        raise ClipLoadError("wordllama is not installed: `pip install wordllama` (the README's install brings it)") from e
    if config != WORDLLAMA_CONFIG:
        raise ClipLoadError(f"wordllama: only the bundled config {WORDLLAMA_CONFIG!r} loads offline, got {config!r}")
    cache = Path(os.environ.get("MSAE_CACHE", Path.home() / ".cache" / "msae_ext")) / "wordllama"
    bundled = Path(wordllama.__file__).parent / "tokenizers" / f"{config}_tokenizer_config.json"
    if bundled.is_file():
        (cache / "tokenizers").mkdir(parents=True, exist_ok=True)
        target = cache / "tokenizers" / bundled.name
        if not target.exists():  # copied under another name, then renamed: never a half-written file
            tmp = target.with_name(f".{target.name}.{os.getpid()}")
            shutil.copyfile(bundled, tmp)
            os.replace(tmp, target)
    try:
        wl = WordLlama.load(config, cache_dir=cache, disable_download=True)
    except FileNotFoundError as e:
        raise ClipLoadError(f"wordllama: its bundled files were not found ({e})") from e
    dim = int(np.asarray(wl.embed(["x"], norm=False)).shape[-1])
    return LoadedClip(_WordLlamaText(wl), None, _Texts, "wordllama", config,
                      {"embed_dim": dim, "text_cfg": {"encoder": "wordllama", "config": config}}, torch.device("cpu"))
