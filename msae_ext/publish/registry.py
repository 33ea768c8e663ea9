"""This package's Hub releases, registered with sae-lens on `import msae_ext`.

hf_hub/pretrained_saes.yaml (shipped inside the package as publish/pretrained_saes.yaml) uses
sae-lens's own schema. Registering adds each release to sae-lens's release directory (a cached
dict, extended in place) and adds the authors'-checkpoint converter to its named loaders, so
`sae_lens.SAE.from_pretrained("msae-clip-vitl14-rw", "image_x8")` resolves like any sae-lens
release; `msae_ext.SAE.from_pretrained("msae-clip-vitl14-rw")` also picks the release's default.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
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
        for key in ("repo_id", "model", "saes"):
            if key not in value:
                raise KeyError(f"{REGISTRY_FILE}: release {release!r} has no {key!r}")
        ids = [s["id"] for s in value["saes"]]
        if value.get("default_sae") not in ids:
            raise KeyError(f"{REGISTRY_FILE}: release {release!r}: default_sae {value.get('default_sae')!r} "
                           f"is not one of its ids {ids}")
    return data


def register_releases() -> None:
    """Add the releases and the 'msae_authors' loader to sae-lens (idempotent)."""
    from sae_lens.loading.pretrained_sae_loaders import (
        NAMED_PRETRAINED_SAE_CONFIG_GETTERS,
        NAMED_PRETRAINED_SAE_LOADERS,
    )
    from sae_lens.loading.pretrained_saes_directory import PretrainedSAELookup, get_pretrained_saes_directory

    from .authors import authors_config_getter, authors_huggingface_loader

    NAMED_PRETRAINED_SAE_LOADERS.setdefault("msae_authors", authors_huggingface_loader)
    NAMED_PRETRAINED_SAE_CONFIG_GETTERS.setdefault("msae_authors", authors_config_getter)
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
        from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError

        register_releases()
        sae_id = sae_id or default_sae_id(release)
        try:
            return _SaeLensSAE.from_pretrained(release, sae_id, device=device, dtype=dtype, **kwargs)
        except (LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError) as e:
            registry = load_registry()
            repo = registry[release]["repo_id"] if release in registry else release
            raise ReleaseUnavailableError(
                f"{release} / {sae_id}: the files are neither in the local Hugging Face cache nor reachable "
                f"({type(e).__name__}). Loading needs the network once (or HF_HUB_OFFLINE unset), and the repo "
                f"{repo} must have been filled by `msae publish`."
            ) from e


register_releases()
