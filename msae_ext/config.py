"""Run configuration: one YAML file plus `--set key=value` overrides.

Every key, with its default, is a field of `TrainConfig`; unknown keys are errors. Nested keys
use dots on the command line (`--set wandb.mode=offline`). Values are parsed as YAML
(`--set k_list=[64,128,6144]`, `--set soft_cap=null`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

#: Paper learning rates (paper-recipe, Optimisation) when `lr` is not given.
DEFAULT_LR = {"relu": 5e-5, "topk": 5e-4, "batchtopk": 5e-4, "msae": 1e-4}


@dataclass
class WandbConfig:
    mode: str = "disabled"  # online | offline | disabled
    project: str = "msae"
    entity: str | None = None
    name: str | None = None
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.mode not in ("online", "offline", "disabled"):
            raise ValueError(f"wandb.mode must be online, offline or disabled, got {self.mode!r}")


#: keys that define the stream of batches and the run's schedule, shared by all SAEs of a run
SHARED_KEYS = {"train_data", "eval_data", "modality", "batch_size", "epochs", "chunk_rows", "buffer_rows",
               "device", "data_seed", "eval_every", "eval_rows", "checkpoint_every", "keep_checkpoints",
               "final_eval", "data_on_device", "dead_feature_window", "autocast", "compile"}


@dataclass
class TrainConfig:
    # architecture (section 3)
    architecture: str = "msae"  # msae | topk | batchtopk | relu
    expansion_factor: int | None = 8
    d_sae: int | None = None  # overrides expansion_factor
    k: float = 64  # TopK / BatchTopK
    k_list: list[int] | None = None  # MSAE, explicit
    k_min: int = 64  # MSAE, powers of two from here
    weighting: str = "rw"  # MSAE: rw | uw
    alphas: list[float] | None = None  # MSAE, explicit level weights
    normalize_by_alpha_sum: bool = False  # MSAE: divide by sum(alpha), as the authors' code
    nested_impl: str = "fused"  # MSAE: fused (one decode) | reference (one dense decode per level)
    recon_loss: str = "mse"  # mse | nmse (the authors' per-sample normalised MSE)
    l1_coefficient: float = 0.003  # ReLU (lambda)
    aux_loss_coefficient: float = 0.0  # TopK / BatchTopK AuxK (off in the paper)
    soft_cap: float | None = None  # appendix D
    # optimisation (paper-recipe, Optimisation)
    lr: float | None = None  # None -> DEFAULT_LR[architecture]
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
    train_data: Any = None  # path spec, see msae_ext.store
    eval_data: Any = None  # held-out split for evaluation during and after training
    modality: str = "image"  # modality of train_data; its statistics are computed on it
    chunk_rows: int = 4096
    buffer_rows: int = 1 << 20
    # run
    device: str = "cpu"
    dtype: str = "float32"
    autocast: bool = False  # bf16 autocast for the GEMMs; top-k selection and losses stay float32
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
        from .architectures import ARCHITECTURES

        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"unknown architecture {self.architecture!r}; expected one of {sorted(ARCHITECTURES)}"
            )
        if self.modality not in ("image", "text"):
            raise ValueError(f"modality must be 'image' or 'text', got {self.modality!r}")
        if self.lr_schedule not in ("constant_then_linear", "constant", "cosine"):
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}")
        if self.d_sae is None and self.expansion_factor is None:
            raise ValueError("set d_sae or expansion_factor")
        for key in ("batch_size", "epochs"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.data_on_device not in ("auto", True, False):
            raise ValueError(f"data_on_device must be auto, true or false, got {self.data_on_device!r}")
        if self.saes is not None:
            self.member_configs()  # validate early

    @property
    def stream_seed(self) -> int:
        return int(self.data_seed) if self.data_seed is not None else int(self.seed)

    def member_configs(self) -> list["TrainConfig"]:
        """The config of every SAE in `saes`: the top-level keys updated by the entry.

        Keys that define the shared stream of batches (SHARED_KEYS) may only be set at the top
        level. Each member's `data_seed` is the run's, so its config alone reproduces it as a
        separate run.
        """
        if not self.saes:
            raise ValueError("saes is empty; list at least one SAE or remove the key")
        base = self.to_dict()
        base.pop("saes")
        base["data_seed"] = self.stream_seed
        members, names = [], set()
        for i, entry in enumerate(self.saes):
            if not isinstance(entry, dict):
                raise ValueError(f"saes[{i}] must be a mapping of config keys, got {entry!r}")
            shared = sorted(set(entry) & SHARED_KEYS)
            if shared:
                raise ValueError(f"saes[{i}] sets {shared}, which all SAEs of one run share; set them at the top level")
            if "saes" in entry:
                raise ValueError(f"saes[{i}] cannot itself list saes")
            d = {**base, **entry}
            if isinstance(entry.get("wandb"), dict):
                d["wandb"] = {**base["wandb"], **entry["wandb"]}
            name = str(entry.get("name") or f"{i:02d}_{d['architecture']}")
            if not name.replace("-", "").replace("_", "").replace(".", "").isalnum() or name.startswith("."):
                raise ValueError(f"saes[{i}]: name {name!r} must be a plain folder name (letters, digits, - _ .)")
            if name in names:
                raise ValueError(f"saes[{i}]: name {name!r} is used twice")
            names.add(name)
            d["name"] = name
            members.append(TrainConfig.from_dict(d))
        return members

    @property
    def learning_rate(self) -> float:
        return float(self.lr) if self.lr is not None else DEFAULT_LR[self.architecture]

    def resolve_d_sae(self, d_in: int) -> int:
        return int(self.d_sae) if self.d_sae is not None else int(self.expansion_factor) * d_in

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown}; valid keys are {sorted(known)}")
        return cls(**d)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ValueError(f"--set expects key=value, got {text!r}")
    key, _, raw = text.partition("=")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


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


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """A TrainConfig from a YAML file (or defaults when path is None) and key=value overrides."""
    d: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"{path}: a config must be a YAML mapping")
        d = loaded or {}
    return TrainConfig.from_dict(apply_overrides(d, overrides or []))
