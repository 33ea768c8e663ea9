"""Compiled CPU kernels for the fused MSAE loss's gathered rank segments (csrc/nested_segments.cpp).

Built on first use with torch's JIT extension loader (a C++17 compiler and ninja, which is a
dependency of this package), with -O3 -march=native, into torch's extension cache
($TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions); later processes load the cached build.
The pure-PyTorch path in nested_topk.py computes the same thing and is used when the kernels are
unavailable: a failed build warns once, with the compiler's reason, and falls back.

MSAE_CPU_KERNELS=0 turns the kernels off; MSAE_CPU_KERNELS=require makes a failed build an error.
Each call shows in torch's profiler as `msae_ext::<function>` (benchmarks/profile_step.py).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).parent / "csrc" / "nested_segments.cpp"
ENV = "MSAE_CPU_KERNELS"

_lock = threading.Lock()
_loaded: dict[str, Labelled | None] = {}


class Labelled:
    """The compiled module, its functions called inside a `torch.profiler.record_function` range
    named `msae_ext::<function>`: a pybind call is otherwise invisible to the profiler, and its
    time lands on no op. The range costs a few microseconds a call, a handful of calls a step."""

    def __init__(self, module: ModuleType):
        self.module = module

    def __getattr__(self, name: str):
        fn = getattr(self.module, name)
        if not callable(fn):
            return fn
        label = f"msae_ext::{name}"

        def call(*args, **kwargs):
            with torch.profiler.record_function(label):
                return fn(*args, **kwargs)

        call.__name__ = call.__qualname__ = name
        call.__doc__ = fn.__doc__
        setattr(self, name, call)  # later look-ups skip __getattr__
        return call


def _cpu_tag() -> str:
    """-march=native builds are specific to the CPU: keep one build per CPU model and flag set."""
    ident = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            first = {}  # the first processor's model name and flags
            for line in f:
                key = line.split(":")[0].strip()
                if key in ("model name", "flags"):
                    first.setdefault(key, line)
        ident += "".join(first.values())
    except OSError:
        pass
    return hashlib.sha1(ident.encode()).hexdigest()[:10]


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def segment_kernels() -> Labelled | None:
    """The compiled module (labelled for the profiler), or None when turned off or not buildable
    here (warned once)."""
    if not enabled():
        return None
    with _lock:
        if "module" not in _loaded:
            module = _build()
            _loaded["module"] = None if module is None else Labelled(module)
        return _loaded["module"]


def kernels_for(*tensors: torch.Tensor) -> Labelled | None:
    """The compiled module when it applies to these operands (every one a contiguous float32 CPU
    tensor) and is on and built here, else None: the callers' PyTorch path then runs."""
    if any(t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous() for t in tensors):
        return None
    return segment_kernels()


def _ninja_on_path() -> None:
    """torch runs `ninja` from PATH; the ninja wheel's binary sits in the environment's bin folder,
    which is not on PATH when the interpreter is called by its path (.venv/bin/python)."""
    if shutil.which("ninja"):
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])


def _build() -> ModuleType | None:
    from torch.utils import cpp_extension

    _ninja_on_path()

    name = f"msae_nested_segments_{_cpu_tag()}"
    build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
    if not any(build_dir.glob(f"{name}*.so")):
        print(f"msae_ext: compiling the CPU segment kernels into {build_dir} (first use on this machine, "
              "about a minute)", file=sys.stderr, flush=True)
    try:
        return cpp_extension.load(
            name=name,
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            verbose=False,
        )
    except Exception as exc:  # noqa: BLE001  (any build failure: no compiler, no ninja, bad headers)
        if os.environ.get(ENV, "").strip().lower() == "require":
            raise RuntimeError(f"{ENV}=require, but the CPU segment kernels did not build: {exc}") from exc
        warnings.warn(f"msae_ext: the CPU segment kernels did not build ({type(exc).__name__}: "
                      f"{str(exc).strip()[-500:]}); the fused MSAE loss uses its PyTorch path instead "
                      f"(same results, slower). Set {ENV}=0 to skip the attempt.", RuntimeWarning, stacklevel=3)
        return None
