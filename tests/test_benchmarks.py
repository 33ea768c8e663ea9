"""benchmarks/: the step benchmark's methods and the profiler's view of one training step."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _module(name: str):
    """A benchmark script as a module (profile_step.py puts its own folder on sys.path for
    train_step.py)."""
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(text: str) -> dict[str, list[float]]:
    """'name  1.0  2.5 ...' lines -> {name: [numbers]}"""
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(\S+)\s+([-\d.%\s]+)$", line.strip())
        if m:
            out[m.group(1)] = [float(v.rstrip("%")) for v in m.group(2).split()]
    return out


@pytest.mark.parametrize("method", ["msae", "topk_k64"])
def test_profile_step_reports_phases_and_ops(method, capsys):
    _module("profile_step").main(["--method", method, "--shape", "32:256", "--batch", "64",
                                  "--warmup", "1", "--steps", "2", "--top", "40"])
    out = capsys.readouterr().out
    rows = _rows(out)
    step_ms = float(re.search(r"([\d.]+) ms under the profiler", out).group(1))
    phases = {name: rows[name][0] for name in ("forward", "backward", "clip", "optimizer")}
    assert all(v > 0 for v in phases.values())
    assert sum(phases.values()) <= step_ms * 1.05  # the phases are parts of the step
    ops = {name: v for name, v in rows.items() if "::" in name}
    assert "aten::_fused_adamw_" in ops
    assert ops["aten::_fused_adamw_"][0] == 1.0  # one optimizer step a step
    listed = sorted(ops.values(), key=lambda r: -r[1])
    assert [r[1] for r in listed] == [r[1] for r in ops.values()]  # sorted by self time
    calls, total = rows["all_ops"]
    assert sum(r[0] for r in listed) <= calls and sum(r[1] for r in listed) <= total + 0.01 * len(listed)
    assert total <= step_ms * 1.05
    assert abs(listed[0][2] - 100 * listed[0][1] / total) < 0.2 + 100 * 0.01 / total  # the share column
    if method == "msae":  # one top-k a step: the one selection the levels share
        assert ops["aten::topk"][0] == 1.0


def test_profile_step_names_bad_arguments(capsys):
    module = _module("profile_step")
    with pytest.raises(SystemExit):
        module.main(["--shape", "32x256"])
    assert "--shape must be DIN:DSAE, got '32x256'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="torch sees no CUDA device"):
            module.main(["--device", "cuda", "--shape", "32:256", "--batch", "8"])


def test_train_step_builds_every_method_and_prints_the_ratios(capsys, monkeypatch):
    """benchmarks/train_step.py on a tiny shape: every method's step runs (in this process: the
    script's child processes would each import sae-lens anew), and the table and the ratios print
    with their targets."""
    import argparse

    module = _module("train_step")

    def in_process(method, d_in, d_sae, args, repeats, env=None):
        child = argparse.Namespace(**{**vars(args), "method": method, "d_in": d_in, "d_sae": d_sae})
        step, active = module.prepare(child)
        step()
        return {"ms": 1.0 + module.METHODS.index(method), "peak_bytes": 1 << 20, "active": active}

    monkeypatch.setattr(module, "run_child", in_process)
    module.main(["--shapes", "16:128", "--batch", "32"])
    out = capsys.readouterr().out
    rows = dict(re.findall(r"^\| (\w+) \| ([\d.]+) \|", out, re.M))
    assert set(rows) == set(module.METHODS)
    assert re.search(r"msae / sae-lens TopK\s+0.20\s+target <= 2.0", out)  # 1 ms / 5 ms
    assert re.search(r"reference / msae \(speed-up\)\s+2.00\s+target >= 2", out)
    assert re.search(r"msae peak / reference peak\s+1.00\s+target <= 1", out)
