"""Training runner on sae-lens's `SAETrainer`, with the paper's optimisation step.

`PaperTrainer` subclasses sae-lens's trainer where the paper differs from it:
  * AdamW (betas 0.9, 0.999) instead of Adam, as torch's fused kernel where it runs;
  * before each step, the gradient component parallel to each decoder row is removed, then the
    gradient norm is clipped (to 1); after the step, decoder rows are renormalised to unit norm;
  * schedules: constant-then-linear-decay (the authors': constant for 80% of training, then
    linear to 0), constant, cosine.

`train(cfg, out_dir)` runs epochs over a finite embedding store with held-out evaluation during
training, wandb logging (online / offline / disabled), a progress bar, dead-latent counts, atomic
checkpoints and resumption: a killed run restarted with the same command continues from its last
checkpoint and ends with the same weights as an uninterrupted run. `evaluator`, when given, makes
the final held-out report of each SAE (`msae_ext.recipes.train_and_evaluate` passes the one of
`msae_ext.evaluate`); it is written to eval.json and to the wandb run's summary.

Output folder (`--out DIR`), loadable as it is with `SAE.load_from_disk(DIR)`:
    cfg.json, sae_weights.safetensors, sparsity.safetensors   inference SAE (sae-lens format)
    normalization.json                                        the training split's statistics
    train_config.yaml                                         the resolved run config
    training_log.jsonl                                        held-out evals and epoch summaries
    eval.json                                                 final held-out report (with an evaluator)
    checkpoints/step_XXXXXXXXX/ + checkpoints/latest          resumable training state
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml
from safetensors.torch import save_file
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.saes.sae import TrainStepInput
from sae_lens.training.sae_trainer import SAETrainer

from .architectures import PaperTrainingSAE, architecture
from .config import TrainConfig
from .distributed import DistEnv, StepModule, all_reduce_, init_distributed
from .fileio import exclusive, fsync_dir, write_text_atomic
from .metrics import cosine_similarity, fvu, l0_active, l0_sparsity
from .normalization import METADATA_KEY, ModalityStats, compute_stats, stats_to_metadata
from .store import BatchStream, ResidentBatches, check_dimension, check_finite, fits_on_device, open_embeddings, read_all

CHECKPOINTS = "checkpoints"
LATEST = "latest"
FINAL_FILES = ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors")

#: makes a trained SAE's final held-out report: evaluator(sae_dir) -> report
Evaluator = Callable[[Path], dict[str, Any]]


# --------------------------------------------------------------------------------------------
# The paper's step
# --------------------------------------------------------------------------------------------


def lr_lambda(schedule: str, total_steps: int, decay_start: float = 0.8) -> Callable[[int], float]:
    """Multiplier of the base learning rate at a step."""
    total = max(1, total_steps)
    if schedule == "constant":
        return lambda step: 1.0
    if schedule == "cosine":
        return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    if schedule == "constant_then_linear":
        start = int(decay_start * total)
        span = max(1, total - start)
        return lambda step: 1.0 if step < start else max(0.0, (total - step) / span)
    raise ValueError(f"unknown lr schedule {schedule!r}")


@torch.no_grad()
def remove_parallel_decoder_grad(W_dec: torch.Tensor) -> None:
    """Project out of each decoder row's gradient its component along that row."""
    if W_dec.grad is None:
        return
    unit = W_dec / W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    W_dec.grad -= (W_dec.grad * unit).sum(dim=-1, keepdim=True) * unit


@torch.no_grad()
def renormalize_decoder(W_dec: torch.Tensor) -> None:
    W_dec.div_(W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))


def paper_optimizer(params, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                    weight_decay: float = 0.01) -> torch.optim.AdamW:
    """AdamW, as torch's fused kernel where every parameter is a float CPU or CUDA tensor (one pass
    over each parameter; the same update within float rounding), torch's default elsewhere."""
    params = list(params)
    fused = bool(params) and all(
        p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params
    )
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused or None)


class PaperTrainer(SAETrainer):
    """sae-lens's trainer with the paper's optimiser, schedule and decoder constraint.

    sae-lens has no hook between a step's backward and its optimiser step, where the decoder
    constraint goes, so `_train_step` is overridden; tests/test_train.py pins what it relies on
    (`SAETrainer.step` hands it the batch and returns its output)."""

    def __init__(self, cfg: SAETrainerConfig, sae: PaperTrainingSAE, *, weight_decay: float, lr_schedule: str,
                 lr_decay_start: float, grad_clip_norm: float = 1.0, step_module: torch.nn.Module | None = None,
                 world: int = 1):
        super().__init__(cfg, sae, data_provider=iter(()))
        self.grad_clip_norm = grad_clip_norm
        # the forward the step runs: the SAE itself, or a compiled or DistributedDataParallel wrapper of it
        self.step_module = step_module
        self.world = world
        self.last_did_fire: torch.Tensor | None = None
        self.optimizer = paper_optimizer(
            sae.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=weight_decay
        )
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(lr_schedule, cfg.total_training_steps, lr_decay_start)
        )

    def step(self, batch: torch.Tensor):  # type: ignore[override]
        """One step on this process's rows; under torchrun the sample count is the global batch's."""
        out = super().step(batch)
        self.n_training_samples += (self.world - 1) * batch.shape[0]
        return out

    def _train_step(self, sae, sae_in):  # type: ignore[override]
        sae.train()
        step_input = TrainStepInput(sae_in=sae_in, dead_neuron_mask=self.dead_neurons,
                                    coefficients=self.get_coefficients(), n_training_steps=self.n_training_steps,
                                    is_logging_step=False)
        with self.autocast_if_enabled:
            out = (self.step_module or sae.training_forward_pass)(step_input)
        with torch.no_grad():
            fired_count = (out.feature_acts > 0).sum(0, dtype=torch.int32)  # int32: no (batch, d_sae) int64 copy
            if self.world > 1:  # firing statistics of the global batch
                all_reduce_(fired_count, "sum")
            did_fire = fired_count > 0
            self.last_did_fire = did_fire
            self.n_forward_passes_since_fired += 1
            self.n_forward_passes_since_fired[did_fire] = 0
            self.act_freq_scores += fired_count.to(self.act_freq_scores.dtype)
            self.n_frac_active_samples += self.cfg.train_batch_size_samples
        out.loss.backward()
        remove_parallel_decoder_grad(sae.W_dec)
        torch.nn.utils.clip_grad_norm_(sae.parameters(), self.grad_clip_norm)
        self.optimizer.step()
        renormalize_decoder(sae.W_dec.data)
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        return out


def build_training_sae(cfg: TrainConfig, d_in: int) -> PaperTrainingSAE:
    """The training SAE a config describes, initialised as in the paper (seeded by the caller)."""
    arch = architecture(cfg.architecture)
    sae_cfg = arch.training_config(d_in=d_in, d_sae=cfg.resolve_d_sae(d_in), dtype=cfg.dtype, device=cfg.device,
                                   **cfg.options)
    return arch.training_sae(sae_cfg)


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


@dataclass
class RunState:
    epoch: int = 0  # epoch in progress
    batch_in_epoch: int = 0  # batches of that epoch already trained on
    step: int = 0
    dead_last_epoch: int | None = None  # latents that never fired in the last finished epoch
    elapsed_s: float = 0.0  # seconds of training up to this state, across resumptions


def save_checkpoint(out_dir: Path, trainer: PaperTrainer, state: RunState, keep: int, fired_epoch: torch.Tensor) -> Path:
    """Write a checkpoint into a temporary folder, then rename it into place and move `latest`.

    A crash at any point leaves the previous checkpoint and `latest` intact.
    """
    root = out_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{state.step:09d}"
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    trainer.sae.save_model(tmp)
    save_file({"sparsity": trainer.log_feature_sparsity}, tmp / "sparsity.safetensors")
    trainer.save_trainer_state(tmp)
    torch.save({"torch": torch.get_rng_state(), "fired_epoch": fired_epoch.cpu()}, tmp / "rng_state.pt")
    (tmp / "run_state.json").write_text(json.dumps(state.__dict__))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    write_text_atomic(root / LATEST, name)
    ckpts = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for old in ckpts[: max(0, len(ckpts) - keep)]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoints_newest_first(out_dir: Path) -> list[Path]:
    """The complete checkpoints of a run folder, `latest` first, then the others newest first."""
    root = out_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = sorted((p for p in root.iterdir() if p.name.startswith("step_") and (p / "run_state.json").exists()),
                   reverse=True)
    pointer = root / LATEST
    latest = root / pointer.read_text().strip() if pointer.exists() else None
    return ([latest] if latest in found else []) + [p for p in found if p != latest]


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = checkpoints_newest_first(out_dir)
    return found[0] if found else None


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read back whole (truncated, corrupt, or a pickle that
    would run code: torch.load reads tensors only)."""


@contextlib.contextmanager
def _reading(file: Path):
    try:
        yield
    except Exception as e:  # each reader raises its own kinds of error
        raise CheckpointError(f"{file}: {type(e).__name__}: {e}") from None


def load_checkpoint(path: Path, trainer: PaperTrainer, fired_epoch: torch.Tensor) -> RunState:
    with _reading(path / "run_state.json"):
        state = RunState(**json.loads((path / "run_state.json").read_text()))
    with _reading(path / "sae_weights.safetensors"):
        trainer.sae.load_weights_from_checkpoint(path)
    with _reading(path / "trainer_state.pt"):
        trainer.load_trainer_state(path)
    with _reading(path / "rng_state.pt"):
        extra = torch.load(path / "rng_state.pt", weights_only=True)
        torch.set_rng_state(extra["torch"])
        fired_epoch.copy_(extra["fired_epoch"])
    return state


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    out_dir: Path
    sae: PaperTrainingSAE
    steps: int
    resumed_from: Path | None
    eval_report: dict[str, Any] | None


class _Interrupt(Exception):
    """Raised by tests through `stop_after_steps` to simulate a killed run."""


def _progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not enabled, file=sys.stderr,
                dynamic_ncols=True)


def _init_wandb(cfg: TrainConfig, out_dir: Path, resume_id: str | None):
    if cfg.wandb.mode == "disabled":
        return None
    import wandb

    run = wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity, name=cfg.wandb.name or out_dir.name,
                     mode=cfg.wandb.mode, dir=str(out_dir), config=cfg.to_dict(), id=resume_id,
                     resume="allow" if resume_id else None)
    (out_dir / "wandb_run_id").write_text(run.id)
    return run


class _Member:
    """One SAE of a run: its folder, model, optimiser, state, checkpoints, logs and wandb run."""

    def __init__(self, cfg: TrainConfig, out_dir: Path, d_in: int, stats: ModalityStats, steps_per_epoch: int,
                 env: DistEnv, checkpoints: list[Path]):
        self.cfg, self.out_dir, self.stats, self.env = cfg, out_dir, stats, env
        out_dir.mkdir(parents=True, exist_ok=True)
        if checkpoints:
            _check_same_run(cfg, out_dir)
        torch.manual_seed(cfg.seed)
        sae = build_training_sae(cfg, d_in)
        sae.cfg.metadata[METADATA_KEY] = stats_to_metadata({cfg.modality: stats})
        sae.cfg.metadata.msae_train_config = cfg.to_dict()
        sae.cfg.metadata.modality = cfg.modality
        self.sae = sae
        step_module = None
        if env.enabled:
            from torch.nn.parallel import DistributedDataParallel

            step_module = DistributedDataParallel(StepModule(sae), device_ids=None, broadcast_buffers=False)
        elif cfg.compile:
            step_module = torch.compile(StepModule(sae))
        trainer_cfg = SAETrainerConfig(
            total_training_samples=steps_per_epoch * cfg.epochs * cfg.batch_size,
            train_batch_size_samples=cfg.batch_size, lr=cfg.learning_rate, lr_end=0.0,
            adam_beta1=float(cfg.adam_betas[0]), adam_beta2=float(cfg.adam_betas[1]), device=cfg.device,
            autocast=cfg.autocast, dead_feature_window=cfg.dead_feature_window,
            feature_sampling_window=max(1, steps_per_epoch), logger=LoggingConfig(log_to_wandb=False),
        )
        self.trainer = PaperTrainer(trainer_cfg, sae, weight_decay=cfg.weight_decay, lr_schedule=cfg.lr_schedule,
                                    lr_decay_start=cfg.lr_decay_start, grad_clip_norm=cfg.grad_clip_norm,
                                    step_module=step_module, world=env.world)
        self.state = RunState()
        self.fired_epoch = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=cfg.device)
        self.checkpoint = self._resume(checkpoints)
        self.run = None
        if env.is_main:
            (out_dir / "train_config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            resume_id = (out_dir / "wandb_run_id").read_text().strip() if (
                self.checkpoint is not None and (out_dir / "wandb_run_id").exists()) else None
            self.run = _init_wandb(cfg, out_dir, resume_id)
        self.log_path = out_dir / "training_log.jsonl"
        if env.is_main:
            _keep_log_until(self.log_path, self.state.step)
        self.clock = time.time() - self.state.elapsed_s  # elapsed time continues across resumptions

    def _resume(self, checkpoints: list[Path]) -> Path | None:
        """Load the newest checkpoint that reads back whole; a damaged one is skipped with a warning
        (loading the next one replaces everything the damaged one may have set)."""
        for path in checkpoints:
            try:
                self.state = load_checkpoint(path, self.trainer, self.fired_epoch)
                return path
            except CheckpointError as e:
                warnings.warn(f"checkpoint {path.name} cannot be read ({e}); trying an older one", stacklevel=2)
        if checkpoints:
            raise CheckpointError(f"{self.out_dir}: no checkpoint can be read ({', '.join(p.name for p in checkpoints)}); "
                               "pass --no-resume to start the run afresh")
        return None

    def train_step(self, x: torch.Tensor, eval_x: torch.Tensor | None):
        cfg, trainer, state = self.cfg, self.trainer, self.state
        out = trainer.step(self.env.shard(x))
        self.fired_epoch |= trainer.last_did_fire  # type: ignore[arg-type]
        trainer.n_training_steps += 1
        state.step += 1
        state.batch_in_epoch += 1
        trainer.maybe_reset_sparsity()
        if self.run is not None and state.step % cfg.wandb.log_every == 0:
            self.run.log(trainer.build_train_step_log_dict(out, trainer.n_training_samples), step=state.step)
        if self.env.is_main and eval_x is not None and cfg.eval_every > 0 and state.step % cfg.eval_every == 0:
            _log_eval(self.sae, eval_x, self.stats, state, trainer, self.run, self.log_path)
        return out

    def end_epoch(self, epoch: int) -> None:
        elapsed = time.time() - self.clock
        self.state.dead_last_epoch = int((~self.fired_epoch).sum())
        if self.env.is_main:
            _append_log(self.log_path, {"event": "epoch_end", "epoch": epoch, "step": self.state.step,
                                        "dead_latents_epoch": self.state.dead_last_epoch,
                                        "dead_latents_window": int(self.trainer.dead_neurons.sum()),
                                        "elapsed_s": round(elapsed, 2)})
        if self.run is not None:
            self.run.log({"sparsity/dead_latents_epoch": self.state.dead_last_epoch}, step=self.state.step)
        self.state.epoch, self.state.batch_in_epoch = epoch + 1, 0
        self.fired_epoch.zero_()

    def save(self, keep: int) -> None:
        self.state.elapsed_s = round(time.time() - self.clock, 3)
        if self.env.is_main:
            save_checkpoint(self.out_dir, self.trainer, self.state, keep, self.fired_epoch)

    def finish(self, evaluator: Evaluator | None, trained: bool) -> TrainResult:
        sae, trainer = self.sae, self.trainer
        report = None
        if self.env.is_main:
            done = self.out_dir / "eval.json"
            if not trained and all((self.out_dir / f).exists() for f in FINAL_FILES):
                # a finished run started again: its SAE folder (with any statistics attached since) stands
                report = json.loads(done.read_text()) if done.exists() else None
            else:
                trainer.set_final_sae_metadata()
                sae.cfg.metadata.dead_latents_train_last_epoch = self.state.dead_last_epoch
                sae.cfg.metadata.training_steps = self.state.step
                save_inference_sae(sae, self.out_dir, trainer)
                if evaluator is not None:
                    report = evaluator(self.out_dir)
                    report["dead_neurons_train"] = self.state.dead_last_epoch
                    write_text_atomic(done, json.dumps(report, indent=2))
                    if self.run is not None:
                        self.run.summary.update({f"eval/{k}": v for k, v in report.items()
                                                 if isinstance(v, (int, float))})
        if self.run is not None:
            self.run.finish()
        return TrainResult(self.out_dir, sae, self.state.step, self.checkpoint, report)


MULTI_STATE = "multi_state.json"


def train(cfg: TrainConfig, out_dir: str | Path, *, resume: bool = True, progress: bool = True,
          evaluator: Evaluator | None = None, stop_after_steps: int | None = None) -> TrainResult:
    """Train the one SAE `cfg` describes into `out_dir` (see module docstring)."""
    if cfg.saes:
        raise ValueError("this config lists several SAEs (`saes:`); use train_many (or `msae train`)")
    return _run([cfg], [Path(out_dir)], Path(out_dir), resume, progress, evaluator, stop_after_steps)[0]


def train_many(cfg: TrainConfig, out_dir: str | Path, *, resume: bool = True, progress: bool = True,
               evaluator: Evaluator | None = None, stop_after_steps: int | None = None) -> list[TrainResult]:
    """Train every SAE of `cfg.saes` on one shared stream of batches, each into `out_dir/<name>/`.

    Each SAE has its own optimiser, checkpoints, logs and report, and ends with the weights a
    separate run of its own config (`out_dir/<name>/train_config.yaml`) would give.
    """
    members = cfg.member_configs()
    dirs = [Path(out_dir) / str(m.name) for m in members]
    return _run(members, dirs, Path(out_dir), resume, progress, evaluator, stop_after_steps)


def check_device(device: str) -> None:
    """A clear error for a device this machine does not have."""
    kind = torch.device(device).type
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: this machine has no CUDA device torch can use; set device: cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: MPS is not available here; set device: cpu")


def retire_checkpoints(folder: Path) -> None:
    """Remove a run folder's checkpoints so that nothing can resume from them: renamed away first (one
    atomic step), then deleted. Also the temporary folders killed runs left behind."""
    root = folder / CHECKPOINTS
    if root.exists():
        away = folder / f".retired-{CHECKPOINTS}-{os.getpid()}"
        os.replace(root, away)
        fsync_dir(folder)
        shutil.rmtree(away)
    for stale in (*folder.glob(f".retired-{CHECKPOINTS}-*"), *folder.glob(".tmp-final-*")):
        shutil.rmtree(stale, ignore_errors=True)


def _run(cfgs: list[TrainConfig], dirs: list[Path], root: Path, resume: bool, progress: bool,
         evaluator: Evaluator | None, stop_after_steps: int | None) -> list[TrainResult]:
    base = cfgs[0]
    if base.train_data is None:
        raise ValueError("train_data is not set (a path to embeddings; see msae_ext.store)")
    fitted = [architecture(c.architecture).classical is not None for c in cfgs]
    if any(fitted):
        if not all(fitted):
            raise ValueError("a run cannot mix the classical baselines (fitted by scikit-learn) with trained SAEs; "
                             "give them runs of their own")
        with exclusive(root, "msae train"):
            return [_fit_classical(c, d, resume, progress, evaluator) for c, d in zip(cfgs, dirs)]
    check_device(base.device)
    env, device = init_distributed(base.device)
    # one writer per run folder (rank 0 writes for every rank)
    with exclusive(root, "msae train") if env.is_main else contextlib.nullcontext():
        return _run_held(cfgs, dirs, root, resume, progress, evaluator, stop_after_steps, env, device)


def _run_held(cfgs: list[TrainConfig], dirs: list[Path], root: Path, resume: bool, progress: bool,
              evaluator: Evaluator | None, stop_after_steps: int | None, env: DistEnv, device: str) -> list[TrainResult]:
    base = cfgs[0]
    if env.enabled:
        if base.batch_size % env.world:
            raise ValueError(f"batch_size {base.batch_size} is not divisible by the {env.world} processes")
        for c in cfgs:
            c.device = device
    # every input is checked before anything is trained
    source = open_embeddings(base.train_data)
    for c in cfgs:  # the architecture's own checks of its options (k against d_sae, the k-list, ...)
        d_sae = c.resolve_d_sae(source.d_in)
        if c.options.get("k_min") is not None and c.options["k_min"] > d_sae:  # else one level, silently
            raise ValueError(f"k_min {c.options['k_min']} is above d_sae {d_sae}: the k-list would be the full "
                             "level alone")
        architecture(c.architecture).training_config(d_in=source.d_in, d_sae=d_sae, device="meta", **c.options)
    eval_source = None
    if base.eval_data is not None:
        eval_source = open_embeddings(base.eval_data)
        check_dimension(eval_source, source.d_in)
        check_finite(eval_source)
    root.mkdir(parents=True, exist_ok=True)
    if env.is_main:  # starting afresh retires the old run's checkpoints before anything new is written
        for d in dirs if not resume else []:
            retire_checkpoints(d)
        if not resume:
            (root / MULTI_STATE).unlink(missing_ok=True)
        for d in dirs:  # what killed runs left half-written
            for stale in (d / CHECKPOINTS).glob(".tmp-step_*"):
                shutil.rmtree(stale, ignore_errors=True)
    env.barrier()

    # statistics of the training split, shared by every SAE of the run; rank 0 computes them
    stats_path = root / "normalization.json"
    multi = len(cfgs) > 1 or dirs[0] != root
    # the checkpoints each SAE may resume from, newest first; a multi-SAE run resumes at the last
    # step all of them saved
    checkpoints: list[list[Path]] = [[] for _ in dirs]
    if resume and multi and (root / MULTI_STATE).exists():
        step_dir = f"step_{json.loads((root / MULTI_STATE).read_text())['step']:09d}"
        checkpoints = [[d / CHECKPOINTS / step_dir] if (d / CHECKPOINTS / step_dir / "run_state.json").exists() else []
                       for d in dirs]
    elif resume and not multi:
        checkpoints = [checkpoints_newest_first(root)]
    resuming = any(checkpoints)
    if env.is_main and not (resuming and stats_path.exists()):
        stats = compute_stats(source)  # also rejects NaN / inf rows
        write_text_atomic(stats_path, json.dumps(stats.to_dict()))
    env.barrier()
    stats = ModalityStats.from_dict(json.loads(stats_path.read_text()))
    for d in dirs:
        if d != root and env.is_main:
            d.mkdir(parents=True, exist_ok=True)
            write_text_atomic(d / "normalization.json", json.dumps(stats.to_dict()))

    stream = BatchStream(source, base.batch_size, seed=base.stream_seed, chunk_rows=base.chunk_rows,
                         buffer_rows=base.buffer_rows)
    members = [_Member(c, d, source.d_in, stats, stream.batches_per_epoch, env, ckpts)
               for c, d, ckpts in zip(cfgs, dirs, checkpoints)]
    state = members[0].state
    if any((m.state.epoch, m.state.batch_in_epoch, m.state.step) != (state.epoch, state.batch_in_epoch, state.step)
           for m in members):
        raise CheckpointError(f"the SAEs in {root} were checkpointed at different steps; restart with --no-resume")
    batches = stream
    if base.data_on_device is True or (base.data_on_device == "auto" and fits_on_device(source, device)):
        batches = ResidentBatches(stream, device)  # type: ignore[assignment]

    eval_x = None
    if env.is_main and eval_source is not None and base.eval_every > 0:
        n = min(eval_source.n_rows, base.eval_rows)
        rows = np.sort(np.random.default_rng(base.seed).choice(eval_source.n_rows, n, replace=False))
        eval_x = torch.from_numpy(read_all(eval_source, rows))

    total_steps = stream.batches_per_epoch * base.epochs
    start_step = state.step
    desc = f"train {base.architecture}" if len(cfgs) == 1 else f"train {len(cfgs)} SAEs"
    pbar = _progress(total_steps, state.step, desc, progress and env.is_main)

    def save_all() -> None:
        keep = max(2, base.keep_checkpoints) if multi else base.keep_checkpoints
        for m in members:
            m.save(keep)
        if multi and env.is_main:
            write_text_atomic(root / MULTI_STATE, json.dumps({"step": members[0].state.step,
                                                               "saes": [d.name for d in dirs]}))
        env.barrier()

    try:
        for epoch in range(state.epoch, base.epochs):
            for batch in batches.epoch_batches(epoch, members[0].state.batch_in_epoch):
                x = stats.apply(batch.to(device))
                # only the losses are kept: a step's (batch, d_sae) outputs go before the next step
                losses = [m.train_step(x, eval_x).loss.detach() for m in members]
                step = members[0].state.step
                pbar.update(1)
                if step % 20 == 0 or step == total_steps:
                    pbar.set_postfix(loss=" ".join(f"{loss.item():.4g}" for loss in losses),
                                     dead=" ".join(str(int(m.trainer.dead_neurons.sum())) for m in members))
                if base.checkpoint_every > 0 and step % base.checkpoint_every == 0:
                    save_all()
                if stop_after_steps is not None and step >= stop_after_steps:
                    raise _Interrupt(f"stopped after {step} steps")
            for m in members:
                m.end_epoch(epoch)
            save_all()
    finally:
        pbar.close()
    trained = members[0].state.step > start_step
    final_eval = evaluator if (base.final_eval and eval_source is not None) else None
    results = [m.finish(final_eval, trained) for m in members]
    env.barrier()
    return results


def _fit_classical(cfg: TrainConfig, out_dir: Path, resume: bool, progress: bool,
                   evaluator: Evaluator | None) -> TrainResult:
    """A classical baseline (architectures/classical): fitted by scikit-learn on the run's stream
    of preprocessed batches, saved as an SAE folder, evaluated like a trained one. A finished fit
    of the same config is kept; there are no checkpoints (a killed fit starts again)."""
    from .architectures import build_sae

    method = architecture(cfg.architecture).classical
    source = open_embeddings(cfg.train_data)
    d_sae = cfg.resolve_d_sae(source.d_in)
    fit_cfg = method.training_config(d_in=source.d_in, d_sae=d_sae, device="cpu", **cfg.options)  # checks them
    if cfg.eval_data is not None:
        eval_source = open_embeddings(cfg.eval_data)
        check_dimension(eval_source, source.d_in)
        check_finite(eval_source)
    out_dir.mkdir(parents=True, exist_ok=True)
    done = out_dir / "eval.json"
    if resume and all((out_dir / f).exists() for f in ("cfg.json", "sae_weights.safetensors")):
        _check_same_run(cfg, out_dir)
        from .loading import load_sae

        report = json.loads(done.read_text()) if done.exists() else None
        return TrainResult(out_dir, load_sae(out_dir), 0, out_dir, report)
    (out_dir / "train_config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    stats = compute_stats(source)  # also rejects NaN / inf rows
    write_text_atomic(out_dir / "normalization.json", json.dumps(stats.to_dict()))
    stream = BatchStream(source, cfg.batch_size, seed=cfg.stream_seed, chunk_rows=cfg.chunk_rows,
                         buffer_rows=cfg.buffer_rows)
    pbar = _progress(stream.batches_per_epoch * cfg.epochs, 0, f"fit {cfg.architecture}", progress)

    def batches(epoch: int):
        for batch in stream.epoch_batches(epoch):
            pbar.update(1)
            yield stats.apply(batch).double().numpy()

    def sample(n: int) -> np.ndarray:
        rows = np.sort(np.random.default_rng(cfg.seed).choice(source.n_rows, min(n, source.n_rows), replace=False))
        return stats.apply(torch.from_numpy(read_all(source, rows))).double().numpy()

    start = time.time()
    try:
        weights = method.fit(fit_cfg, batches, sample, cfg.epochs, cfg.seed)
    finally:
        pbar.close()
    sae = build_sae(method, fit_cfg, weights)
    sae.cfg.metadata[METADATA_KEY] = stats_to_metadata({cfg.modality: stats})
    sae.cfg.metadata.msae_train_config = cfg.to_dict()
    sae.cfg.metadata.modality = cfg.modality
    sae.cfg.metadata.fit_seconds = round(time.time() - start, 3)
    save_inference_sae(sae, out_dir)
    report = None
    if evaluator is not None and cfg.final_eval and cfg.eval_data is not None:
        report = evaluator(out_dir)
        write_text_atomic(done, json.dumps(report, indent=2))
    return TrainResult(out_dir, sae, stream.batches_per_epoch * cfg.epochs, None, report)


#: keys that may change between a killed run and its resumption
RESUMABLE_CHANGES = {"wandb", "eval_every", "eval_rows", "checkpoint_every", "keep_checkpoints", "final_eval",
                     "device", "data_on_device", "compile", "autocast"}


def _check_same_run(cfg: TrainConfig, out_dir: Path) -> None:
    saved_path = out_dir / "train_config.yaml"
    if not saved_path.exists():
        return
    saved = yaml.safe_load(saved_path.read_text()) or {}
    current = cfg.to_dict()
    changed = sorted(k for k in set(saved) | set(current)
                     if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k))
    if changed:
        raise ValueError(
            f"{out_dir} holds checkpoints of a run with a different config (changed: {changed}); "
            "pass --no-resume to start over there, or choose another --out"
        )


def save_inference_sae(sae: PaperTrainingSAE, out_dir: Path, trainer: PaperTrainer | None = None) -> None:
    """Write the inference SAE (sae-lens format) into out_dir, each file atomically. Statistics of
    other modalities already attached to an SAE in out_dir (`msae stats`) are kept."""
    existing = out_dir / "cfg.json"
    if existing.exists():
        try:
            attached = json.loads(existing.read_text()).get("metadata", {}).get(METADATA_KEY) or {}
        except (json.JSONDecodeError, AttributeError):
            attached = {}
        ours = dict(sae.cfg.metadata.get(METADATA_KEY) or {})
        sae.cfg.metadata[METADATA_KEY] = {**attached, **ours}
    tmp = out_dir / f".tmp-final-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    (sae.save_inference_model if hasattr(sae, "save_inference_model") else sae.save_model)(tmp)
    if trainer is not None:
        save_file({"sparsity": trainer.log_feature_sparsity}, tmp / "sparsity.safetensors")
    # the files replace the old ones as a set: cfg.json, which makes the folder loadable, goes first
    # and comes back last, so a kill in between leaves no SAE rather than a mixed one
    existing.unlink(missing_ok=True)
    fsync_dir(out_dir)
    for f in sorted(tmp.iterdir(), key=lambda f: f.name == "cfg.json"):
        os.replace(f, out_dir / f.name)
    tmp.rmdir()
    fsync_dir(out_dir)


def _keep_log_until(path: Path, step: int) -> None:
    """Drop the log's records of steps after `step` (a killed run's, which the resumed run writes
    again), atomically; a run started afresh keeps none."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= step]
    if len(kept) != len(lines):
        write_text_atomic(path, "".join(ln + "\n" for ln in kept))


def _append_log(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


@torch.no_grad()
def _log_eval(sae, eval_x, stats, state, trainer, run, log_path) -> None:
    sae.eval()
    x = eval_x.to(sae.W_dec.device)
    z = sae.encode(stats.apply(x))
    x_hat = stats.invert(sae.decode(z))
    record = {
        "event": "eval", "step": state.step, "epoch": state.epoch,
        "fvu": fvu(x, x_hat), "cos_sim": cosine_similarity(x, x_hat),
        "l0_sparsity": l0_sparsity(z), "l0_active": l0_active(z),
        "dead_latents_window": int(trainer.dead_neurons.sum()),
    }
    sae.train()
    _append_log(log_path, record)
    if run is not None:
        run.log({f"heldout/{k}": v for k, v in record.items() if k not in ("event", "step", "epoch")}, step=state.step)
