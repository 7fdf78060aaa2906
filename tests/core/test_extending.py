"""The extension guide (docs/extending.md) runs as written: each section's example registers a
method, a sampler, or a dataset and a model, and what it registers works through the trainer and
the command line. Registrations are removed again after each test."""

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Subset

import maestro_lod as ml
from maestro_lod import cli
from maestro_lod.data import DATASETS
from maestro_lod.models import MODELS
from maestro_lod.sampling import SAMPLERS
from maestro_lod.training import METHODS, TrainConfig, Trainer

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "extending.md"


def _example(section: str) -> str:
    """The Python code block of the guide's section titled ``section``."""
    text = GUIDE.read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", body, re.S).group(1)


@pytest.fixture
def registered():
    """Runs examples and removes what they registered afterwards."""
    before = {registry.kind: set(registry) for registry in (METHODS, SAMPLERS, DATASETS, MODELS)}

    def run(section: str, **names) -> dict:
        namespace = dict(names)
        exec(compile(_example(section), f"{GUIDE.name}: {section}", "exec"), namespace)
        return namespace

    yield run
    for registry in (METHODS, SAMPLERS, DATASETS, MODELS):
        for name in set(registry) - before[registry.kind]:
            del registry[name]


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def test_a_registered_method_runs_in_the_trainer_and_is_a_config_choice(registered, digits):
    small = Subset(digits.train, range(256))
    namespace = registered("Adding a training method", model=_mlp(), train_data=small, val_data=small)
    assert namespace["result"].summary["method"] == "maestro-late-shrink"
    run = ml.training.fit(_mlp(), small, small, TrainConfig.from_dict(dict(method="maestro-late-shrink", epochs=2, eps_ps=1e5)))
    initial = sum(run.summary["initial_ranks"].values())
    assert run.history[0]["total_rank"] == initial  # MAESTRO itself would cut them to 1 after epoch 1
    assert run.history[1]["total_rank"] == len(run.summary["initial_ranks"])  # cut in the second half
    assert run.history[-1]["phase"] == "maestro"


def test_a_registered_sampler_is_a_config_value(registered, digits):
    registered("Adding a rank sampler")
    small = Subset(digits.train, range(64))
    trainer = Trainer(ml.factorize(_mlp()), small, small, TrainConfig.from_dict(dict(epochs=1, sampler="common-fraction")))
    assert type(trainer.sampler).__name__ == "CommonFractionSampler"
    layers = list(ml.low_rank_layers(trainer.model))
    for _ in range(5):
        draw = trainer.sampler.draw(layers)
        fractions = {rank / dict(layers)[name].rank for name, rank in draw.items()}
        assert len(draw) == len(layers) and max(fractions) - min(fractions) < 0.1
    trainer.train_epoch()


def test_a_registered_dataset_and_model_run_through_the_command_line(registered, tmp_path, capsys):
    registered("Adding a dataset or a model")
    out = tmp_path / "parity"
    code = cli.main(["train", "--data", "parity", "--model", "wide-mlp", "--model-option", "width=64",
                     "--epochs", "1", "--out", str(out), "--quiet", "--reference", "none"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"] == "parity" and summary["dense_params"] == 12 * 64 + 64 + 64 * 2 + 2
    assert torch.is_tensor(DATASETS["parity"](None).train[0][0])
