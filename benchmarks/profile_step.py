"""Where one training step's time goes: torch's profiler over a few steps of one method.

    python benchmarks/profile_step.py                                   # the MSAE step, batch 4096, 768 -> 6144, CPU
    python benchmarks/profile_step.py --method msae_reference --active 0.2
    python benchmarks/profile_step.py --device cuda --bf16 --trace step.json   # + a Chrome/Perfetto trace

The step is train_step.py's (the same build, initialisation, data and optimiser, `--active` as
there): training_forward_pass -> backward -> clip-grad-norm -> AdamW. Printed, per step:
  * the wall time without the profiler (median) and with it;
  * the four phases (forward, backward, clip, optimizer): host time, and on CUDA the device time
    between CUDA events recorded as each begins and ends (further steps, outside the profiler);
  * on CPU the ops with the most self time, their calls a step and share;
  * on CUDA the kernels with the most device time instead, the device's busy time against the
    step's, kernel launches, and host-device synchronisations a step (torch.cuda's sync debug
    mode, one extra step): each sync stalls the host until the device drains.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

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
    p.add_argument("--method", default="msae", choices=train_step.METHODS)
    p.add_argument("--shape", default="768:6144", help="DIN:DSAE")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--device", default="cpu")
    p.add_argument("--active", type=float, default=0.5, help="fraction of positive pre-activations (0.5 = initialisation)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile the forward pass")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="steps timed, then the same number profiled")
    p.add_argument("--top", type=int, default=15, help="ops listed")
    p.add_argument("--trace", default=None, help="also write a Chrome trace (chrome://tracing, ui.perfetto.dev)")
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
          f"{active:.3f}; bf16 {args.bf16}; compile {args.compile}")
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
