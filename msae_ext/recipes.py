"""Paper runs as files: `msae run RECIPE` trains, evaluates and reports; sweeps over recipes.

A recipe is a training config (msae_ext/config.py; usually with `saes:` so one data pass trains
the whole family) plus two keys the trainer does not read:

    paper:     where the run is reported in the paper (free-form, for readers and model cards)
    evaluate:  a list of {name, data, modality, labels?, stats_data?, protocols?, rows?}. Each trained
               SAE is evaluated on each entry (eval_NAME.json in its folder). `labels: cache` takes the
               class labels stored in an `msae embed` cache; `stats_data` computes and attaches that
               modality's statistics first (text statistics for an image-trained SAE); `rows: N`
               evaluates on the first N rows (for methods whose encoding is an optimisation).

A sweep file is a wandb sweep configuration (method grid | random | bayes, metric, parameters)
whose parameters are config keys. wandb allows no keys of ours at the top level, so the recipe it
varies is named in its `command` (`msae sweep FILE --agent --recipe RECIPE ...`). `wandb sweep
FILE` accepts it; its agents run that command, which turns their `--key=value` arguments into one
run. `msae sweep FILE --local` runs the grid without any wandb server: every
combination becomes one member of a single multi-SAE run (one data pass).
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any

import yaml

from .config import SHARED_KEYS, TrainConfig, all_option_keys, apply_overrides, read_yaml_mapping, runner_keys
from .evaluate import evaluate_protocols, final_report
from .fileio import exclusive, plain_name, write_text_atomic
from .loading import load_labels, load_sae
from .normalization import attach_stats_to_folder, compute_stats, get_stats
from .report import write_report
from .store import check_dimension, open_embeddings
from .train import TrainResult, train, train_many

RECIPE_ONLY_KEYS = ("paper", "evaluate")
EVAL_KEYS = {"name", "data", "modality", "labels", "stats_data", "protocols", "rows"}
SWEEP_METHODS = ("grid", "random", "bayes")
#: the top-level keys wandb's sweep schema allows (it rejects any other)
WANDB_SWEEP_KEYS = {"apiVersion", "kind", "controller", "description", "program", "job", "image_uri", "entity",
                    "project", "method", "command", "name", "run_cap", "metric", "metrics", "scheduler",
                    "early_terminate", "parameters"}


class RecipeError(ValueError):
    pass


def _yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    return read_yaml_mapping(path, what, RecipeError)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> tuple[TrainConfig, dict[str, Any]]:
    """(training config, recipe-only keys) of a recipe file with `--set` overrides applied."""
    path = Path(path)
    raw = _yaml_mapping(path, "recipe")
    raw = apply_overrides(raw, overrides or [])
    extra = {k: raw.pop(k) for k in RECIPE_ONLY_KEYS if k in raw}
    for i, entry in enumerate(extra.get("evaluate") or []):
        unknown = set(entry) - EVAL_KEYS
        if unknown or "data" not in entry or "name" not in entry:
            raise RecipeError(f"{path}: evaluate[{i}] needs name and data; unknown keys {sorted(unknown)}")
        if entry.get("modality", "image") not in ("image", "text"):
            raise RecipeError(f"{path}: evaluate[{i}].modality must be image or text")
        if "rows" in entry and not (isinstance(entry["rows"], int) and entry["rows"] > 0):
            raise RecipeError(f"{path}: evaluate[{i}].rows must be a positive integer, got {entry['rows']!r}")
        try:
            plain_name(entry["name"], f"evaluate[{i}].name")
        except ValueError as e:
            raise RecipeError(f"{path}: {e}") from None
    try:
        cfg = TrainConfig.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"{path}: {e}") from e
    return cfg, extra


def _labels(entry: dict[str, Any]):
    import numpy as np

    spec = entry.get("labels")
    if spec is None:
        return None
    if spec == "cache":
        from .embed import load_embeddings

        labels = load_embeddings(entry["data"]).labels
        if labels is None or isinstance(labels[0], (list, tuple)):
            raise RecipeError(f"{entry['data']}: labels: cache needs a cache with one class label per row")
        return np.asarray(labels, dtype=np.int64)
    return load_labels(spec)


def _source(entry: dict[str, Any]):
    """The entry's data, its first `rows` rows where it names them."""
    from .store import HeadSource

    source = open_embeddings(entry["data"])
    return HeadSource(source, entry["rows"]) if entry.get("rows") else source


def train_and_evaluate(cfg: TrainConfig, out_dir: str | Path, *, resume: bool = True,
                       progress: bool = True) -> list[TrainResult]:
    """Train the SAE (or, with `saes:`, every SAE) of a config, and write each one's held-out
    report (eval.json, and the wandb summary) when the config has eval_data: `msae train`."""
    evaluator = final_report(cfg, progress) if cfg.final_eval and cfg.eval_data is not None else None
    if cfg.saes:
        return train_many(cfg, out_dir, resume=resume, progress=progress, evaluator=evaluator)
    return [train(cfg, out_dir, resume=resume, progress=progress, evaluator=evaluator)]


def check_evaluations(entries: list[dict[str, Any]], d_in: int) -> None:
    """Open every evaluation's data, labels and statistics data before anything is trained."""
    for entry in entries:
        source = open_embeddings(entry["data"])
        check_dimension(source, d_in)
        labels = _labels(entry)
        if labels is not None and len(labels) != source.n_rows:
            raise RecipeError(f"evaluate entry {entry['name']!r}: {len(labels)} labels for {source.n_rows} rows")
        if entry.get("stats_data"):
            check_dimension(open_embeddings(entry["stats_data"]), d_in)


def evaluate_run(sae_dirs: list[Path], entries: list[dict[str, Any]], progress: bool = True) -> dict[str, dict]:
    """Evaluate every SAE folder on every entry; eval_NAME.json in each folder. Returns
    {entry name: {sae folder name: report}}."""
    out: dict[str, dict] = {}
    stats_cache: dict[str, Any] = {}
    for entry in entries:
        modality = entry.get("modality", "image")
        source = _source(entry)
        labels = _labels(entry)
        labels = labels[: source.n_rows] if labels is not None else None
        for d in sae_dirs:
            sae = load_sae(d)
            try:
                get_stats(sae, modality)
            except ValueError:
                if not entry.get("stats_data"):
                    raise RecipeError(f"{d}: no {modality} statistics; give stats_data in evaluate entry "
                                      f"{entry['name']!r}") from None
                key = str(entry["stats_data"])
                if key not in stats_cache:
                    stats_cache[key] = compute_stats(open_embeddings(key))
                attach_stats_to_folder(d, modality, stats_cache[key])
                sae = load_sae(d)
            native = sae.cfg.architecture() in ("msae_topk", "msae_batchtopk")
            protocols = entry.get("protocols") or (["paper", "native"] if native else ["paper"])
            report = evaluate_protocols(sae, source, protocols, modality=modality, labels=labels,
                                        figure_dir=d / f"figures_{entry['name']}", progress=progress)
            write_text_atomic(d / f"eval_{entry['name']}.json", json.dumps(report, indent=2))
            out.setdefault(entry["name"], {})[d.name] = report
    return out


def run_recipe(path: str | Path, out_dir: str | Path, overrides: list[str] | None = None, *, resume: bool = True,
               progress: bool = True, train: bool = True) -> dict[str, Any]:
    """Train the recipe's SAEs into out_dir, evaluate them, and write out_dir/report_NAME/."""
    cfg, extra = load_recipe(path, overrides)
    out_dir = Path(out_dir)
    with exclusive(out_dir, "msae run"):
        return _run_recipe(path, cfg, extra, out_dir, resume, progress, train)


def _run_recipe(path: str | Path, cfg: TrainConfig, extra: dict[str, Any], out_dir: Path, resume: bool,
                progress: bool, train: bool) -> dict[str, Any]:
    entries = extra.get("evaluate") or []
    if train:
        if cfg.train_data is None:
            raise RecipeError(f"{path}: train_data is not set")
        check_evaluations(entries, open_embeddings(cfg.train_data).d_in)
        sae_dirs = [Path(r.out_dir) for r in train_and_evaluate(cfg, out_dir, resume=resume, progress=progress)]
    else:
        names = [m.name for m in cfg.member_configs()] if cfg.saes else [None]
        sae_dirs = [out_dir / n if n else out_dir for n in names]
        missing = [str(d) for d in sae_dirs if not (d / "cfg.json").exists()]
        if missing:
            raise RecipeError(f"--no-train: these SAEs have not been trained yet: {missing}")
    evals = evaluate_run(sae_dirs, entries, progress=progress)
    reports = {name: [str(p) for p in write_report(by_sae, out_dir / f"report_{name}")]
               for name, by_sae in evals.items()}
    summary = {"recipe": str(path), "paper": extra.get("paper"), "saes": [str(d) for d in sae_dirs],
               "reports": reports}
    write_text_atomic(out_dir / "run_summary.json", json.dumps(summary, indent=2))
    return summary


# --------------------------------------------------------------------------------------------
# Sweeps
# --------------------------------------------------------------------------------------------


def validate_sweep(sweep: dict[str, Any], source: str = "sweep") -> list[str]:
    """Problems with a sweep file: wandb's structure (method, metric, parameters) and that every
    parameter is a per-SAE config key. Empty when valid."""
    problems = []
    method = sweep.get("method")
    if method not in SWEEP_METHODS:
        problems.append(f"method must be one of {SWEEP_METHODS}, got {method!r}")
    metric = sweep.get("metric")
    if method == "bayes" and not (isinstance(metric, dict) and metric.get("name") and
                                  metric.get("goal") in ("minimize", "maximize")):
        problems.append("bayes needs metric: {name: ..., goal: minimize|maximize}")
    params = sweep.get("parameters")
    if not isinstance(params, dict) or not params:
        problems.append("parameters must be a non-empty mapping")
        params = {}
    known = runner_keys() | all_option_keys()
    for key, spec in params.items():
        if key not in known:
            problems.append(f"parameter {key!r} is not a config key")
        elif key in SHARED_KEYS:
            problems.append(f"parameter {key!r} is shared by all SAEs of a run; it cannot vary in one data pass")
        if not isinstance(spec, dict) or not ({"values", "value"} & set(spec) or {"min", "max"} <= set(spec)):
            problems.append(f"parameter {key!r} needs values, value, or min and max")
        elif method == "grid" and "values" not in spec and "value" not in spec:
            problems.append(f"grid parameter {key!r} needs a list of values")
    extra = sorted(set(sweep) - WANDB_SWEEP_KEYS)
    if extra:
        problems.append(f"wandb rejects top-level keys {extra}")
    if sweep_recipe(sweep) is None:
        problems.append("its command names no recipe (... sweep FILE --agent --recipe RECIPE ...)")
    elif "${args}" not in sweep["command"]:
        problems.append("its command must end with ${args}, where wandb puts the swept values")
    return problems


def sweep_recipe(sweep: dict[str, Any]) -> str | None:
    """The recipe a sweep varies: the value after --recipe in its command."""
    command = sweep.get("command") or []
    if "--recipe" in command and command.index("--recipe") + 1 < len(command):
        return str(command[command.index("--recipe") + 1])
    return None


def _recipe_path(sweep_file: str | Path, sweep: dict[str, Any], override: str | Path | None) -> Path:
    """The recipe as given (relative to where you run), else found beside the sweep file or in its
    parent folder (recipes/sweeps/FILE -> recipes/RECIPE)."""
    rec = Path(override or sweep_recipe(sweep))
    here = Path(sweep_file).resolve().parent
    for candidate in (rec, here / rec, here / rec.name, here.parent / rec.name):
        if candidate.exists():
            return candidate
    raise RecipeError(f"{sweep_file}: recipe {rec} not found (paths are relative to where you run; give --recipe)")


def load_sweep(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    sweep = _yaml_mapping(path, "sweep")
    problems = validate_sweep(sweep, str(path))
    if problems:
        raise RecipeError(f"{path}: " + "; ".join(problems))
    return sweep


def _slug(value: Any) -> str:
    """A folder-name-safe rendering of a swept value: 0.001 -> 0p001, [8, 4, 1] -> 8-4-1."""
    if isinstance(value, (list, tuple)):
        return "-".join(_slug(v) for v in value)
    return "".join(c if c.isalnum() else "p" if c == "." else "-" for c in str(value))


def grid_members(sweep: dict[str, Any]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, each a `saes:` entry with a readable name."""
    params = sweep["parameters"]
    keys = list(params)
    values = [params[k]["values"] if "values" in params[k] else [params[k]["value"]] for k in keys]
    members = []
    for combo in itertools.product(*values):
        entry = dict(zip(keys, combo))
        entry["name"] = "_".join(f"{k}-{_slug(v)}" for k, v in entry.items())
        members.append(entry)
    return members


def run_sweep_local(path: str | Path, out_dir: str | Path, overrides: list[str] | None = None,
                    progress: bool = True, recipe: str | Path | None = None) -> dict[str, Any]:
    """The sweep's grid as one multi-SAE run of its recipe (no wandb server), then its evaluations."""
    sweep = load_sweep(path)
    if sweep["method"] != "grid":
        raise RecipeError(f"{path}: --local runs grids; method {sweep['method']!r} needs a wandb server "
                          "(wandb sweep + msae sweep --agent)")
    cfg, extra = load_recipe(_recipe_path(path, sweep, recipe), overrides)
    base = cfg.to_dict()
    base.pop("saes")
    base["saes"] = grid_members(sweep)
    local = Path(out_dir) / "sweep_recipe.yaml"
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_text(yaml.safe_dump({**base, **extra}, sort_keys=False))
    return run_recipe(local, out_dir, progress=progress)


def agent_overrides(argv: list[str]) -> list[str]:
    """wandb agents pass parameters as --key=value; they become --set key=value."""
    out = []
    for a in argv:
        if not a.startswith("--") or "=" not in a:
            raise RecipeError(f"unexpected agent argument {a!r}; expected --key=value")
        out.append(a[2:])
    return out


def run_sweep_agent(path: str | Path, argv: list[str], out_root: str | Path, progress: bool = True,
                    recipe: str | Path | None = None) -> dict[str, Any]:
    """One sweep run, as started by `wandb agent`: the recipe with the agent's parameters, wandb online
    (or offline with WANDB_MODE=offline; sync later with `wandb sync`)."""
    sweep = load_sweep(path)
    recipe = _recipe_path(path, sweep, recipe)
    overrides = agent_overrides(argv)
    mode = os.environ.get("WANDB_MODE", "online")
    cfg, _ = load_recipe(recipe, overrides)
    # one SAE per agent run: the swept values replace the recipe's family list
    name = "_".join(f"{k}-{_slug(yaml.safe_load(v))}" for k, _, v in (o.partition("=") for o in overrides)) or "run"
    sets = overrides + [f"wandb.mode={mode}", "saes=null", f"name={name}"]
    return run_recipe(recipe, Path(out_root) / name, sets, progress=progress)
