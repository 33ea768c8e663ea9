"""Reused CPU memory for the large tensors a training step creates.

On CPU, torch takes each tensor's memory from glibc's malloc, which maps every block over 32 MiB
fresh from the kernel and unmaps it when the block is freed. So each step faults in every large
tensor page by page again. A (4096, 6144) float32 pre-activation buffer costs about 16 ms of page
faults, and a fused MSAE step makes five such tensors: the pre-activations, the ReLU, the
ranking, the levels and the activation gradient. CUDA's caching allocator keeps freed blocks for
the next request. `empty` does the same for those few CPU tensors: it returns a tensor on a
cached storage that nothing else references, or on a new storage it then caches.

A storage is free when its use count is the pool's own reference (the test torch's CUDA-graph
trees make, `torch._C._storage_Use_Count`) and no Python name holds the pool's storage object:
no tensor, view, autograd saved tensor or storage object may hold it. A tensor a caller keeps,
such as a step's `TrainStepOutput`, keeps its storage out of reuse for as long as it is kept.

Where it does not apply, `empty` is `torch.empty`:
- off CPU;
- below MIN_BYTES (glibc reuses small blocks itself);
- while torch.compile traces;
- with MSAE_BUFFER_POOL=0.

`release()` drops the cached storages; the trainer calls it when a run ends.
"""

from __future__ import annotations

import math
import os
import sys
import threading

import torch

ENV = "MSAE_BUFFER_POOL"

#: smaller tensors come from torch.empty: glibc keeps blocks under its mmap threshold for reuse
MIN_BYTES = 8 << 20
#: storages cached at most; past it the least recently used free one is dropped
MAX_STORAGES = 12

_lock = threading.Lock()
_storages: list[torch.UntypedStorage] = []  # least recently handed out first


def enabled() -> bool:
    return (os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "off", "no")
            and hasattr(torch._C, "_storage_Use_Count"))


def _python_refs(storage: torch.UntypedStorage) -> int:
    return sys.getrefcount(storage)


def _python_refs_of_a_listed_storage() -> int:
    """The Python reference count `_free` sees for a storage that only the pool's list holds: the
    list, the caller's loop variable, a parameter and getrefcount's argument."""
    listed = [torch.UntypedStorage(1)]
    for storage in listed:
        return _python_refs(storage)
    raise AssertionError


#: torch keeps one Python object per storage, so a caller who took `t.untyped_storage()` of a pooled
#: tensor holds the pool's own object: that adds to its Python reference count, not to its use count
_LISTED_REFS = _python_refs_of_a_listed_storage()


def _free(storage: torch.UntypedStorage) -> bool:
    """No tensor holds the storage and no Python name but the pool's list and the caller's loop
    variable (called as `for storage in _storages: _free(storage)`)."""
    return torch._C._storage_Use_Count(storage._cdata) == 1 and sys.getrefcount(storage) <= _LISTED_REFS


def empty(shape: tuple[int, ...] | list[int] | torch.Size, dtype: torch.dtype = torch.float32,
          device: torch.device | str = "cpu", slack: float = 0.0) -> torch.Tensor:
    """An uninitialised contiguous tensor, on reused memory where the pool applies (module docstring).

    slack: where a new storage is made, make it this fraction larger, so that a tensor whose
    shape varies a little between steps (the ranking's width follows the batch's largest count of
    positive pre-activations) finds it large enough the next time.
    """
    shape = tuple(int(s) for s in shape)
    nbytes = math.prod(shape) * dtype.itemsize
    if (torch.device(device).type != "cpu" or nbytes < MIN_BYTES or not enabled()
            or torch.compiler.is_compiling()):
        return torch.empty(shape, dtype=dtype, device=device)
    with _lock:
        fits = []
        for storage in _storages:
            if storage.nbytes() >= nbytes and _free(storage):
                fits.append(storage)
        if fits:
            storage = min(fits, key=lambda s: s.nbytes())
            _storages.remove(storage)
        else:
            storage = torch.UntypedStorage(int(nbytes * (1 + slack)), device="cpu")
            excess, drop = len(_storages) + 1 - MAX_STORAGES, []
            for cached in _storages:  # past the cap, free ones go, least recently used first
                if len(drop) >= excess:
                    break
                if _free(cached):
                    drop.append(cached)
            for cached in drop:
                _storages.remove(cached)
        _storages.append(storage)
        return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def empty_like(t: torch.Tensor) -> torch.Tensor:
    """`empty` with t's shape, dtype and device (contiguous)."""
    return empty(t.shape, t.dtype, t.device)


def release() -> None:
    """Drop the cached storages (those still in use live on with their tensors)."""
    with _lock:
        _storages.clear()


def cached_bytes() -> int:
    """Bytes held by the cached storages, in use or free."""
    with _lock:
        return sum(s.nbytes() for s in _storages)
