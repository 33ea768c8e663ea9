"""benchmarks/profile_step.py: the profiler's view of one training step (the CPU kernels labelled)."""

from __future__ import annotations

import importlib.util
import os
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


def test_traffic_mode_counts_hand_computed_bytes():
    """The traffic model on ops whose bytes are known: an elementwise op reads and writes its
    tensors, a view moves nothing, a gather reads as many source elements as it writes, an in-place
    scatter reads and writes its source's count, a factory reads nothing, a GEMM its operands."""
    module = _module("profile_step")
    a, b = torch.randn(100, 10), torch.randn(10, 5)
    idx = torch.randint(0, 10, (100, 3))
    src = torch.randn(100, 3)
    with module.traffic_mode() as t:
        c = a + 1.0                       # read 4000, write 4000
        a.t()                             # a view: nothing
        a.gather(1, idx)                  # read 1200 of a and 2400 of idx, write 1200
        z = torch.zeros_like(a)           # write 4000
        z.scatter_(1, idx, src)           # read 1200 (src) + 2400 (idx) + 1200 (old values), write 1200
        c @ b                             # read 4000 + 200, write 2000
    ops = {name: tuple(v) for name, v in t.ops.items()}
    assert ops["add"] == (1, 4000, 4000)
    assert "t" not in ops and "transpose" not in ops
    assert ops["gather"] == (1, 1200 + 2400, 1200)
    assert ops["zeros_like"] == (1, 0, 4000)
    assert ops["scatter_"] == (1, 1200 + 2400 + 1200, 1200)
    assert ops["mm"] == (1, 4200, 2000)


def test_profile_step_traffic_counts_a_steps_gemms(capsys, monkeypatch):
    """--traffic over one step of the GPU's code path: sae-lens TopK's six GEMMs, and the fused
    MSAE's, with every rank segment dense, two for the encoder, three for the full level and for
    each dense segment (its backward two by blocks of rows), and one (1, d_sae) x (d_sae, d_in)
    product for b_dec's gradient
    (`CenteredEncode`); the compiled kernels are off only while it runs."""
    from msae_ext.architectures import nested_topk

    monkeypatch.setattr(nested_topk, "DENSE_DECODE_FRACTION", dict(nested_topk.DENSE_DECODE_FRACTION))
    monkeypatch.delenv(cpu_kernels.ENV, raising=False)
    module = _module("profile_step")
    gemms = {}
    for method in ("topk_k64", "msae_fused"):
        module.main(["--traffic", "--method", method, "--shape", "32:256", "--batch", "64", "--warmup", "1",
                     "--top", "60", "--dense-fraction", "0"])
        out = capsys.readouterr().out
        rows = _rows(out)
        gemms[method] = sum(rows[name][0] for name in ("mm", "addmm", "addmm_") if name in rows)
        total = float(re.search(r"total ([\d.]+) buffers", out).group(1))
        assert total > 0 and "CPU segment kernels off" in out
    assert cpu_kernels.ENV not in os.environ  # restored
    assert gemms["topk_k64"] == 6
    # 256 latents, k-list 64, 128, 256 (k_min 64): at 0.5 active the levels 64 and 128 are partial,
    # two dense rank segments, and the full level is the GEMM; in float32 a dense segment's two
    # backward GEMMs go by blocks of rows
    blocks = nested_topk.DENSE_BACKWARD_BLOCKS
    assert gemms["msae_fused"] == 2 + 2 * (1 + 2 * blocks) + 3 + 1
