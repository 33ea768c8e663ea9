"""Run configuration: one YAML file plus `--set key=value` overrides.

A run config is the runner's keys (the fields of `TrainConfig`: data, optimisation, schedule,
checkpoints, logging) and the options of its architecture (the fields of that architecture's
training config: `k` for TopK, `k_list` / `weighting` for MSAE, `l1_coefficient` for ReLU, and
`soft_cap` / `recon_loss` for all; `msae_ext.architectures`), side by side in one flat mapping.
Unknown keys are errors that list the valid ones. Nested keys use dots on the command line
(`--set wandb.mode=offline`); values are parsed as YAML (`--set k_list=[64,128,6144]`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .architectures import ARCHITECTURES, architecture


class ConfigError(ValueError):
    """A run config that cannot describe a run: unknown keys, bad values."""


@dataclass
class WandbConfig:
    mode: str = "disabled"  # online | offline | disabled
    project: str = "msae"
    entity: str | None = None
    name: str | None = None
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.mode not in ("online", "offline", "disabled"):
            raise ConfigError(f"wandb.mode must be online, offline or disabled, got {self.mode!r}")


#: keys that define the stream of batches and the run's schedule, shared by all SAEs of a run
SHARED_KEYS = {"train_data", "eval_data", "modality", "batch_size", "epochs", "chunk_rows", "buffer_rows",
               "device", "data_seed", "eval_every", "eval_rows", "checkpoint_every", "keep_checkpoints",
               "final_eval", "data_on_device", "dead_feature_window", "autocast", "compile"}


@dataclass
class TrainConfig:
    architecture: str = "msae"  # msae | topk | batchtopk | relu
    options: dict[str, Any] = field(default_factory=dict)  # the architecture's own keys (module docstring)
    expansion_factor: int | None = 8
    d_sae: int | None = None  # overrides expansion_factor
    # optimisation (paper-recipe, Optimisation)
    lr: float | None = None  # None -> the architecture's paper learning rate
    lr_schedule: str = "constant_then_linear"  # constant_then_linear | constant | cosine
    lr_decay_start: float = 0.8  # fraction of training before the linear decay to 0
    weight_decay: float = 0.01  # torch AdamW's default
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip_norm: float = 1.0
    batch_size: int = 4096
    epochs: int = 30
    seed: int = 42  # initialisation (and the data order unless data_seed is set)
    data_seed: int | None = None  # order of the batches; None -> seed
    # data
    train_data: Any = None  # an embedding spec (msae_ext.store), or {clip: {...}} (msae_ext.embed.stream)
    eval_data: Any = None  # held-out split for evaluation during and after training
    modality: str = "image"  # modality of train_data; its statistics are computed on it
    chunk_rows: int = 4096
    buffer_rows: int = 1 << 20
    # run
    device: str = "cpu"
    dtype: str = "float32"
    autocast: bool = False  # bf16 autocast for the GEMMs; the top-k selection and the losses stay float32
    compile: bool = False  # torch.compile the training forward pass
    data_on_device: Any = "auto"  # keep the whole training set on the GPU: auto (if it fits) | true | false
    eval_every: int = 500  # steps; 0 = only at the end
    eval_rows: int = 10000
    checkpoint_every: int = 500  # steps; also at the end of every epoch
    keep_checkpoints: int = 2
    dead_feature_window: int = 1000  # steps without firing before a latent counts as dead
    final_eval: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # several SAEs on one data pass: a list of per-SAE overrides of the keys above (see member_configs)
    saes: list[dict[str, Any]] | None = None
    name: str | None = None  # this SAE's folder inside a multi-SAE run

    def __post_init__(self) -> None:
        if isinstance(self.wandb, dict):
            self.wandb = WandbConfig(**self.wandb)
        arch = architecture(self.architecture)
        valid = arch.options()
        unknown = sorted(set(self.options) - set(valid))
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}: not run keys ({sorted(runner_keys())}) nor "
                              f"options of architecture {self.architecture!r} ({sorted(valid)})")
        if self.modality not in ("image", "text"):
            raise ConfigError(f"modality must be 'image' or 'text', got {self.modality!r}")
        if self.lr_schedule not in ("constant_then_linear", "constant", "cosine"):
            raise ConfigError(f"unknown lr_schedule {self.lr_schedule!r}; expected constant_then_linear, constant or cosine")
        if self.d_sae is None and self.expansion_factor is None:
            raise ConfigError("set d_sae or expansion_factor")
        for key in ("d_sae", "expansion_factor"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"{key} must be a positive integer, got {value!r}")
        for key in ("batch_size", "epochs", "eval_rows", "chunk_rows", "buffer_rows", "keep_checkpoints"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.lr is not None and not float(self.lr) > 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if self.dtype not in ("float32", "float64", "bfloat16"):
            raise ConfigError(f"dtype must be float32, float64 or bfloat16, got {self.dtype!r}" + (
                "; for half-precision GEMMs keep dtype: float32 and set autocast: true" if self.dtype == "float16" else ""))
        if self.data_on_device not in ("auto", True, False):
            raise ConfigError(f"data_on_device must be auto, true or false, got {self.data_on_device!r}")
        if self.saes is not None:
            self.member_configs()  # validate early

    @property
    def stream_seed(self) -> int:
        return int(self.data_seed) if self.data_seed is not None else int(self.seed)

    @property
    def learning_rate(self) -> float:
        return float(self.lr) if self.lr is not None else architecture(self.architecture).lr

    def resolve_d_sae(self, d_in: int) -> int:
        return int(self.d_sae) if self.d_sae is not None else int(self.expansion_factor) * d_in  # type: ignore[arg-type]

    def member_configs(self) -> list["TrainConfig"]:
        """The config of every SAE in `saes`: the top-level keys updated by the entry.

        Keys that define the shared stream of batches (SHARED_KEYS) may only be set at the top
        level. Each member's `data_seed` is the run's, so its config alone reproduces it as a
        separate run.
        """
        if not self.saes:
            raise ConfigError("saes is empty; list at least one SAE or remove the key")
        base = self.to_dict()
        base.pop("saes")
        base["data_seed"] = self.stream_seed
        members, names = [], set()
        for i, entry in enumerate(self.saes):
            if not isinstance(entry, dict):
                raise ConfigError(f"saes[{i}] must be a mapping of config keys, got {entry!r}")
            shared = sorted(set(entry) & SHARED_KEYS)
            if shared:
                raise ConfigError(f"saes[{i}] sets {shared}, which all SAEs of one run share; set them at the top level")
            if "saes" in entry:
                raise ConfigError(f"saes[{i}] cannot itself list saes")
            d = {**base, **entry}
            if isinstance(entry.get("wandb"), dict):
                d["wandb"] = {**base["wandb"], **entry["wandb"]}
            name = str(entry.get("name") or f"{i:02d}_{d['architecture']}")
            if not name.replace("-", "").replace("_", "").replace(".", "").isalnum() or name.startswith("."):
                raise ConfigError(f"saes[{i}]: name {name!r} must be a plain folder name (letters, digits, - _ .)")
            if name in names:
                raise ConfigError(f"saes[{i}]: name {name!r} is used twice")
            names.add(name)
            d["name"] = name
            try:
                members.append(TrainConfig.from_dict(d))
            except ConfigError as e:
                raise ConfigError(f"saes[{i}] ({name}): {e}") from None
        return members

    def to_dict(self) -> dict[str, Any]:
        """The flat mapping a YAML file holds: run keys and the architecture's options side by side."""
        d = asdict(self)
        options = d.pop("options")
        return {"architecture": d.pop("architecture"), **options, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        d = dict(d)
        if "options" in d:
            raise ConfigError("write the architecture's options as keys of their own, not under `options:`")
        run = {k: d.pop(k) for k in list(d) if k in runner_keys()}
        return cls(**run, options=d)


def runner_keys() -> set[str]:
    """The run keys of a config (the architecture's options are the others)."""
    return {f.name for f in fields(TrainConfig)} - {"options"}


def all_option_keys() -> set[str]:
    """Every architecture's options: the keys a sweep may vary besides the run keys."""
    return set().union(*(set(a.options()) for a in ARCHITECTURES.values()))


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, _, raw = text.partition("=")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML: {e}") from None
    return key.strip().split("."), value


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    d = dict(d)
    for text in overrides:
        path, value = parse_override(text)
        target = d
        for part in path[:-1]:
            target[part] = dict(target.get(part) or {})
            target = target[part]
        target[path[-1]] = value
    return d


def read_yaml_mapping(path: str | Path, what: str = "config", error: type[ValueError] = ConfigError) -> dict[str, Any]:
    """A YAML file that holds a mapping (an empty file is an empty one), or `error` saying why not."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such {what} file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML: {e}") from None
    if data is not None and not isinstance(data, dict):
        raise error(f"{path}: a {what} must be a YAML mapping")
    return data or {}


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """A TrainConfig from a YAML file (or defaults when path is None) and key=value overrides."""
    d = read_yaml_mapping(path) if path is not None else {}
    try:
        return TrainConfig.from_dict(apply_overrides(d, overrides or []))
    except TypeError as e:  # a value of the wrong shape for a dataclass field
        raise ConfigError(f"{path or 'config'}: {e}") from None
