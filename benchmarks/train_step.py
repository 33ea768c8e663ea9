"""Milliseconds and peak memory per SAE training step (forward + backward + optimizer), one run.

    python benchmarks/train_step.py            # batch 4096, 768->6144 and 512->16384
    python benchmarks/train_step.py --quick    # batch 1024, 768->6144 only (CPU)
    python benchmarks/train_step.py --device cuda --bf16 --compile

Steps compared on the same shapes and data, each in its own child process so that peak memory
is that step's own:
    msae_fused      our MSAE training step (one sort, one decode; nested_topk.py)
    msae_naive      the same loss with one dense decode per level (the reference oracle, which
                    shares our one sort so that ties resolve identically)
    msae_authors    the authors' algorithm: one top-k and one dense decode per level
    msae_1level     our MSAE with the full level only (gathered or one GEMM, chosen as in the
                    fused step): the step without partial levels, to measure their extra memory
    topk_k64        sae-lens TopKTrainingSAE, k=64
    matryoshka_btk  sae-lens MatryoshkaBatchTopKTrainingSAE, k=64, widths = the MSAE k-list
    relu            our ReLU SAE (L1)
Every step is training_forward_pass -> backward -> clip-grad-norm -> AdamW step (the trainer's
`paper_optimizer`: torch's fused AdamW on CPU and CUDA), from the same
initialisation (W_enc = W_dec^T, zero biases). `--active FRACTION` shifts b_enc so that that
fraction of pre-activations is positive (a trained MSAE's full level has about 0.17-0.25; at
initialisation it is 0.5), which is what decides how much of the sort the partial levels use.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

METHODS = ["msae_fused", "msae_naive", "msae_authors", "msae_1level", "topk_k64", "matryoshka_btk", "relu"]


def k_list_for(d_sae: int) -> list[int]:
    from msae_ext.architectures import resolve_k_list

    return resolve_k_list(d_sae, None, 64)


def build(method: str, d_in: int, d_sae: int, device: str):
    from sae_lens.saes.matryoshka_batchtopk_sae import (
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
    )
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    from msae_ext.architectures import (
        MSAETrainingSAE,
        MSAETrainingSAEConfig,
        ReLUTrainingSAE,
        ReLUTrainingSAEConfig,
    )

    common = dict(d_in=d_in, d_sae=d_sae, device=device)
    ks = k_list_for(d_sae)
    if method == "msae_fused":
        return MSAETrainingSAE(MSAETrainingSAEConfig(**common, k_list=ks, nested_impl="fused"))
    if method == "msae_naive":
        return MSAETrainingSAE(MSAETrainingSAEConfig(**common, k_list=ks, nested_impl="reference"))
    if method == "msae_authors":
        return _authors_msae()(MSAETrainingSAEConfig(**common, k_list=ks))
    if method == "msae_1level":
        return MSAETrainingSAE(MSAETrainingSAEConfig(**common, k_list=[d_sae], nested_impl="fused"))
    if method == "topk_k64":
        return TopKTrainingSAE(TopKTrainingSAEConfig(**common, k=64))
    if method == "matryoshka_btk":
        return MatryoshkaBatchTopKTrainingSAE(
            MatryoshkaBatchTopKTrainingSAEConfig(**common, k=64, matryoshka_widths=ks))
    if method == "relu":
        return ReLUTrainingSAE(ReLUTrainingSAEConfig(**common))
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def _authors_msae():
    """MSAETrainingSAE whose loss is computed as the authors' code does: per level, its own
    top-k over the pre-activations and a dense decode."""
    from sae_lens.saes.sae import TrainStepOutput

    from msae_ext.architectures import MSAETrainingSAE
    from msae_ext.architectures.base import reconstruction_loss, soft_cap, topk_relu

    class AuthorsMSAE(MSAETrainingSAE):
        def training_forward_pass(self, step_input):  # type: ignore[override]
            x = step_input.sae_in
            hidden_pre = self.hidden_pre(x)
            losses, x_hat = [], None
            for k in self.cfg.k_list:
                z = soft_cap(topk_relu(hidden_pre, k), self.cfg.soft_cap)
                x_hat = z @ self.W_dec + self.b_dec
                losses.append(reconstruction_loss(x_hat, x, self.cfg.recon_loss))
            loss = sum(a * l for a, l in zip(self.cfg.alphas, losses))
            return TrainStepOutput(sae_in=x, sae_out=x_hat, feature_acts=z.detach(), hidden_pre=hidden_pre,
                                   loss=loss, losses={"recon_loss": loss})

    return AuthorsMSAE


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def prepare(args: argparse.Namespace):
    """One method's SAE, data and optimizer on one shape: returns (step, active), `step()` being
    one training step and `active` the fraction of positive pre-activations (also used by
    profile_step.py)."""
    import torch
    from sae_lens.saes.sae import TrainStepInput

    import msae_ext  # noqa: F401  (registers the architectures)
    from msae_ext.train import paper_optimizer

    torch.manual_seed(0)
    device = args.device
    if args.dense_fraction is not None:
        from msae_ext.architectures import nested_topk

        for autocast in (False, True):
            nested_topk.DENSE_DECODE_FRACTION[torch.device(device).type, autocast] = args.dense_fraction
    sae = build(args.method, args.d_in, args.d_sae, device)
    with torch.no_grad():
        # the paper's initialisation for every method, so that all see the same pre-activations
        W = torch.nn.functional.normalize(torch.randn(args.d_sae, args.d_in, device=device), dim=-1)
        sae.W_dec.copy_(W)
        sae.W_enc.copy_(W.T)
        sae.b_dec.zero_()
        x = torch.randn(args.batch, args.d_in, device=device)
        pre = x @ W.T
        shift = 0.0 if args.active >= 0.5 else -float(torch.quantile(pre[:256].flatten().float(), 1 - args.active))
        sae.b_enc.fill_(shift)
        active = float((pre + shift > 0).float().mean())
    if args.compile:
        sae.training_forward_pass = torch.compile(sae.training_forward_pass)  # type: ignore[method-assign]
    opt = paper_optimizer(sae.parameters(), lr=1e-5)  # the trainer's AdamW (fused where it runs)
    step_input = TrainStepInput(sae_in=x, coefficients={"l1": 0.003}, dead_neuron_mask=None,
                                n_training_steps=0, is_logging_step=False)
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=args.bf16)

    def step(phase=torch.profiler.record_function) -> None:
        """One step; `phase(name)` brackets each part (by default a profiler range that
        profile_step.py reports, a few microseconds each)."""
        with phase("step::forward"), autocast:
            out = sae.training_forward_pass(step_input)
        with phase("step::backward"):
            out.loss.backward()
        with phase("step::clip"):
            torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        with phase("step::optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step, active


def child(args: argparse.Namespace) -> None:
    """Time one method on one shape; print one JSON line."""
    import torch

    step, active = prepare(args)
    device = args.device
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times.sort()
    print(json.dumps({"method": args.method, "ms": 1000 * times[len(times) // 2], "peak_bytes": peak,
                      "active": active}))


def child_command(method: str, d_in: int, d_sae: int, args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, __file__, "--child", "--method", method, "--d-in", str(d_in), "--d-sae", str(d_sae),
           "--batch", str(args.batch), "--device", args.device, "--warmup", str(args.warmup),
           "--active", str(args.active)]
    cmd += ["--bf16"] * args.bf16 + ["--compile"] * args.compile
    cmd += ["--dense-fraction", str(args.dense_fraction)] if args.dense_fraction is not None else []
    return cmd


def time_child(method: str, d_in: int, d_sae: int, args: argparse.Namespace) -> dict:
    """Time `method` in one child process (on CUDA its peak memory comes with it)."""
    return _child_json(child_command(method, d_in, d_sae, args) + ["--repeats", str(args.repeats)], method, os.environ)


def cpu_peak_child(method: str, d_in: int, d_sae: int, args: argparse.Namespace) -> int:
    """The peak memory of one CPU step, taken in a child of its own.

    On CPU the peak is the child's peak RSS. glibc's malloc raises its mmap threshold as large
    blocks are freed and then keeps later ones in its heap, so that peak depends on the
    allocation history (run-to-run spread of several buffers). The memory child therefore runs
    with a fixed MALLOC_MMAP_THRESHOLD_: every large tensor is mapped and unmapped on its own and
    the peak RSS follows the peak of live tensors (reproducible to the MiB). That setting slows
    steps with many large temporaries (a page fault per fresh tensor), so the timing children keep
    the default allocator.
    """
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    return _child_json(child_command(method, d_in, d_sae, args) + ["--repeats", "1"], method, env)["peak_bytes"]


def _child_json(cmd: list[str], method: str, env) -> dict:
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


#: (numerator, denominator, label, target) of the printed time ratios
RATIOS = [
    ("msae_fused", "topk_k64", "fused / sae-lens TopK", "<= 1.3"),
    ("msae_naive", "msae_fused", "naive / fused (speed-up)", ">= 4"),
    ("msae_authors", "msae_fused", "authors / fused (speed-up)", ">= 4"),
    ("msae_authors", "topk_k64", "authors / sae-lens TopK", ""),
    ("msae_fused", "matryoshka_btk", "fused / sae-lens matryoshka", ""),
    ("msae_fused", "relu", "fused / ReLU", ""),
]


def _kernel_state() -> str:
    from msae_ext.architectures import cpu_kernels

    if not cpu_kernels.enabled():
        return f"off ({cpu_kernels.ENV}=0)"
    return "on" if cpu_kernels.segment_kernels() is not None else "unavailable (PyTorch path)"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="batch 1024, 768->6144 only, 3 repeats (CPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=None, help="default 4096 (1024 with --quick)")
    p.add_argument("--shapes", default=None, help="comma list of DIN:DSAE, default 768:6144,512:16384")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--repeats", type=int, default=None, help="timed steps per method (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1,
                   help="time every method this many times, interleaved; report the median of the "
                        "rounds and each ratio's median over the rounds (a noisy machine)")
    p.add_argument("--active", type=float, default=0.5,
                   help="fraction of positive pre-activations (0.5 = initialisation)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the forward pass")
    p.add_argument("--dense-fraction", type=float, default=None,
                   help="override nested_topk.DENSE_DECODE_FRACTION for the device (0: every rank "
                        "segment dense, inf: every one gathered)")
    # child-process arguments
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--d-in", type=int, help=argparse.SUPPRESS)
    p.add_argument("--d-sae", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)

    args.batch = args.batch or (1024 if args.quick else 4096)
    args.repeats = args.repeats or (3 if args.quick else 5)
    shapes_text = args.shapes or ("768:6144" if args.quick else "768:6144,512:16384")
    shapes = [tuple(int(v) for v in s.split(":")) for s in shapes_text.split(",")]
    methods = args.methods.split(",")

    import torch

    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else (platform.processor() or platform.machine())
    print(f"# device {args.device} ({dev}), torch {torch.__version__}, {os.cpu_count()} CPUs, threads "
          f"{torch.get_num_threads()}; batch {args.batch}; bf16 {args.bf16}; compile {args.compile}; "
          f"dense fraction {args.dense_fraction if args.dense_fraction is not None else 'default'}; "
          f"median of {args.repeats} steps after {args.warmup} warm-up"
          + (f", {args.rounds} interleaved rounds" if args.rounds > 1 else "")
          + ("" if args.device.startswith("cuda") else f"; CPU segment kernels {_kernel_state()}"))
    for d_in, d_sae in shapes:
        ks = k_list_for(d_sae)
        buf = args.batch * d_sae * 4
        rounds: list[dict[str, dict]] = []
        for _ in range(args.rounds):  # methods interleaved, so that drift hits every method alike
            rounds.append({m: time_child(m, d_in, d_sae, args) for m in methods})
        results = {m: {**rounds[0][m], "ms": statistics.median(r[m]["ms"] for r in rounds)} for m in methods}
        if not args.device.startswith("cuda"):
            for m in methods:
                results[m]["peak_bytes"] = cpu_peak_child(m, d_in, d_sae, args)
        print(f"\n## {d_in} -> {d_sae}, {len(ks)} levels {ks}, active fraction "
              f"{results[methods[0]]['active']:.3f}; one batch-by-width float32 buffer = {buf / 2**20:.0f} MiB")
        spread = args.rounds > 1
        print(f"{'method':<16}{'ms/step':>10}{'peak MiB':>10}{'peak/buffer':>13}" + ("  ms per round" if spread else ""))
        for m in methods:
            r = results[m]
            per_round = "  " + " ".join(f"{x[m]['ms']:.0f}" for x in rounds) if spread else ""
            print(f"{m:<16}{r['ms']:>10.1f}{r['peak_bytes'] / 2**20:>10.0f}{r['peak_bytes'] / buf:>13.2f}{per_round}")

        def ratio(a: str, b: str) -> float:  # the median over rounds of the ratio within each round
            return statistics.median(x[a]["ms"] / x[b]["ms"] for x in rounds)

        ratios = []
        for a, b, name, target in RATIOS:
            if a in results and b in results:
                ratios.append((name, ratio(a, b), target))
        if "msae_fused" in results and "msae_1level" in results:
            extra = (results["msae_fused"]["peak_bytes"] - results["msae_1level"]["peak_bytes"]) / buf
            ratios.append(("fused peak - 1-level peak, in buffers", extra, "<= 1"))
        for name, value, target in ratios:
            print(f"{name:<40}{value:>8.2f}  {('target ' + target) if target else ''}")


if __name__ == "__main__":
    main()
