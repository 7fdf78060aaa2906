"""Data-parallel training: two gloo processes on the CPU, launched with torchrun's environment.

Each test starts its processes itself (``tests/distributed_worker.py`` or ``maestro-lod train`` with
WORLD_SIZE, RANK, ... as torchrun sets them, or the command line under the real ``torchrun``) and
compares what they wrote.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TIME_KEYS

from maestro_lod import cli
from maestro_lod.data import load_data
from maestro_lod.errors import ConfigError
from maestro_lod.training import TrainConfig, Trainer, load_checkpoint
from maestro_lod.training.distributed import Distributed, GlobalBatchSampler, choose_backend

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
            "MAESTRO_LOD_DIST_TIMEOUT": str(timeout), "PYTHONPATH": str(HERE.parents[1] / "src")}


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


def test_the_backend_is_nccl_only_for_a_cuda_run_where_cuda_is_present():
    assert choose_backend("cuda", cuda_available=True) == "nccl"
    assert choose_backend("cuda", cuda_available=False) == "gloo"
    assert choose_backend("cpu", cuda_available=True) == "gloo"
    assert choose_backend("cpu", cuda_available=False) == "gloo"


def test_config_json_of_a_plain_run_records_one_process_and_reads_back(tmp_path, capsys):
    out = tmp_path / "plain"
    assert cli.main(["train", "--model", "mlp", "--data", "digits", "--epochs", "1", "--quiet", "--reference", "none",
                     "--out", str(out)]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["world_size"] == 1
    assert TrainConfig.from_dict(saved).to_dict() == saved  # what --resume, compress and bench read back
    with pytest.raises(ConfigError, match="world_size=0 must be an int >= 1"):
        TrainConfig(world_size=0)

    toml = tmp_path / "three.toml"
    toml.write_text('model = "mlp"\ndata = "digits"\nworld_size = 3\n')
    capsys.readouterr()
    assert cli.main(["train", "--config", str(toml), "--quiet", "--out", str(tmp_path / "three")]) == 2
    assert capsys.readouterr().err.strip() == (
        "maestro-lod: error: world_size=3 in the options, but 1 process(es) were started; world_size records the "
        "launch, so leave it out or start 3 processes with torchrun")
    assert not (tmp_path / "three").exists()


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
    one = Trainer(mlp(), digits.train, digits.val, TrainConfig.from_dict(dict(config, batch_size=64)),
                  distributed=Distributed())
    one.fit()
    assert [h["ranks"] for h in one.history] == [e["ranks"] for e in two["epochs"]]
    for mine, theirs in zip(one.history, two["epochs"]):
        for key in ("train_loss", "val_loss", "val_accuracy"):  # float sums in another order: 1e-4 relative
            assert mine[key] == pytest.approx(theirs["record"][key], rel=1e-4, abs=1e-6), key
    saved = load_checkpoint(tmp_path / "two.st")["model"]
    for key, value in one.model.state_dict().items():
        assert torch.allclose(value, saved[key], rtol=1e-4, atol=1e-5), key


def test_a_process_that_dies_ends_the_run_with_an_error_not_a_hang(tmp_path):
    started = time.monotonic()
    codes, errors, outputs = launch(tmp_path, {"model": "mlp", "config": dict(BASE, model="mlp", epochs=1),
                                               "crash_rank": 1, "crash_step": 3}, limit=60)
    assert codes[1] == 3 and codes[0] == 2, errors
    assert time.monotonic() - started < 60
    last = errors[0].strip().splitlines()[-1]
    assert last.startswith("maestro-lod: rank 0: gradient all_reduce failed (a peer process died"), errors[0]
    assert outputs == [None, None]


CLI_RUN = ["train", "--model", "mlp", "--data", "digits", "--epochs", "3", "--batch-size", "64", "--no-augment",
           "--lambda-gl", "5e-3", "--eps-ps", "0.2", "--quiet", "--reference", "none", "--dist-timeout", "30"]


def _lines(path: Path) -> list[dict]:
    """metrics.jsonl without the wall times (the only fields a resumed run may differ in)."""
    return [{k: v for k, v in json.loads(line).items() if k not in TIME_KEYS} for line in path.read_text().splitlines()]


def _same_state(a: dict, b: dict, where: str = "") -> None:
    """Two checkpoint states equal bit for bit: every tensor and value, the epochs' wall times aside."""
    assert a.keys() == b.keys(), where
    for key in a:
        if key == "history":
            assert [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in a[key]] == \
                [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in b[key]]
        elif isinstance(a[key], dict):
            _same_state(a[key], b[key], f"{where}.{key}")
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), f"{where}.{key}"
        else:
            assert a[key] == b[key], f"{where}.{key}"


def test_a_killed_torchrun_run_resumes_exactly_on_two_processes_and_continues_on_one(tmp_path, capsys):
    env = {**os.environ, "PYTHONPATH": str(HERE.parents[1] / "src")}
    full = tmp_path / "full"  # uninterrupted, under the real torchrun
    done = subprocess.run([str(TORCHRUN), "--nproc_per_node", "2", "--master_port", str(_port()), "-m", "maestro_lod",
                           *CLI_RUN, "--out", str(full)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("run files:") == 1 and done.stdout.count("epoch 3/3") == 1  # rank 0 only
    assert json.loads((full / "summary.json").read_text())["world_size"] == 2
    assert json.loads((full / "config.json").read_text())["world_size"] == 2
    assert not (full / ".maestro-lod.lock").exists()

    # the same run, SIGKILLed as soon as its first checkpoint is on disk. The ranks are started
    # with torchrun's environment directly: torchrun puts its workers in sessions of their own,
    # where a kill of torchrun would not reach them.
    killed, port = tmp_path / "killed", _port()
    ranks = [subprocess.Popen([sys.executable, "-m", "maestro_lod", *CLI_RUN, "--out", str(killed)],
                              env=_env(r, 2, port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for r in range(2)]
    try:
        deadline = time.monotonic() + 120
        while not (killed / "checkpoint.safetensors").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        for rank in ranks:
            rank.send_signal(signal.SIGKILL)
    assert [rank.wait(timeout=30) for rank in ranks] == [-signal.SIGKILL] * 2  # killed, not finished
    assert not (killed / "summary.json").exists()
    kept = load_checkpoint(killed / "checkpoint.safetensors")  # the last good checkpoint is whole
    assert kept["epoch"] in (1, 2)
    history = [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in kept["history"]]
    assert history == _lines(full / "metrics.jsonl")[:kept["epoch"]]
    if (killed / "metrics.jsonl").exists():  # written after the checkpoint, so the kill may beat it
        assert _lines(killed / "metrics.jsonl") in (history, history[:-1])  # never ahead of the checkpoint
    on_one = tmp_path / "on-one"
    shutil.copytree(killed, on_one)

    port = _port()
    ranks = [subprocess.Popen([sys.executable, "-m", "maestro_lod", "train", "--resume", str(killed), "--quiet"],
                              env=_env(r, 2, port), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    errors = [rank.communicate(timeout=120)[1] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], errors
    assert _lines(killed / "metrics.jsonl") == _lines(full / "metrics.jsonl")
    _same_state(load_checkpoint(killed / "checkpoint.safetensors"), load_checkpoint(full / "checkpoint.safetensors"))
    assert (killed / "config.json").read_text() == (full / "config.json").read_text()

    # the same checkpoint continues on one plain process, which the run's files record
    assert cli.main(["train", "--resume", str(on_one), "--quiet"]) == 0
    assert "continuing a run of 2 process(es) on 1: the global batch is now 64 (it was 128)" in capsys.readouterr().out
    assert json.loads((on_one / "config.json").read_text())["world_size"] == 1
    assert json.loads((on_one / "summary.json").read_text())["world_size"] == 1
    history = _lines(on_one / "metrics.jsonl")
    assert len(history) == 3 and history[:kept["epoch"]] == _lines(full / "metrics.jsonl")[:kept["epoch"]]
