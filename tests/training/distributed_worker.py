"""One process of the distributed tests: ``python distributed_worker.py SPEC.json`` with the
environment torchrun sets (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)."""

import hashlib
import json
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for conftest
from conftest import SmallConvNet  # noqa: E402

from maestro_lod.data import load_data  # noqa: E402
from maestro_lod.training import Callback, TrainConfig, Trainer, save_checkpoint  # noqa: E402
from maestro_lod.training.distributed import DistributedError  # noqa: E402


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().double().contiguous().numpy().tobytes())
    return h.hexdigest()


class Record(Callback):
    """After every epoch: the ranks, a hash of every parameter, buffer and optimiser tensor, the
    sampler's generator state; every step: the draw of the sampled pass."""

    def __init__(self):
        self.epochs, self.draws = [], []

    def on_step_end(self, trainer, step, metrics):
        self.draws.append(getattr(trainer._step, "passes", [{}])[-1])

    def on_epoch_end(self, trainer, record):
        opt = [v for s in trainer.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        self.epochs.append({"ranks": record["ranks"], "params": digest(trainer.model.parameters()),
                            "buffers": digest(trainer.model.buffers()), "optimizer": digest(opt),
                            "sampler": digest([trainer.sampler.generator.get_state()]),
                            "record": {k: v for k, v in record.items() if not k.endswith("_time")}})


class Crash(Callback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, step, metrics):
        if step == self.step:
            os._exit(3)  # a peer that dies without a word


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 10))


def main(spec_path):
    spec = json.loads(open(spec_path).read())
    rank = int(os.environ.get("RANK", "0"))
    data = load_data("digits", augment=False)  # augmentation draws from each process's own RNG
    torch.manual_seed(0)
    model = SmallConvNet() if spec.get("model") == "conv" else mlp()
    record = Record()
    callbacks = [record]
    if spec.get("crash_rank") == rank:
        callbacks.append(Crash(spec["crash_step"]))
    trainer = Trainer(model, data.train, data.val, TrainConfig.from_dict(spec["config"]), callbacks=callbacks)
    try:
        for _ in range(trainer.config.epochs):
            record.on_epoch_end(trainer, trainer.train_epoch())
    except DistributedError as exc:  # as maestro-lod train does: one line, then exit 2 without tearing the
        print(f"maestro-lod: {exc}", file=sys.stderr, flush=True)  # broken process group down
        os._exit(2)
    trainer.close()
    if spec.get("save") and trainer.distributed.is_main:
        save_checkpoint(spec["save"], trainer.state_dict())
    out = {"world_size": trainer.distributed.world_size, "epochs": record.epochs, "draws": record.draws,
           "summary_world_size": trainer.summary()["world_size"], "comm_time": trainer.distributed.comm_time}
    with open(os.path.join(spec["out"], f"rank{rank}.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(sys.argv[1])
