"""Recipes and sweeps: every shipped recipe is a valid run with the paper's hyperparameters, the
generator reproduces the committed files, sweep files validate, and `msae run` / `msae sweep
--local` / the agent path run end to end on small data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import msae_ext.cli as msae_cli
from msae_ext.recipes import (
    RecipeError,
    agent_overrides,
    grid_members,
    load_recipe,
    load_sweep,
    sweep_recipe,
    validate_sweep,
)

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
SWEEPS = sorted((ROOT / "recipes" / "sweeps").glob("*.yaml"))


def test_recipes_cover_the_paper_with_its_hyperparameters():
    names = {p.stem for p in RECIPES}
    for model in ("vitl14", "vitb16"):
        for fam in ("relu", "topk", "batchtopk", "msae"):
            for e in (8, 16, 32):
                assert f"{model}_{fam}_x{e}" in names
    assert {"vitl14_msae_softcap_x8", "vitl14_msae_text_x8", "vitl14_msae_128_256_x8"} <= names
    for path in RECIPES:
        cfg, extra = load_recipe(path)
        members = cfg.member_configs()
        assert (extra["paper"].get("reported_in") or "not in the paper" in extra["paper"]["note"]) and extra["evaluate"]
        if cfg.architecture in ("nmf", "dictionary", "ica", "kmeans"):  # fitted by scikit-learn, not trained
            continue
        if path.stem.startswith("wordnet_"):  # real text made here, sized for a CPU: not the paper's settings
            assert cfg.modality == "text" and cfg.train_data == "emb/wordnet/noun"
            continue
        assert cfg.epochs == (20 if cfg.expansion_factor == 32 else 30) and cfg.batch_size == 4096
        lr = {"relu": 5e-5, "topk": 5e-4, "batchtopk": 5e-4, "msae": 1e-4, "jumprelu": 5e-5}[cfg.architecture]
        assert all(m.learning_rate == lr for m in members)
        fam = path.stem.split("_")[1]
        if fam == "relu":
            assert [m.options["l1_coefficient"] for m in members] == [0.03, 0.01, 0.003, 0.001]
        elif fam == "topk":
            assert [m.options["k"] for m in members] == [32, 64, 128, 256, 512]
        elif fam == "batchtopk":
            assert [m.options["k"] for m in members] == [16, 32, 64, 128, 256]
        elif fam == "jumprelu":  # six coefficients: the reviewers' curve
            assert [m.options["l0_coefficient"] for m in members] == [0.3, 0.1, 0.03, 0.01, 0.003, 0.001]
        else:
            assert sorted(m.options["weighting"] for m in members) == ["rw", "uw"]
    assert load_recipe(ROOT / "recipes/vitl14_msae_128_256_x8.yaml")[0].options["k_list"] == [128, 256]
    assert load_recipe(ROOT / "recipes/vitl14_msae_text_x8.yaml")[0].modality == "text"
    assert load_recipe(ROOT / "recipes/vitl14_msae_softcap_x16.yaml")[0].options["soft_cap"] == 10.0


def test_generator_reproduces_the_committed_recipes(tmp_path):
    gen = tmp_path / "recipes"
    gen.mkdir()
    (gen / "generate.py").write_text((ROOT / "recipes/generate.py").read_text())
    subprocess.run([sys.executable, str(gen / "generate.py")], check=True, capture_output=True)
    for path in RECIPES:
        assert (gen / path.name).read_text() == path.read_text(), path.name


def test_recipes_readme_maps_every_recipe():
    readme = (ROOT / "recipes/README.md").read_text()
    for path in RECIPES:
        assert f"`{path.stem}`" in readme, path.stem


def test_pareto_grids_have_six_settings_and_three_seeds():
    grids = sorted((ROOT / "recipes" / "sweeps").glob("pareto_*.yaml"))
    families = {p.stem.removeprefix("pareto_vitl14_") for p in grids if "vitl14" in p.stem}
    assert {"relu", "topk", "batchtopk", "jumprelu", "msae", "nmf", "dictionary", "kmeans"} <= families
    wordnet = {f: p for p in grids if "wordnet" in p.stem for f in [p.stem.removeprefix("pareto_wordnet_")]}
    assert set(wordnet) == {"relu", "topk", "msae", "jumprelu", "nmf", "dictionary", "kmeans", "ica"}
    readme = (ROOT / "recipes/README.md").read_text()
    # on real text, the optimisation-encoded methods take one seed and ICA has no knob (recipes/README.md)
    reduced = {wordnet["nmf"]: (3, [0]), wordnet["dictionary"]: (3, [0]), wordnet["ica"]: (1, [0, 1, 2])}
    for path in grids:
        sweep = load_sweep(path)
        settings, seeds = reduced.get(path, (6, [0, 1, 2]))
        assert sweep["parameters"]["seed"]["values"] == seeds, path.name
        assert len(grid_members(sweep)) // len(seeds) >= settings, path.name
        assert f"`{path.stem}`" in readme, path.name  # the README says what each grid answers


def test_sweep_files_validate():
    assert SWEEPS
    for path in SWEEPS:
        sweep = load_sweep(path)
        assert (ROOT / sweep_recipe(sweep)).exists()
        assert sweep["command"][-1] == "${args}" and sweep["metric"]["name"] == "eval/fvu"
        try:  # wandb's own schema, when wandb[sweeps] is installed
            import sweeps as wandb_sweeps
        except ImportError:
            continue
        assert wandb_sweeps.schema_violations_from_proposed_config(sweep) == []
    from msae_ext.architectures import resolve_alphas, resolve_k_list

    alphas = load_sweep(ROOT / "recipes/sweeps/vitl14_msae_alphas_grid.yaml")
    levels = len(resolve_k_list(768 * 8, None, 64))
    for m in grid_members(alphas):  # every alpha vector fits the recipe's k-list
        assert resolve_alphas(levels, "rw", m["alphas"]) == [float(a) for a in m["alphas"]]
    grid = load_sweep(ROOT / "recipes/sweeps/vitl14_topk_grid.yaml")
    members = grid_members(grid)
    assert len(members) == 20 and len({m["name"] for m in members}) == 20


def test_bad_sweeps_and_recipes_are_named(tmp_path):
    problems = validate_sweep({"method": "bayes", "parameters": {"lr": {"values": [1]}, "batch_size": {"values": [1]},
                                                                  "nope": {"values": [1]}}, "recipe": "x.yaml"})
    text = " ".join(problems)
    assert "bayes needs metric" in text and "'batch_size' is shared" in text and "'nope' is not a config key" in text
    assert "wandb rejects top-level keys ['recipe']" in text and "names no recipe" in text
    bad = tmp_path / "bad.yaml"
    bad.write_text("architecture: msae\nevaluate: [{data: x}]\n")
    with pytest.raises(RecipeError, match="needs name and data"):
        load_recipe(bad)
    bad.write_text("architecture: msae\nlearning_rate: 1\n")
    with pytest.raises(RecipeError, match="unknown config key"):
        load_recipe(bad)
    bad.write_text("architecture: msae\nevaluate: [{name: ../../outside, data: x.npy}]\n")
    with pytest.raises(RecipeError, match=r"evaluate\[0\].name '../../outside' must be a plain name"):
        load_recipe(bad)
    bad.write_text("architecture: msae\nevaluate: [{name: head, data: x.npy, rows: 0}]\n")
    with pytest.raises(RecipeError, match=r"evaluate\[0\].rows must be a positive integer"):
        load_recipe(bad)
    assert agent_overrides(["--lr=0.001", "--k=64"]) == ["lr=0.001", "k=64"]
    with pytest.raises(RecipeError):
        agent_overrides(["lr"])


@pytest.fixture
def tiny_recipe(tmp_path, embeddings):
    train, evalx, x = embeddings
    labels = (x[2048:, 0] > np.median(x[2048:, 0])).astype(np.int64)
    np.save(tmp_path / "labels.npy", labels)
    text = (x[:600] * 0.5 + 1.0).astype(np.float32)
    np.save(tmp_path / "text_train.npy", text)
    np.save(tmp_path / "text_val.npy", text[:200])
    recipe = {
        "paper": {"reported_in": "test"},
        "architecture": "msae", "expansion_factor": 4, "k_min": 8, "epochs": 1, "batch_size": 256,
        "lr": 1e-3, "train_data": str(train), "eval_data": str(evalx), "device": "cpu", "eval_every": 0,
        "saes": [{"name": "rw", "weighting": "rw"}, {"name": "uw", "weighting": "uw"}],
        "evaluate": [
            {"name": "heldout", "data": str(evalx), "modality": "image", "labels": str(tmp_path / "labels.npy")},
            {"name": "text", "data": str(tmp_path / "text_val.npy"), "modality": "text",
             "stats_data": str(tmp_path / "text_train.npy")},
        ],
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_msae_run_trains_evaluates_and_reports(tiny_recipe, tmp_path, capsys):
    out = tmp_path / "run"
    assert msae_cli.main(["run", str(tiny_recipe), "--out", str(out), "--no-progress"]) == 0
    for sae in ("rw", "uw"):
        heldout = json.loads((out / sae / "eval_heldout.json").read_text())
        assert 0 <= heldout["fvu"] < 1.5 and "lp_kl" in heldout
        text = json.loads((out / sae / "eval_text.json").read_text())
        assert text["modality"] == "text" and text["n_samples"] == 200
        cfg = json.loads((out / sae / "cfg.json").read_text())
        assert set(cfg["metadata"]["msae_normalization"]) == {"image", "text"}
    for name in ("heldout", "text"):
        table = (out / f"report_{name}" / "table1.md").read_text()
        assert "rw" in table and "uw" in table
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["paper"]["reported_in"] == "test"
    # evaluation alone, on what is there
    assert msae_cli.main(["run", str(tiny_recipe), "--out", str(out), "--no-train", "--no-progress"]) == 0
    assert msae_cli.main(["run", str(tiny_recipe), "--out", str(tmp_path / "empty"), "--no-train"]) == 2
    assert "not been trained yet" in capsys.readouterr().err
    # an evaluation on the first rows of its data, labels cut to match
    recipe = yaml.safe_load(tiny_recipe.read_text())
    recipe["evaluate"] = [{**recipe["evaluate"][0], "name": "head", "rows": 100}]
    head = tmp_path / "head.yaml"
    head.write_text(yaml.safe_dump(recipe))
    assert msae_cli.main(["run", str(head), "--out", str(out), "--no-train", "--no-progress"]) == 0
    report = json.loads((out / "rw" / "eval_head.json").read_text())
    assert report["n_samples"] == 100 and "lp_kl" in report


def test_a_recipe_checks_its_evaluations_before_training(tiny_recipe, tmp_path, capsys):
    """Bad evaluation data, labels that do not match it, or statistics data of another width stop
    `msae run` before a step is trained."""
    recipe = yaml.safe_load(tiny_recipe.read_text())
    np.save(tmp_path / "wide.npy", np.zeros((50, 9), np.float32))
    np.save(tmp_path / "short_labels.npy", np.zeros(7, np.int64))
    cases = {
        "data": ({"data": str(tmp_path / "wide.npy")}, "dimension 9, the SAE expects d_in=16"),
        "labels": ({"labels": str(tmp_path / "short_labels.npy")}, "7 labels for 552 rows"),
        "stats": ({"stats_data": str(tmp_path / "wide.npy")}, "dimension 9, the SAE expects d_in=16"),
    }
    for name, (change, message) in cases.items():
        bad = {**recipe, "evaluate": [{**recipe["evaluate"][0], **change}]}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(bad))
        assert msae_cli.main(["run", str(path), "--out", str(tmp_path / name), "--no-progress"]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / name / "rw" / "checkpoints").exists()


def test_sweep_local_and_agent(tiny_recipe, tmp_path):
    sweep = {"program": "msae_ext/cli/__main__.py", "method": "grid",
             "metric": {"name": "eval/fvu", "goal": "minimize"},
             "parameters": {"lr": {"values": [1e-3, 3e-3]}, "weighting": {"value": "rw"}},
             "command": ["${env}", "${interpreter}", "-m", "msae_ext.cli", "sweep", "--agent", "x", "--recipe",
                         tiny_recipe.name, "${args}"]}
    path = tiny_recipe.parent / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    out = tmp_path / "sweep_out"
    assert msae_cli.main(["sweep", str(path), "--local", "--out", str(out), "--no-progress"]) == 0
    trained = sorted(p.name for p in out.iterdir() if (p / "cfg.json").exists())
    assert trained == ["lr-0p001_weighting-rw", "lr-0p003_weighting-rw"]
    assert yaml.safe_load((out / trained[1] / "train_config.yaml").read_text())["lr"] == 0.003
    # what `wandb agent` runs: --key=value arguments after the known options (WANDB_MODE=disabled here)
    assert msae_cli.main(["sweep", str(path), "--agent", "--out", str(tmp_path / "agent"), "--no-progress",
                          "--lr=0.002", "--weighting=uw"]) == 0
    run_dir = tmp_path / "agent" / "lr-0p002_weighting-uw"
    assert (run_dir / "cfg.json").exists() and (run_dir / "eval_heldout.json").exists()
    cfg = yaml.safe_load((run_dir / "train_config.yaml").read_text())
    assert cfg["lr"] == 0.002 and cfg["weighting"] == "uw"


def test_a_sweep_of_two_seeds_gives_the_pareto_error_bars(tiny_recipe, tmp_path):
    """Two settings x two seeds through `msae sweep --local`: each setting is one Pareto point whose
    mean and spread are those of its two seeds' reports, and the figure is drawn from them."""
    from msae_ext.report import pareto_points

    sweep = {"program": "msae_ext/cli/__main__.py", "method": "grid",
             "metric": {"name": "eval/fvu", "goal": "minimize"},
             "parameters": {"k_min": {"values": [4, 16]}, "seed": {"values": [0, 1]}},
             "command": ["${env}", "${interpreter}", "-m", "msae_ext.cli", "sweep", "--agent", "x", "--recipe",
                         tiny_recipe.name, "${args}"]}
    path = tiny_recipe.parent / "seeds.yaml"
    path.write_text(yaml.safe_dump(sweep))
    out = tmp_path / "pareto"
    assert msae_cli.main(["sweep", str(path), "--local", "--out", str(out), "--no-progress"]) == 0
    points = json.loads((out / "report_heldout" / "pareto.json").read_text())
    assert sorted(p["setting"] for p in points) == ["k_min-16", "k_min-4"] and all(p["seeds"] == 2 for p in points)
    for p in points:
        seeds = [json.loads((out / f"{p['setting']}_seed-{s}" / "eval_heldout.json").read_text()) for s in (0, 1)]
        for key in ("l0_sparsity", "fvu", "cos_sim"):
            values = [r[key] for r in seeds]
            assert p[key] == pytest.approx(np.mean(values)) and p[f"{key}_std"] == pytest.approx(np.std(values, ddof=1))
        assert p["fvu_std"] > 0  # two seeds, two different SAEs
    assert sum(p["frontier"] for p in points) >= 1
    assert (out / "report_heldout" / "pareto.png").stat().st_size > 0
    # the frontier: a point is off it when another is at least as sparse with lower FVU
    planted = {"a_seed-0": {"architecture": "x", "l0_sparsity": 0.9, "fvu": 0.1, "cos_sim": 0.9, "evr": 0.9},
               "b_seed-0": {"architecture": "x", "l0_sparsity": 0.8, "fvu": 0.2, "cos_sim": 0.8, "evr": 0.8},
               "c": {"architecture": "y", "l0_sparsity": 0.7, "fvu": 0.05, "cos_sim": 0.99, "evr": 0.95}}
    front = {p["setting"]: p["frontier"] for p in pareto_points(planted)}
    assert front == {"a": True, "b": False, "c": True}
    # reports holding the native protocol also get its Pareto view, from those numbers
    from msae_ext.report import write_report

    planted["a_seed-0"]["native"] = {"l0_sparsity": 0.99, "fvu": 0.5, "cos_sim": 0.7}
    write_report(planted, tmp_path / "views")
    native = {p["setting"]: p for p in json.loads((tmp_path / "views" / "pareto_native.json").read_text())}
    assert native["a"]["l0_sparsity"] == 0.99 and native["c"]["fvu"] == 0.05
    assert (tmp_path / "views" / "pareto_native.png").stat().st_size > 0
