"""Shared helpers for the test-suite."""

import pytest
import torch
from torch import nn

from maestro_lod.data import load_data
from maestro_lod.inject import LAYER_HANDLERS
from maestro_lod.training import TrainConfig


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ computed in float64."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def registry_restored():
    """Layer handlers registered by a test are removed afterwards (the registry is process-wide)."""
    before = dict(LAYER_HANDLERS)
    yield
    LAYER_HANDLERS.clear()
    LAYER_HANDLERS.update(before)


@pytest.fixture(scope="session")
def digits():
    """The embedded 8×8 digits task (1,797 images), loaded once per test session."""
    return load_data("digits")


class SmallConvNet(nn.Module):
    """Conv-BN-ReLU ×2 and a two-layer head: exercises BatchNorm recalibration and conv factors."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.pool = nn.MaxPool2d(2)
        self.fc1, self.fc2 = nn.Linear(16 * 4, 32), nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        x = self.pool(x).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


TIME_KEYS = ("train_time", "epoch_time")
"""Record fields that measure wall time: the only ones a resumed run may differ in."""


def resume_matches_uninterrupted(make_trainer, checkpoint, after_epochs: int = 2):
    """Train one trainer to the end; train a second for ``after_epochs`` epochs, save its checkpoint
    to ``checkpoint``, then build a third in a process whose global RNGs were moved on, load the
    checkpoint and finish. Asserts equal weights and equal histories (times aside); returns
    ``(uninterrupted, resumed)`` for further checks."""
    from maestro_lod.training import load_checkpoint, save_checkpoint

    full = make_trainer()
    full.fit()
    interrupted = make_trainer()
    for _ in range(after_epochs):
        interrupted.train_epoch()
    save_checkpoint(checkpoint, interrupted.state_dict())
    del interrupted
    torch.manual_seed(123)  # the resumed process starts from unrelated global RNG states
    resumed = make_trainer()
    resumed.load_state_dict(load_checkpoint(checkpoint))
    resumed.fit()
    assert full.model.state_dict().keys() == resumed.model.state_dict().keys()
    for key, value in full.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    strip = [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in full.history]
    assert [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in resumed.history] == strip
    return full, resumed


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: small models train several times faster on one thread
    than on two cores that other work shares (bfloat16 backward passes up to 8x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


ONE_STEP_LR = 0.5
"""The learning rate of :func:`one_step_config`: large, so one SGD step moves every parameter visibly."""


def digits_mlp() -> nn.Module:
    """A small MLP for the 8×8 digits, with the same initial weights every call."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 10))


def one_step_config(**changes):
    """A TrainConfig whose step can be written out by hand: plain SGD at :data:`ONE_STEP_LR`, no
    group lasso or shrinking, no augmentation, a constant rate and the paper's single-layer sampler."""
    options = dict(epochs=1, batch_size=64, lr=ONE_STEP_LR, momentum=0.0, lambda_gl=0.0, eps_ps=0.0, augment=False,
                   schedule="constant", sampler="single")
    return TrainConfig.from_dict({**options, **changes})
