"""Data-parallel training: two gloo processes on the CPU, launched with torchrun's environment.

Each test starts its processes itself (``tests/distributed_worker.py`` with WORLD_SIZE, RANK, ...
as torchrun sets them, or the real ``torchrun`` for the command line) and compares what they wrote.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import SmallConvNet  # noqa: F401  (the worker's model)

from maestro_lod.data import load_data
from maestro_lod.training import TrainConfig, Trainer, load_checkpoint
from maestro_lod.training.distributed import Distributed, GlobalBatchSampler

HERE = Path(__file__).parent
WORKER = HERE / "distributed_worker.py"
TORCHRUN = Path(sys.executable).with_name("torchrun")
BASE = dict(model="small", data="digits", epochs=3, lr=0.05, lambda_gl=5e-3, eps_ps=0.2, bn_recal_batches=3)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int, world: int, port: int, timeout: float = 30) -> dict[str, str]:
    return {**os.environ, "WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "MAESTRO_LOD_DIST_TIMEOUT": str(timeout), "PYTHONPATH": str(HERE.parent / "src")}


def launch(tmp_path: Path, spec: dict, world: int = 2, limit: float = 90) -> tuple[list[int], list[str], list[dict]]:
    """Run ``world`` worker processes on ``spec``; their exit codes, stderr and outputs by rank."""
    out = tmp_path / f"out-{time.monotonic_ns()}"
    out.mkdir()
    spec_path = out / "spec.json"
    spec_path.write_text(json.dumps({**spec, "out": str(out)}))
    port = _port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(spec_path)], env=_env(r, world, port),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in range(world)]
    codes, errors = [], []
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=limit)
            codes.append(proc.returncode)
            errors.append(err)
    finally:
        for proc in procs:
            proc.kill()
    outputs = [json.loads(p.read_text()) if (p := out / f"rank{r}.json").is_file() else None for r in range(world)]
    return codes, errors, outputs


def test_the_global_batch_sampler_splits_each_single_process_batch_between_the_ranks():
    single = torch.Generator().manual_seed(3)
    loader = torch.utils.data.DataLoader(range(203), batch_size=20, shuffle=True, generator=single)
    expected = [b.tolist() for _ in range(2) for b in loader]  # two epochs
    shards = []
    for rank in (0, 1):  # as the trainer builds it: the loader's seed draw, then the permutation
        generator = torch.Generator().manual_seed(3)
        batches = GlobalBatchSampler(203, 10, 2, rank, generator)
        loader = torch.utils.data.DataLoader(range(203), batch_sampler=batches, generator=generator)
        shards.append([b.tolist() for _ in range(2) for b in loader])
    assert len(shards[0]) == len(expected) == 22
    assert [a + b for a, b in zip(*shards)] == expected
    sampler = GlobalBatchSampler(203, 10, 2, 1, torch.Generator())
    assert sampler.share(0) == 0.5 and sampler.share(10) == 1 / 3  # last global batch: 3 items, 2 + 1


def test_two_processes_stay_identical_after_every_epoch(tmp_path):
    codes, errors, (a, b) = launch(tmp_path, {"model": "conv", "config": BASE})
    assert codes == [0, 0], errors
    assert a["world_size"] == b["world_size"] == a["summary_world_size"] == 2
    assert len(a["epochs"]) == 3 and a["epochs"] == b["epochs"]  # ranks, weights, buffers, optimiser, sampler
    assert a["draws"] == b["draws"] and len(set(map(json.dumps, a["draws"]))) > 5  # same sub-model each step
    totals = [sum(e["ranks"].values()) for e in a["epochs"]]
    assert totals[-1] < totals[0]  # shrinking happened, identically


def test_two_processes_with_batch_b_match_one_process_with_batch_2b(tmp_path):
    config = dict(BASE, model="mlp", batch_size=32, epochs=2, eps_ps=0.05, lr=0.02)
    codes, errors, (two, _) = launch(tmp_path, {"model": "mlp", "config": config, "save": str(tmp_path / "two.st")})
    assert codes == [0, 0], errors
    sys.path.insert(0, str(HERE))
    from distributed_worker import mlp

    digits = load_data("digits", augment=False)
    torch.manual_seed(0)
    one = Trainer(mlp(), digits.train, digits.val, TrainConfig(**dict(config, batch_size=64)),
                  distributed=Distributed())
    one.fit()
    assert [h["ranks"] for h in one.history] == [e["ranks"] for e in two["epochs"]]
    for mine, theirs in zip(one.history, two["epochs"]):
        for key in ("train_loss", "val_loss", "val_accuracy"):  # float sums in another order: 1e-4 relative
            assert mine[key] == pytest.approx(theirs["record"][key], rel=1e-4, abs=1e-6), key
    saved = load_checkpoint(tmp_path / "two.st")["model"]
    for key, value in one.model.state_dict().items():
        assert torch.allclose(value, saved[key], rtol=1e-4, atol=1e-5), key


def test_a_killed_distributed_run_resumes_exactly_and_on_one_process(tmp_path):
    checkpoint = tmp_path / "epoch2.st"  # what rank 0 of a run killed during epoch 3 left
    codes, errors, (full, _) = launch(tmp_path, {"model": "conv", "config": BASE, "save_at": 2,
                                                 "save_to": str(checkpoint)})
    assert codes == [0, 0], errors
    codes, errors, (resumed, again) = launch(tmp_path, {"model": "conv", "config": BASE, "load": str(checkpoint)})
    assert codes == [0, 0], errors
    assert resumed["epochs"] == again["epochs"] == full["epochs"][2:]  # bit for bit, on both ranks

    digits = load_data("digits", augment=False)
    torch.manual_seed(0)  # the same checkpoint continues on a single process (no rank-specific state)
    single = Trainer(SmallConvNet(), digits.train, digits.val, TrainConfig(**BASE), distributed=Distributed())
    single.load_state_dict(load_checkpoint(checkpoint))
    assert single.epoch == 2 and single.history[-1]["ranks"] == full["epochs"][1]["ranks"]
    single.fit()
    assert single.epoch == 3


def test_a_process_that_dies_ends_the_run_with_an_error_not_a_hang(tmp_path):
    started = time.monotonic()
    codes, errors, outputs = launch(tmp_path, {"model": "mlp", "config": dict(BASE, model="mlp", epochs=1),
                                               "crash_rank": 1, "crash_step": 3}, limit=60)
    assert codes[1] == 3 and codes[0] == 2, errors
    assert time.monotonic() - started < 60
    last = errors[0].strip().splitlines()[-1]
    assert last.startswith("maestro-lod: rank 0: gradient all_reduce failed (a peer process died"), errors[0]
    assert outputs == [None, None]


def test_torchrun_cli_run_writes_once_records_world_size_and_resumes(tmp_path):
    out = tmp_path / "run"
    command = [str(TORCHRUN), "--nproc_per_node", "2", "--master_port", str(_port()), "-m", "maestro_lod", "train",
               "--model", "mlp", "--data", "digits", "--epochs", "2", "--batch-size", "64", "--out", str(out),
               "--quiet", "--reference", "none", "--dist-timeout", "30"]
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src")}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("run files:") == 1 and done.stdout.count("epoch 2/2") == 1  # rank 0 only
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs"] == 2
    assert not (out / ".maestro-lod.lock").exists()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
