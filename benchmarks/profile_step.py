"""Where one training step's time goes: torch's profiler over a few steps of one method.

    python benchmarks/profile_step.py                                   # msae_fused, batch 4096, 768 -> 6144, CPU
    python benchmarks/profile_step.py --method msae_naive --active 0.2
    python benchmarks/profile_step.py --device cuda --bf16 --trace step.json   # + a Chrome/Perfetto trace

The step is train_step.py's (the same build, initialisation, data and optimizer, `--active` as
there): training_forward_pass -> backward -> clip-grad-norm -> AdamW. Printed, per step:
  * the wall time without the profiler (median) and with it;
  * the four phases (forward, backward, clip, optimizer): host time, and on CUDA the device time
    between CUDA events recorded as each begins and ends (further steps, outside the profiler);
  * on CPU the ops with the most self time, their calls a step and share. The compiled CPU
    kernels show as `msae_ext::<function>` (cpu_kernels.Labelled), the fused loss's autograd
    functions under their class names, their backward as `...Backward`;
  * on CUDA the kernels with the most device time instead, the device's busy time against the
    step's, kernel launches, and host-device synchronisations a step (`torch.cuda`'s sync debug
    mode, one extra step): each sync stalls the host until the device drains, and launches after
    it run unoverlapped.

`--traffic` counts instead, over one step, the bytes every aten op reads and writes (a
TorchDispatchMode; `traffic_mode` says what it counts), in units of one batch-by-width float32
buffer, with the ops a step. On a GPU most of a step's ops are memory-bound kernels, one launch
each, so these model the step's memory traffic and launches there; they can be counted on any
device, the CPU included. It turns the compiled CPU kernels off while it runs (they are no aten
ops): the step is then the GPU's code path, with `--dense-fraction` and `--bf16` as on the GPU.
For example, the GPU's bf16 defaults, counted on CPU:

    python benchmarks/profile_step.py --traffic --bf16 --dense-fraction 0
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_step  # noqa: E402  (this folder's benchmark: the shared step)

PHASES = ("step::forward", "step::backward", "step::clip", "step::optimizer")


def count_syncs(step) -> int:
    """Host-device synchronisations in one CUDA step: the warnings of torch's sync debug mode."""
    import torch

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return sum("synchroniz" in str(w.message) for w in caught)


def traffic_mode():
    """A TorchDispatchMode that counts, per aten op, the calls and the bytes read and written.

    The model, per op:
      * a view of an input (view, slice, transpose, ...) and a change of a tensor's storage or
        shape (`set_`, `resize_`) move nothing;
      * a new output is written whole;
      * an input is read whole, except the source of a gather (gather, index_select, embedding,
        indexing), of which as many elements as the output holds are read, and the tensor a
        factory takes for its shape (`new_zeros`, `zeros_like`), which is not read;
      * an input written in place (`add_`, `scatter_`, `zero_`, an `out=`) is written whole, and
        read too unless the op only fills or copies into it; a scatter (scatter, scatter_add,
        index_add, index_put, index_copy) reads and writes as many elements as its source
        instead, and an out-of-place one also copies its input;
      * scalars are ignored; a GEMM counts its operands and output once (on a GPU they are read
        about once at these shapes); a sort or top-k counts its input and outputs, not its passes.
    It is a model of memory-bound kernels, not a measurement.
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    gathers = ("gather", "index_select", "embedding", "embedding_bag", "index", "take")
    scatters = ("scatter", "scatter_", "scatter_add", "scatter_add_", "index_add", "index_add_",
                "index_put", "index_put_", "index_copy", "index_copy_", "scatter_reduce", "scatter_reduce_",
                "_index_put_impl_")

    metadata = ("set_", "resize_", "as_strided_", "detach_", "alias", "lift_fresh", "_reshape_alias")
    factories = ("new_zeros", "new_empty", "new_ones", "new_full", "zeros_like", "empty_like", "ones_like",
                 "full_like", "empty_strided", "new_empty_strided")

    def nbytes(t) -> int:
        return t.numel() * t.element_size()

    class Traffic(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # calls, read, written

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            schema = func._schema
            name = func.__name__.split(".")[0]
            written_args = set()
            for a in schema.arguments:
                if a.alias_info is not None and a.alias_info.is_write:
                    written_args.add(a.name)
            outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
            if name in metadata or (outs and all(r.alias_info is not None and not r.alias_info.is_write
                                                  for r in schema.returns)):
                return out  # a view, or a tensor's storage or shape set: no data moves
            inputs = []  # (argument name, tensor)
            for a, v in zip(schema.arguments, args):
                inputs += [(a.name, t) for t in tree_flatten(v)[0] if isinstance(t, torch.Tensor)]
            for k, v in kwargs.items():
                inputs += [(k, t) for t in tree_flatten(v)[0] if isinstance(t, torch.Tensor)]
            read = written = 0
            scatter_src = 0
            if name in scatters:  # the elements scattered: the src / values argument
                srcs = [t for n, t in inputs if n in ("src", "source", "values")]
                scatter_src = sum(t.numel() for t in srcs)
            for n, t in inputs:
                if t.dim() == 0:
                    continue
                if n in written_args:
                    per = t.element_size()
                    if scatter_src:
                        read += scatter_src * per
                        written += scatter_src * per
                    else:
                        written += nbytes(t)
                        if name not in ("zero_", "fill_", "copy_", "normal_", "uniform_"):
                            read += nbytes(t)
                elif name in factories:  # new_zeros(self, ...), zeros_like(self): only the shape is used
                    continue
                elif name in gathers and n in ("self", "input", "weight", "src") and outs:
                    read += min(nbytes(t), outs[0].numel() * t.element_size())
                else:
                    read += nbytes(t)
            if not written_args:
                written += sum(nbytes(o) for o in outs)
            if name in scatters and not written_args and outs:  # out of place: a copy, then the scatter
                read += scatter_src * outs[0].element_size()
            entry = self.ops[name]
            entry[0] += 1
            entry[1] += read
            entry[2] += written
            return out

    return Traffic()


def print_traffic(step, buffer_bytes: int, top: int) -> None:
    """Run one step under `traffic_mode` and print its ops by bytes moved."""
    with traffic_mode() as t:
        step()
    rows = sorted(t.ops.items(), key=lambda kv: kv[1][1] + kv[1][2], reverse=True)
    calls = sum(v[0] for v in t.ops.values())
    read, written = (sum(v[i] for v in t.ops.values()) for i in (1, 2))
    print(f"\nmemory traffic of one step, in batch-by-width float32 buffers ({buffer_bytes / 2**20:.0f} MiB)")
    print(f"{'op (top ' + str(top) + ' by bytes)':<40}{'calls':>7}{'read':>9}{'written':>9}")
    for name, (n, r, w) in rows[:top]:
        print(f"{name[:40]:<40}{n:>7}{r / buffer_bytes:>9.2f}{w / buffer_bytes:>9.2f}")
    print(f"{'all ops':<40}{calls:>7}{read / buffer_bytes:>9.2f}{written / buffer_bytes:>9.2f}")
    print(f"total {(read + written) / buffer_bytes:.2f} buffers ({(read + written) / 2**30:.2f} GiB), {calls} ops")


def traffic(args: argparse.Namespace) -> None:
    """--traffic: `args.warmup` steps, then one step's memory traffic (`print_traffic`)."""
    import torch

    step, active = train_step.prepare(args)
    for _ in range(args.warmup):
        step()
    print(f"# {args.method}, device {args.device}, torch {torch.__version__}; batch {args.batch}, "
          f"{args.d_in} -> {args.d_sae}, active {active:.3f}; bf16 {args.bf16}; dense fraction "
          f"{'default' if args.dense_fraction is None else args.dense_fraction}; CPU segment kernels off")
    print_traffic(step, args.batch * args.d_sae * 4, args.top)


class DeviceTimer:
    """Per-phase device time on CUDA: events recorded on the current stream as each phase begins
    and ends. The backward's kernels are launched from autograd's device thread, outside the host
    range of `step::backward`, but on the same stream, so the events bracket them in stream order."""

    def __init__(self):
        self.pairs: list[tuple[str, object, object]] = []

    @contextlib.contextmanager
    def __call__(self, name: str):
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with torch.profiler.record_function(name):
            yield
        end.record()
        self.pairs.append((name, start, end))

    def ms(self) -> dict[str, float]:
        import torch

        torch.cuda.synchronize()
        out: dict[str, float] = defaultdict(float)
        for name, start, end in self.pairs:
            out[name] += start.elapsed_time(end)
        return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="msae_fused", choices=train_step.METHODS)
    p.add_argument("--shape", default="768:6144", help="DIN:DSAE")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--device", default="cpu")
    p.add_argument("--active", type=float, default=0.5, help="fraction of positive pre-activations (0.5 = initialisation)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile the forward pass")
    p.add_argument("--dense-fraction", type=float, default=None, help="as in train_step.py")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="steps timed, then the same number profiled")
    p.add_argument("--top", type=int, default=15, help="ops listed")
    p.add_argument("--trace", default=None, help="also write a Chrome trace (chrome://tracing, ui.perfetto.dev)")
    p.add_argument("--traffic", action="store_true",
                   help="instead: the bytes each aten op reads and writes in one step, and the ops a step "
                        "(the compiled CPU kernels off: the GPU's code path)")
    args = p.parse_args(argv)
    try:
        args.d_in, args.d_sae = (int(v) for v in args.shape.split(":"))
    except ValueError:
        p.error(f"--shape must be DIN:DSAE, got {args.shape!r}")
    if args.steps < 1:
        p.error("--steps must be at least 1")

    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda, but torch sees no CUDA device here")
    if args.traffic:  # the PyTorch path, every op an aten op; the environment restored after
        from msae_ext.architectures import cpu_kernels

        with mock.patch.dict(os.environ, {cpu_kernels.ENV: "0"}):
            return traffic(args)
    step, active = train_step.prepare(args)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    walls = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        sync()
        walls.append(time.perf_counter() - t0)
    activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        profiled = (time.perf_counter() - t0) / args.steps
    syncs = count_syncs(step) if cuda else None
    device_ms: dict[str, float] = {}
    if cuda:  # the phases' device time, outside the profiler
        timer = DeviceTimer()
        for _ in range(args.steps):
            step(phase=timer)
        device_ms = timer.ms()

    n = args.steps
    wall = statistics.median(walls)
    print(f"# {args.method}, device {args.device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if cuda else ''}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}; batch {args.batch}, {args.d_in} -> {args.d_sae}, active "
          f"{active:.3f}; bf16 {args.bf16}; compile {args.compile}; CPU segment kernels {train_step._kernel_state()}")
    print(f"step: {1e3 * wall:.1f} ms (median of {n}), {1e3 * profiled:.1f} ms under the profiler")

    events = prof.key_averages()
    by_name = {e.key: e for e in events}
    self_device_attr = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    print("\nphase              host ms" + ("   device ms" if cuda else ""))
    for name in PHASES:
        e = by_name.get(name)
        if e is None:
            continue
        line = f"{name[6:]:<16}{e.cpu_time_total / 1e3 / n:>10.2f}"
        if cuda:
            line += f"{device_ms.get(name, 0.0) / n:>12.2f}"
        print(line)

    if cuda:  # the device's own events (kernels, copies, fills): an op's time is its kernels'
        key = lambda e: getattr(e, self_device_attr)  # noqa: E731
        ops = [e for e in events if e.device_type == DeviceType.CUDA]
        title = "kernel (top {} by device time)"
    else:  # self time per op, the phases' own ranges left out (their time is their children's)
        key = lambda e: e.self_cpu_time_total  # noqa: E731
        ops = [e for e in events if e.key not in PHASES]
        title = "op (top {} by self host time)"
    ops.sort(key=key, reverse=True)
    total = sum(key(e) for e in ops) or 1.0
    print(f"\n{title.format(args.top):<52}calls/step   ms/step   share")
    for e in ops[: args.top]:
        print(f"{e.key[:52]:<52}{e.count / n:>8.1f}{key(e) / 1e3 / n:>10.2f}{100 * key(e) / total:>7.1f}%")
    print(f"{'all_ops':<52}{sum(e.count for e in ops) / n:>8.1f}{total / 1e3 / n:>10.2f}")
    if cuda:  # what the kernels leave idle: launch gaps, syncs, host work
        print(f"device busy {total / 1e3 / n:.2f} ms of the profiled step's {1e3 * profiled:.2f} ms "
              f"({100 * total / 1e3 / n / (1e3 * profiled):.0f}%)")

    if cuda:
        launches = defaultdict(int)
        for e in events:
            if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx"):
                launches["kernel launches"] += e.count
            elif e.key in ("cudaMemcpyAsync", "cudaMemsetAsync", "cudaStreamSynchronize", "cudaDeviceSynchronize"):
                launches[e.key] += e.count
        for name, count in sorted(launches.items()):
            print(f"{name}: {count / n:.1f} a step")
        print(f"host-device synchronisations (sync debug mode, one step): {syncs}")
    if args.trace:
        prof.export_chrome_trace(args.trace)
        print(f"trace: {args.trace}")


if __name__ == "__main__":
    main()
