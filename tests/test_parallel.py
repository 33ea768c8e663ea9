"""Several SAEs per data pass, the device-resident data path, and torchrun data parallelism."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from msae_ext.config import TrainConfig, load_config
from msae_ext.store import BatchStream, ResidentBatches, open_embeddings
from msae_ext.train import _Interrupt, train, train_many


def base_config(train_path, **kw):
    d = dict(train_data=str(train_path), batch_size=64, epochs=2, eval_every=0, final_eval=False,
             checkpoint_every=10, dead_feature_window=5, expansion_factor=4)
    d.update(kw)
    return d


MEMBERS = [
    {"name": "msae_rw", "architecture": "msae", "k_min": 4, "seed": 1},
    {"name": "msae_uw_cap", "architecture": "msae", "k_list": [4, 16, 32], "weighting": "uw", "soft_cap": 2.0,
     "expansion_factor": 2, "seed": 2},
    {"name": "topk", "architecture": "topk", "k": 8, "seed": 3, "lr": 1e-3},
    {"name": "relu", "architecture": "relu", "seed": 4},
]


def weights(folder):
    return load_file(str(folder / "sae_weights.safetensors"))


def test_several_saes_per_pass_equal_separate_runs(tmp_path, embeddings):
    train_path, _, _ = embeddings
    cfg = TrainConfig.from_dict(base_config(train_path, saes=MEMBERS, seed=9))
    results = train_many(cfg, tmp_path / "multi", progress=False)
    assert [r.out_dir.name for r in results] == [m["name"] for m in MEMBERS]
    for member in MEMBERS:
        folder = tmp_path / "multi" / member["name"]
        # the member's own saved config, run alone, gives the same weights bit for bit
        alone = train(load_config(folder / "train_config.yaml"), tmp_path / f"alone_{member['name']}", progress=False)
        a, b = weights(folder), weights(alone.out_dir)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (member["name"], key)
        assert (folder / "checkpoints").is_dir() and (folder / "training_log.jsonl").exists()
    # the data order is the run's (seed 9) although each member has its own init seed
    assert load_config(tmp_path / "multi" / "topk" / "train_config.yaml").data_seed == 9


def test_multi_run_resumes_to_the_same_weights(tmp_path, embeddings):
    train_path, _, _ = embeddings
    cfg = TrainConfig.from_dict(base_config(train_path, saes=MEMBERS[:2], epochs=3, checkpoint_every=7))
    train_many(cfg, tmp_path / "full", progress=False)
    with pytest.raises(_Interrupt):
        train_many(cfg, tmp_path / "cut", progress=False, stop_after_steps=45)
    resumed = train_many(cfg, tmp_path / "cut", progress=False)
    assert all(r.resumed_from is not None and r.resumed_from.name == "step_000000042" for r in resumed)
    for m in MEMBERS[:2]:
        a, b = weights(tmp_path / "full" / m["name"]), weights(tmp_path / "cut" / m["name"])
        for key in a:
            assert torch.equal(a[key], b[key]), (m["name"], key)


def test_multi_config_errors_name_the_problem(embeddings):
    train_path, _, _ = embeddings
    with pytest.raises(ValueError, match=r"sets \['batch_size'\], which all SAEs of one run share"):
        TrainConfig.from_dict(base_config(train_path, saes=[{"batch_size": 32}]))
    with pytest.raises(ValueError, match="name 'a' is used twice"):
        TrainConfig.from_dict(base_config(train_path, saes=[{"name": "a"}, {"name": "a", "k": 3}]))
    with pytest.raises(ValueError, match="unknown config key"):
        TrainConfig.from_dict(base_config(train_path, saes=[{"kk": 3}]))
    with pytest.raises(ValueError, match="use train_many"):
        train(TrainConfig.from_dict(base_config(train_path, saes=[{}])), "unused")


def test_resident_batches_equal_the_stream(embeddings):
    train_path, _, _ = embeddings
    stream = BatchStream(open_embeddings(train_path), 96, seed=5, chunk_rows=100, buffer_rows=300)
    resident = ResidentBatches(stream, "cpu")
    for epoch in (0, 3):
        for start in (0, 7):
            a = list(stream.epoch_batches(epoch, start))
            b = list(resident.epoch_batches(epoch, start))
            assert len(a) == len(b) == stream.batches_per_epoch - start
            for x, y in zip(a, b):
                assert torch.equal(x, y)


def test_resident_data_path_trains_the_same_weights(tmp_path, embeddings):
    train_path, _, _ = embeddings
    a = train(TrainConfig.from_dict(base_config(train_path, data_on_device=True, k_min=8)), tmp_path / "a",
              progress=False)
    b = train(TrainConfig.from_dict(base_config(train_path, data_on_device=False, k_min=8)), tmp_path / "b",
              progress=False)
    for key, value in weights(a.out_dir).items():
        assert torch.equal(value, weights(b.out_dir)[key])


def _torchrun(config, out, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "msae_ext.cli", "train", str(config), "--out", str(out), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return cmd, env


@pytest.mark.slow
def test_torchrun_two_processes_equal_one_process(tmp_path, embeddings):
    """DDP on CPU (gloo): each of 2 ranks trains on half of every batch; the result is the one-process run."""
    train_path, _, _ = embeddings
    d = base_config(train_path, saes=[MEMBERS[0], MEMBERS[3]], epochs=2, checkpoint_every=8)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(d))
    cmd, env = _torchrun(config, tmp_path / "ddp")
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    single = train_many(TrainConfig.from_dict(d), tmp_path / "single", progress=False)
    for r in single:
        a, b = weights(tmp_path / "ddp" / r.out_dir.name), weights(r.out_dir)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    assert (tmp_path / "ddp" / "multi_state.json").exists()

    # kill a longer two-process run after its first checkpoint; the same command finishes it
    d_long = {**d, "epochs": 8}
    config_long = tmp_path / "long.yaml"
    config_long.write_text(yaml.safe_dump(d_long))
    killed = tmp_path / "killed"
    cmd, env = _torchrun(config_long, killed)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (killed / "multi_state.json").exists():
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = json.loads((killed / "multi_state.json").read_text())["step"]
    assert 0 < killed_at < 8 * 32  # killed mid-run
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "resumed from" in res.stdout
    single = train_many(TrainConfig.from_dict(d_long), tmp_path / "single_long", progress=False)
    for r in single:
        a, b = weights(killed / r.out_dir.name), weights(r.out_dir)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
