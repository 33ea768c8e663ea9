"""msae_ext: hierarchical (Matryoshka) sparse autoencoders for CLIP, as a sae-lens extension.

`import msae_ext` is light: the names below load on first use. Its architectures (msae,
msae_relu, msae_topk, msae_batchtopk, msae_jumprelu) and its Hub releases are registered with sae-lens as soon
as sae-lens is imported (at once, if it already is), so `sae_lens.SAE.load_from_disk` and
`SAE.from_pretrained` load what this package saves, in either import order.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS = {
    "SAE": "publish", "load_authors_sae": "publish", "open_sae": "publish", "register_releases": "publish",
    "release_concepts": "publish",
    "MSAEConfig": "architectures", "MSAETrainingSAE": "architectures", "MSAETrainingSAEConfig": "architectures",
    "PaperSAE": "architectures", "register_all": "architectures", "resolve_alphas": "architectures",
    "resolve_k_list": "architectures",
    "embed_dataset": "embed", "load_clip": "embed", "load_embeddings": "embed",
    "BatchStream": "store", "EmbeddingDataError": "store", "open_embeddings": "store",
    "ModalityStats": "normalization", "attach_stats": "normalization", "compute_stats": "normalization",
    "get_stats": "normalization",
    "load_labels": "loading", "load_sae": "loading",
    "TrainConfig": "config", "load_config": "config",
    "train": "train", "train_many": "train",
    "evaluate_sae": "evaluate",
    "train_and_evaluate": "recipes", "run_recipe": "recipes",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'msae_ext' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


def _register_with_sae_lens() -> None:
    for module, register in (("msae_ext.architectures", "register_all"),
                             ("msae_ext.publish.registry", "register_releases")):
        if module in sys.modules and not hasattr(sys.modules[module], register):
            continue  # being imported right now: it registers itself as its import ends
        getattr(importlib.import_module(module), register)()


class _RegisterAfterSaeLens(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when sae_lens is first imported, it lets the usual finders find it and
    registers this package once sae_lens has run (Python has no post-import hook of its own)."""

    def find_spec(self, name, path=None, target=None):
        if name != "sae_lens":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module) -> None:
            exec_module(module)
            try:
                _register_with_sae_lens()
            except Exception as e:  # never break the user's import of sae_lens
                warnings.warn(f"msae_ext could not register its architectures with sae-lens: {e}", stacklevel=2)

        spec.loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


if "sae_lens" in sys.modules:
    _register_with_sae_lens()
elif not any(isinstance(f, _RegisterAfterSaeLens) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterSaeLens())
