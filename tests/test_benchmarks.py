"""benchmarks/profile_step.py: the profiler's view of one training step (the CPU kernels labelled)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

from msae_ext.architectures import cpu_kernels

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


@pytest.mark.parametrize("method", ["msae_fused", "topk_k64"])
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
    if method == "msae_fused" and cpu_kernels.segment_kernels() is not None:
        # the compiled kernels are visible, once a step each, under their own names
        assert ops["msae_ext::nested_select"][0] == 1.0
        assert any(name.startswith("msae_ext::segments") for name in ops)
    if method == "topk_k64":
        assert not any(name.startswith("msae_ext::") for name in ops)


def test_profile_step_names_bad_arguments(capsys):
    module = _module("profile_step")
    with pytest.raises(SystemExit):
        module.main(["--shape", "32x256"])
    assert "--shape must be DIN:DSAE, got '32x256'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="torch sees no CUDA device"):
            module.main(["--device", "cuda", "--shape", "32:256", "--batch", "8"])


def test_labelled_kernels_compute_the_same():
    """The profiler label wraps the call and nothing else: same outputs, same function names."""
    kernels = cpu_kernels.segment_kernels()
    if kernels is None:
        pytest.skip("the CPU segment kernels are not built here")
    pre = torch.randn(37, 300)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        n_pos, has_nan = kernels.count_positive(pre)
    raw_n, raw_nan = kernels.module.count_positive(pre)
    assert torch.equal(n_pos, raw_n) and has_nan == raw_nan
    assert torch.equal(n_pos, (pre > 0).sum(1, dtype=torch.int32))
    assert kernels.count_positive.__name__ == "count_positive"
    assert "msae_ext::count_positive" in {e.key for e in prof.key_averages()}
