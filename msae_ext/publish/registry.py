"""The release registry, registered with sae-lens on `import msae_ext`.

hf_hub/pretrained_saes.yaml (shipped inside the package as publish/pretrained_saes.yaml) uses
sae-lens's own schema. Registering adds each release to sae-lens's release directory (a cached
dict, extended in place) and two named loaders:

    msae_authors  the paper's authors' .pth files (WolodjaZ/MSAE) through the authors' converter
    msae_ext      sae-lens's own loader, for this project's releases, whose files `msae publish` writes

so `sae_lens.SAE.from_pretrained("msae-clip-vitl14-rw", "image_x8")` resolves like any sae-lens
release, and `msae_ext.SAE.from_pretrained("msae-clip-vitl14-rw")` also picks the release's
default. A file that is neither in the local Hugging Face cache nor reachable is a
ReleaseUnavailableError naming the release and the file; a release of this project that is not
on the Hub yet names the `msae run` / `msae publish` commands that would create it.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from sae_lens import SAE as _SaeLensSAE

REGISTRY_FILE = "pretrained_saes.yaml"


class ReleaseUnavailableError(ValueError):
    pass


@cache
def load_registry() -> dict[str, dict[str, Any]]:
    text = (resources.files("msae_ext.publish") / REGISTRY_FILE).read_text()
    data = yaml.safe_load(text)
    for release, value in data.items():
        for key in ("repo_id", "model", "saes", "source"):
            if key not in value:
                raise KeyError(f"{REGISTRY_FILE}: release {release!r} has no {key!r}")
        ids = [s["id"] for s in value["saes"]]
        if value.get("default_sae") not in ids:
            raise KeyError(f"{REGISTRY_FILE}: release {release!r}: default_sae {value.get('default_sae')!r} "
                           f"is not one of its ids {ids}")
    return data


def sae_entry(release: str, sae_id: str) -> dict[str, Any]:
    registry = load_registry()
    if release not in registry:
        raise ValueError(f"{release!r} is not an msae_ext release ({', '.join(registry)})")
    for entry in registry[release]["saes"]:
        if entry["id"] == sae_id:
            return entry
    raise ValueError(f"{release} has no SAE {sae_id!r}; its ids are {[s['id'] for s in registry[release]['saes']]}")


def _find(repo_id: str, path: str) -> tuple[str, str]:
    """(release, sae id) of a registry entry, from what sae-lens hands a loader."""
    for release, value in load_registry().items():
        for entry in value["saes"]:  # an SAE's weights, its concept matrix, or the release's vocabulary
            if value["repo_id"] == repo_id and path in (str(entry["path"]), entry.get("concepts"), value.get("vocabulary")):
                return release, entry["id"]
    return repo_id, path


def _unavailable(repo_id: str, path: str, error: Exception) -> ReleaseUnavailableError:
    """The one sentence a user gets when a release's file cannot be had."""
    release, sae_id = _find(repo_id, path)
    value = load_registry().get(release, {})
    if value.get("source") == "recipes":
        entry = sae_entry(release, sae_id)
        run = f"runs/{Path(entry['recipe']).stem}"
        modality = " --modality text" if sae_id.startswith("text") else ""
        return ReleaseUnavailableError(
            f"{release} / {sae_id} is not on the Hugging Face Hub yet ({repo_id} has not been published): create it "
            f"with `msae run {entry['recipe']} --out {run}` then `msae publish --sae {run}/{entry['run']} --repo "
            f"{repo_id} --sae-id {sae_id}{modality}`.")
    return ReleaseUnavailableError(
        f"{release} / {sae_id}: the file {path} of {repo_id} is neither in the local Hugging Face cache nor "
        f"reachable ({type(error).__name__}); run once with network access (HF_HUB_OFFLINE unset) to download it.")


def _hub_errors() -> tuple[type[Exception], ...]:
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    return LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError, EntryNotFoundError


def download(repo_id: str, path: str, force_download: bool = False) -> str:
    """A release file, from the Hugging Face cache or downloaded into it once (with a progress bar)."""
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id=repo_id, filename=path, force_download=force_download)
    except _hub_errors() as e:
        raise _unavailable(repo_id, path, e) from e


def authors_huggingface_loader(repo_id: str, folder_name: str, device: str = "cpu", force_download: bool = False,
                               cfg_overrides: dict[str, Any] | None = None):
    """sae-lens loader 'msae_authors': `folder_name` is the .pth file's path in the Hub repo."""
    from .authors import convert_authors_checkpoint

    cfg, weights = convert_authors_checkpoint(download(repo_id, folder_name, force_download))
    cfg.update({k: v for k, v in (cfg_overrides or {}).items() if k in ("device", "dtype")})
    return cfg, {k: v.to(device) for k, v in weights.items()}, None


def authors_config_getter(repo_id: str, folder_name: str, device: str = "cpu", force_download: bool = False,
                          cfg_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    return authors_huggingface_loader(repo_id, folder_name, device, force_download, cfg_overrides)[0]


def msae_ext_huggingface_loader(repo_id: str, folder_name: str, device: str = "cpu", force_download: bool = False,
                                cfg_overrides: dict[str, Any] | None = None):
    """sae-lens loader 'msae_ext': sae-lens's own, with the release's sentence instead of a 404."""
    from sae_lens.loading.pretrained_sae_loaders import sae_lens_huggingface_loader

    try:
        return sae_lens_huggingface_loader(repo_id, folder_name, device, force_download, cfg_overrides)
    except _hub_errors() as e:
        raise _unavailable(repo_id, folder_name, e) from e


def msae_ext_config_getter(repo_id: str, folder_name: str, device: str = "cpu", force_download: bool = False,
                           cfg_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    from sae_lens.loading.pretrained_sae_loaders import get_sae_lens_config_from_hf

    try:
        return get_sae_lens_config_from_hf(repo_id, folder_name, device, force_download, cfg_overrides)
    except _hub_errors() as e:
        raise _unavailable(repo_id, folder_name, e) from e


def register_releases() -> None:
    """Add the releases and the two loaders to sae-lens (idempotent)."""
    from sae_lens.loading.pretrained_sae_loaders import (
        NAMED_PRETRAINED_SAE_CONFIG_GETTERS,
        NAMED_PRETRAINED_SAE_LOADERS,
    )
    from sae_lens.loading.pretrained_saes_directory import PretrainedSAELookup, get_pretrained_saes_directory

    NAMED_PRETRAINED_SAE_LOADERS.setdefault("msae_authors", authors_huggingface_loader)
    NAMED_PRETRAINED_SAE_CONFIG_GETTERS.setdefault("msae_authors", authors_config_getter)
    NAMED_PRETRAINED_SAE_LOADERS.setdefault("msae_ext", msae_ext_huggingface_loader)
    NAMED_PRETRAINED_SAE_CONFIG_GETTERS.setdefault("msae_ext", msae_ext_config_getter)
    directory = get_pretrained_saes_directory()  # cached: the dict every lookup sees
    for release, value in load_registry().items():
        if release in directory:
            continue
        saes = {s["id"]: str(s["path"]) for s in value["saes"]}
        directory[release] = PretrainedSAELookup(
            release=release, repo_id=value["repo_id"], model=value["model"],
            conversion_func=value.get("conversion_func"), saes_map=saes,
            expected_var_explained={i: s.get("variance_explained", 1.0) for i, s in zip(saes, value["saes"])},
            expected_l0={i: s.get("l0", 0.0) for i, s in zip(saes, value["saes"])},
            neuronpedia_id={}, norm_scaling_factor={}, config_overrides=value.get("config_overrides"),
        )


def default_sae_id(release: str) -> str:
    registry = load_registry()
    if release not in registry:
        raise ValueError(f"{release!r} is not an msae_ext release ({', '.join(registry)}); give sae_id explicitly")
    return registry[release]["default_sae"]


class SAE(_SaeLensSAE):  # type: ignore[misc]
    """sae-lens's SAE, with `from_pretrained(release)` defaulting to the release's default SAE."""

    @classmethod
    def from_pretrained(cls, release: str, sae_id: str | None = None, device: str = "cpu",  # type: ignore[override]
                        dtype: str = "float32", **kwargs: Any):
        register_releases()
        sae_id = sae_id or default_sae_id(release)
        return _SaeLensSAE.from_pretrained(release, sae_id, device=device, dtype=dtype, **kwargs)


def split_spec(spec: str) -> tuple[str, str] | None:
    """'RELEASE' or 'RELEASE:SAE_ID' of the registry as (release, sae id); None otherwise."""
    release, _, sae_id = str(spec).partition(":")
    registry = load_registry()
    if release not in registry:
        return None
    return release, sae_id or registry[release]["default_sae"]


def release_concepts(release: str, sae_id: str, *, threshold: float = 0.42, ratio: float = 2.0, top: int = 5,
                     progress: bool = True) -> dict[str, Any] | None:
    """The concepts.json body of a released SAE, computed from the concept matrix published with it
    (None when the release publishes none)."""
    from ..interpret.concepts import concepts_from_matrix
    from .authors import read_concept_matrix

    value, entry = load_registry()[release], sae_entry(release, sae_id)
    if "concepts" not in entry:
        return None
    matrix_path = download(value["repo_id"], entry["concepts"])
    vocab_path = download(value["repo_id"], value["vocabulary"])
    matrix, words = read_concept_matrix(matrix_path, vocab_path)
    doc = concepts_from_matrix(matrix, words, threshold=threshold, ratio=ratio, top=top,
                               source=f"{value['repo_id']}/{entry['concepts']}", progress=progress)
    doc["sae"] = f"{release}:{sae_id}"
    doc["vocabulary"] = f"{value['repo_id']}/{value['vocabulary']}"
    return doc


def open_sae(spec: str | Path, device: str = "cpu", concepts: bool = False):
    """(SAE, concepts.json body or None) for an SAE folder or a registry release ('RELEASE' or
    'RELEASE:SAE_ID'); the release's concepts are read only when `concepts` is true."""
    from ..loading import load_sae

    if Path(spec).is_dir():
        return load_sae(spec, device=device), None
    parsed = split_spec(str(spec))
    if parsed is None:
        raise FileNotFoundError(f"{spec}: neither an SAE folder nor a release of the registry "
                                f"({', '.join(load_registry())})")
    release, sae_id = parsed
    sae = SAE.from_pretrained(release, sae_id, device=device)
    return sae, release_concepts(release, sae_id) if concepts else None


register_releases()
