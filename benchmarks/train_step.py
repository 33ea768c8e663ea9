"""Milliseconds and peak memory per SAE training step (forward, backward, clip, AdamW), one run.

    python benchmarks/train_step.py                        # batch 4096, 768 -> 6144, every method
    python benchmarks/train_step.py --active 0.2           # a trained SAE's density
    python benchmarks/train_step.py --compile              # the same steps under torch.compile
    python benchmarks/train_step.py --rounds 3                 # each ratio the median of 3 interleaved rounds
    python benchmarks/train_step.py --device cuda --bf16 --shapes 768:6144,512:16384

Each method runs in a child process of its own, so that its peak memory is its own:
    msae             the MSAE step as training runs it (nested_topk.nested_topk_loss)
    msae_reference   the same loss with one dense decode per level (the tests' oracle)
    msae_authors     the authors' algorithm: a top-k and a dense decode per level
    msae_1level      the MSAE with its full level only: the step without partial levels
    topk_k64         sae-lens's TopKTrainingSAE, k = 64
    matryoshka_btk   sae-lens's MatryoshkaBatchTopKTrainingSAE, k = 64, widths = the MSAE k-list
    relu             this package's ReLU SAE (L1)
Every method starts from the paper's initialisation (W_enc = W_dec^T, zero biases) on the same
data. `--active F` shifts b_enc so that a fraction F of the pre-activations is positive: 0.5 at
initialisation, about 0.2 in a trained MSAE. It decides how many levels are partial.

Peak memory on CPU is the child's peak RSS under a fixed glibc mmap threshold (every large tensor
mapped and unmapped on its own, so the peak follows the live tensors); on CUDA it is torch's
peak allocation.
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

METHODS = ["msae", "msae_reference", "msae_authors", "msae_1level", "topk_k64", "matryoshka_btk", "relu"]
#: (numerator, denominator, what the ratio is, target at initialisation, target at --active 0.2)
RATIOS = [
    ("msae", "topk_k64", "msae / sae-lens TopK", "<= 2.0", "<= 1.2"),
    ("msae_reference", "msae", "reference / msae (speed-up)", ">= 2", ""),
    ("msae_authors", "msae", "authors / msae (speed-up)", "", ""),
    ("msae", "matryoshka_btk", "msae / sae-lens Matryoshka", "", ""),
    ("msae", "msae_1level", "msae / its full level alone", "", ""),
]


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
        resolve_k_list,
    )

    common = dict(d_in=d_in, d_sae=d_sae, device=device)
    ks = resolve_k_list(d_sae)
    if method in ("msae", "msae_reference", "msae_authors"):
        impl = "fused" if method == "msae" else "reference"
        cls = _authors_msae() if method == "msae_authors" else MSAETrainingSAE
        return cls(MSAETrainingSAEConfig(**common, k_list=ks, nested_impl=impl))
    if method == "msae_1level":
        return MSAETrainingSAE(MSAETrainingSAEConfig(**common, k_list=[d_sae]))
    if method == "topk_k64":
        return TopKTrainingSAE(TopKTrainingSAEConfig(**common, k=64))
    if method == "matryoshka_btk":
        return MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(**common, k=64, matryoshka_widths=ks))
    if method == "relu":
        return ReLUTrainingSAE(ReLUTrainingSAEConfig(**common))
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def _authors_msae():
    """The MSAE with its loss computed as the authors' code does: per level its own top-k over the
    pre-activations and a dense decode."""
    from sae_lens.saes.sae import TrainStepOutput

    from msae_ext.architectures import MSAETrainingSAE
    from msae_ext.architectures.base import reconstruction_loss, topk_relu

    class AuthorsMSAE(MSAETrainingSAE):
        def training_forward_pass(self, step_input):  # type: ignore[override]
            x = step_input.sae_in
            hidden_pre = self.hidden_pre(x)
            losses = []
            for k in self.cfg.k_list:
                z = topk_relu(hidden_pre, k)
                x_hat = z @ self.W_dec + self.b_dec
                losses.append(reconstruction_loss(x_hat, x, "mse"))
            loss = sum(a * level for a, level in zip(self.cfg.alphas, losses))
            return TrainStepOutput(sae_in=x, sae_out=x_hat, feature_acts=z.detach(), hidden_pre=hidden_pre,
                                   loss=loss, losses={"recon_loss": loss})

    return AuthorsMSAE


def prepare(args: argparse.Namespace):
    """One method's SAE, data and optimiser on one shape: (step, active fraction), `step()` being one
    training step (also used by profile_step.py)."""
    import torch
    from sae_lens.saes.sae import TrainStepInput

    import msae_ext  # noqa: F401  (registers the architectures)
    from msae_ext.train import paper_optimizer

    torch.manual_seed(0)
    device = args.device
    sae = build(args.method, args.d_in, args.d_sae, device)
    with torch.no_grad():
        W = torch.nn.functional.normalize(torch.randn(args.d_sae, args.d_in, device=device), dim=-1)
        sae.W_dec.copy_(W)
        sae.W_enc.copy_(W.T)
        sae.b_dec.zero_()
        x = torch.randn(args.batch, args.d_in, device=device)
        pre = x @ W.T
        shift = 0.0 if args.active >= 0.5 else -float(torch.quantile(pre[:256].flatten().float(), 1 - args.active))
        sae.b_enc.fill_(shift)
        active = float((pre + shift > 0).float().mean())
    forward = sae.training_forward_pass
    if args.compile:
        forward = torch.compile(forward)
    opt = paper_optimizer(sae.parameters(), lr=1e-5)
    step_input = TrainStepInput(sae_in=x, coefficients={"l1": 0.003}, dead_neuron_mask=None,
                                n_training_steps=0, is_logging_step=False)
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=args.bf16)

    def step(phase=torch.profiler.record_function) -> None:
        """One step; `phase(name)` brackets each part (a profiler range that profile_step.py reports)."""
        with phase("step::forward"), autocast:
            out = forward(step_input)
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
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/statm") as f:
            base = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    for _ in range(args.warmup):
        step()
    sync()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times.sort()
    print(json.dumps({"ms": 1000 * times[len(times) // 2], "peak_bytes": peak, "active": active}))


def run_child(method: str, d_in: int, d_sae: int, args: argparse.Namespace, repeats: int, env=None) -> dict:
    cmd = [sys.executable, __file__, "--child", "--method", method, "--d-in", str(d_in), "--d-sae", str(d_sae),
           "--batch", str(args.batch), "--device", args.device, "--warmup", str(args.warmup),
           "--repeats", str(repeats), "--active", str(args.active)]
    cmd += ["--bf16"] * args.bf16 + ["--compile"] * args.compile
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--shapes", default="768:6144", help="comma list of D_IN:D_SAE (default 768:6144)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--repeats", type=int, default=3, help="timed steps per method (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="steps before timing (compile happens here)")
    p.add_argument("--rounds", type=int, default=1,
                   help="time every method this many times, interleaved, and take each ratio's median over the "
                        "rounds (a machine whose speed drifts hits both sides of a ratio alike)")
    p.add_argument("--active", type=float, default=0.5, help="fraction of positive pre-activations (0.5 = initialisation)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward pass")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--d-in", type=int, help=argparse.SUPPRESS)
    p.add_argument("--d-sae", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)

    import torch

    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        p.error(f"unknown methods {unknown}; expected some of {METHODS}")
    cuda = args.device.startswith("cuda")
    machine = torch.cuda.get_device_name() if cuda else f"{platform.machine()}, {os.cpu_count()} CPUs"
    print(f"# {args.device} ({machine}), torch {torch.__version__}; batch {args.batch}; bf16 {args.bf16}; "
          f"compile {args.compile}; active {args.active}; median of {args.repeats} steps after {args.warmup} warm-up")
    for shape in args.shapes.split(","):
        d_in, d_sae = (int(v) for v in shape.split(":"))
        rounds = [{m: run_child(m, d_in, d_sae, args, args.repeats) for m in methods} for _ in range(args.rounds)]
        results = {m: {**rounds[0][m], "ms": statistics.median(r[m]["ms"] for r in rounds)} for m in methods}
        if not cuda:  # the peak in a child of its own, under a fixed mmap threshold (module docstring)
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
            for m in methods:
                results[m]["peak_bytes"] = run_child(m, d_in, d_sae, args, 1, env)["peak_bytes"]
        print(f"\n## {d_in} -> {d_sae}, active fraction {results[methods[0]]['active']:.3f}")
        each = args.rounds > 1
        print("| method | ms / step | peak MiB |" + (" ms per round |" if each else ""))
        print("|---|---:|---:|" + ("---|" if each else ""))
        for m in methods:
            per_round = " " + " ".join(f"{r[m]['ms']:.0f}" for r in rounds) + " |" if each else ""
            print(f"| {m} | {results[m]['ms']:.0f} | {results[m]['peak_bytes'] / 2**20:.0f} |{per_round}")
        print()
        for a, b, name, target_init, target_trained in RATIOS:
            if a in results and b in results:
                target = target_init if args.active >= 0.5 else target_trained
                ratio = statistics.median(r[a]["ms"] / r[b]["ms"] for r in rounds)
                print(f"{name:<36}{ratio:>7.2f}  {'target ' + target if target else ''}")
        if "msae" in results and "msae_reference" in results:
            print(f"{'msae peak / reference peak':<36}{results['msae']['peak_bytes'] / results['msae_reference']['peak_bytes']:>7.2f}"
                  "  target <= 1")


if __name__ == "__main__":
    main()
