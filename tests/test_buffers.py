"""The CPU buffer pool: a storage is handed out again only when nothing references it, and training
steps give the same results with the pool on as with it off."""

from __future__ import annotations

import pytest
import torch
from sae_lens.saes.sae import TrainStepInput

from msae_ext.architectures import MSAETrainingSAE, MSAETrainingSAEConfig, buffers, cpu_kernels, nested_topk
from msae_ext.architectures.topk import TopKTrainingSAE, TopKTrainingSAEConfig


def storage_ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def test_storage_is_reused_only_when_unreferenced():
    a = buffers.empty((64, 8))
    held = storage_ptr(a)
    b = buffers.empty((64, 8))
    assert storage_ptr(b) != held  # a still holds its storage
    del a
    c = buffers.empty((16, 32), torch.int32)  # same bytes, another dtype and shape
    assert storage_ptr(c) == held and c.shape == (16, 32) and c.dtype == torch.int32 and c.is_contiguous()
    view = c[3:5]
    del c
    assert storage_ptr(buffers.empty((64, 8))) not in (held, storage_ptr(b))  # a view holds it too
    del view
    assert storage_ptr(buffers.empty((64, 8))) == held
    # a tensor autograd saved for backward holds its storage until the graph goes
    w = torch.ones(64, 8, requires_grad=True)
    saved = buffers.empty((64, 8)).fill_(2.0)
    loss = (w * saved).sum()  # saves `saved`
    del saved
    other = buffers.empty((64, 8)).fill_(-1.0)
    loss.backward()
    torch.testing.assert_close(w.grad, torch.full((64, 8), 2.0))
    del other, loss
    # so does a storage object taken from a pooled tensor (torch's one Python object per storage)
    buffers.release()
    d = buffers.empty((64, 8))
    s = d.untyped_storage()
    del d
    e = buffers.empty((64, 8))  # kept: d's storage is then the only one that can be free
    assert storage_ptr(e) != s.data_ptr()
    freed = s.data_ptr()
    del s
    assert storage_ptr(buffers.empty((64, 8))) == freed


def test_smaller_storage_is_not_reused_and_slack_makes_room(monkeypatch):
    a = buffers.empty((100,), slack=0.25)
    assert a.untyped_storage().nbytes() == 500
    ptr = storage_ptr(a)
    del a
    assert storage_ptr(buffers.empty((120,))) == ptr  # fits in the slack
    assert storage_ptr(buffers.empty((200,))) != ptr  # does not fit


def test_pool_holds_at_most_max_storages_and_release_drops_them(monkeypatch):
    monkeypatch.setattr(buffers, "MAX_STORAGES", 3)
    for n in range(1, 7):  # each larger than the last: no free storage fits
        buffers.empty((n * 100,))
    assert buffers.cached_bytes() == 4 * (400 + 500 + 600)
    buffers.release()
    assert buffers.cached_bytes() == 0


def test_where_the_pool_does_not_apply(monkeypatch):
    monkeypatch.setattr(buffers, "MIN_BYTES", 1 << 20)
    buffers.empty((1000,))  # 4000 bytes, under MIN_BYTES
    assert buffers.cached_bytes() == 0
    monkeypatch.setattr(buffers, "MIN_BYTES", 0)
    monkeypatch.setenv(buffers.ENV, "0")
    t = buffers.empty((10, 3), torch.int32)
    assert t.shape == (10, 3) and t.dtype == torch.int32 and buffers.cached_bytes() == 0
    monkeypatch.setenv(buffers.ENV, "1")
    buffers.empty((10, 3))
    assert buffers.cached_bytes() == 120


def _steps(sae, xs, keep_first: bool):
    """Training steps (forward, backward, SGD); the first step's outputs, and per step the loss and
    every gradient."""
    opt = torch.optim.SGD(sae.parameters(), lr=1e-2)
    first, record = None, []
    for i, x in enumerate(xs):
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={"k": 1.0}, dead_neuron_mask=None,
                                                       n_training_steps=i, is_logging_step=False))
        out.loss.backward()
        record.append([out.loss.detach().clone()] + [p.grad.clone() for p in sae.parameters()])
        if keep_first and i == 0:
            first = out
        opt.step()
        opt.zero_grad(set_to_none=True)
        del out
    return first, record


@pytest.mark.parametrize("arch", ["msae-gathered", "msae-segments", "topk"])
def test_training_steps_equal_with_the_pool_on_and_off(arch, monkeypatch):
    """Bit for bit, over three steps, while the first step's outputs are kept and must not change;
    the later steps reuse memory."""
    if arch.startswith("msae"):
        if cpu_kernels.segment_kernels() is None:
            pytest.skip("the CPU segment kernels did not build here")
        monkeypatch.setattr(nested_topk, "LAYOUT", arch.split("-")[1])
    torch.manual_seed(0)
    xs = [torch.randn(96, 24) for _ in range(3)]

    def make():
        torch.manual_seed(1)
        if arch.startswith("msae"):  # about half the latents active: levels 8-32 partial, 128 full
            return MSAETrainingSAE(MSAETrainingSAEConfig(d_in=24, d_sae=128, k_list=[8, 16, 32, 128]))
        return TopKTrainingSAE(TopKTrainingSAEConfig(d_in=24, d_sae=128, k=8))

    monkeypatch.setenv(buffers.ENV, "0")
    _, off = _steps(make(), xs, keep_first=False)
    monkeypatch.setenv(buffers.ENV, "1")
    buffers.release()
    _steps(make(), xs[:1], keep_first=False)
    one_step = len(buffers._storages)
    buffers.release()
    first, on = _steps(make(), xs, keep_first=True)
    # pre, ReLU, ranking, levels and (gathered full level) dz; TopK: pre
    assert one_step >= {"msae-gathered": 5, "msae-segments": 4, "topk": 1}[arch]
    assert len(buffers._storages) <= 2 * one_step  # step 1's are kept; steps 2 and 3 share theirs
    for a, b in zip(off, on):
        for u, v in zip(a, b):
            assert torch.equal(u, v)
    # the kept outputs of step 1 equal a fresh recomputation from the same weights and input
    ref_first, _ = _steps(make(), xs[:1], keep_first=True)
    for name in ("hidden_pre", "feature_acts", "sae_out"):
        assert torch.equal(getattr(first, name), getattr(ref_first, name)), name
