"""Prefix reuse replays the outermost modules that finished before the first changed layer, with
outputs identical to a plain forward; the greedy search scores on the leading calibration batches
that hold ``scoring_positions`` target positions."""

import pytest
import torch
from torch import nn

import maestro_lod as ml
from maestro_lod.data import IGNORE_INDEX
from maestro_lod.deploy import calibration_loss, greedy_front
from maestro_lod.engine.reuse import PrefixReuse
from maestro_lod.engine.search import scoring_batches
from maestro_lod.errors import ConfigError


class Block(nn.Module):
    """A residual block whose forward does work outside its submodules (the addition)."""

    def __init__(self, width):
        super().__init__()
        self.inner = nn.Linear(width, width)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x + torch.tanh(self.inner(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = Block(12), Block(12)
        self.shared = nn.Linear(12, 12)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        return self.head(self.shared(self.second(self.shared(self.first(x)))))


def _model():
    torch.manual_seed(0)
    return ml.factorize(Net()).eval()


def _recorded():
    """A model, an input and a PrefixReuse holding the record of one forward on it."""
    model, x = _model(), torch.randn(3, 12)
    reuse = PrefixReuse(model)
    with torch.no_grad(), reuse.recording():
        model(x)
    return model, x, reuse


def test_whole_blocks_are_replayed_and_outputs_are_unchanged(one_thread):
    model = _model()
    x = torch.randn(7, 12)
    reuse = PrefixReuse(model)
    for changed, replayed in ((model.second.inner, [model.first, model.shared]),
                              (model.head, [model.first, model.shared, model.second, model.shared]),
                              (model.first.inner, [])):
        with torch.no_grad(), reuse.recording():
            model(x)
        assert [m for m, _ in reuse.prefix({changed})] == replayed  # the blocks, not their insides
        changed.active_rank = 2
        with torch.no_grad():
            expected = model(x)
            before = (model.first.calls, model.second.calls)
            with reuse.replaying({changed}) as count:
                got = model(x)
        assert count == len(replayed)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        assert model.first.calls - before[0] == (0 if model.first in replayed else 1)
        assert model.second.calls - before[1] == (0 if model.second in replayed else 1)
        changed.active_rank = None


def test_a_shared_module_replays_only_its_calls_before_the_change(one_thread):
    model, x, reuse = _recorded()
    model.second.inner.active_rank = 1  # between the two calls of `shared`: its second call computes
    with torch.no_grad():
        expected = model(x)
        with reuse.replaying({model.second.inner}, keep=True):
            got = model(x)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        with reuse.replaying({model.second.inner}):  # kept: replayed once more, then released
            again = model(x)
    torch.testing.assert_close(again, expected, rtol=0, atol=0)
    assert reuse.prefix({model.head}) == []  # released


def test_the_first_of_several_changed_layers_ends_the_prefix(one_thread):
    model, x, reuse = _recorded()
    assert [m for m, _ in reuse.prefix({model.head, model.second.inner})] == [model.first, model.shared]
    assert reuse.prefix({model.head, model.first.inner}) == []
    assert reuse.prefix({model.head, nn.Linear(2, 2)}) == []  # a layer never called: no position known


def _lm_batches(lengths):
    torch.manual_seed(1)
    batches = []
    for ignored in lengths:
        targets = torch.randint(0, 5, (4, 8))
        targets.view(-1)[:ignored] = IGNORE_INDEX
        batches.append((torch.randn(4, 8, 12), targets))
    return batches


def test_scoring_batches_count_target_positions():
    batches = _lm_batches([0, 10, 0])  # 32, 22 and 32 positions
    assert scoring_batches(batches, 32) == batches[:1]
    assert scoring_batches(batches, 33) == batches[:2]
    assert scoring_batches(batches, 55) == batches
    assert scoring_batches(batches, 10_000) == batches and scoring_batches(batches, None) == batches
    for bad in (0, -3, 1.5, True):
        with pytest.raises(ConfigError, match="scoring_positions"):
            scoring_batches(batches, bad)


class TokenModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(12, 16), nn.Linear(16, 5)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_the_search_scores_on_the_leading_batches_only(one_thread):
    torch.manual_seed(2)
    model = ml.factorize(TokenModel()).eval()
    batches = _lm_batches([0, 0, 0, 0])
    scored = greedy_front(model, batches, "params", scoring_positions=64)
    everything = greedy_front(model, batches, "params", scoring_positions=None)
    assert scored.points[0].calibration_loss == pytest.approx(calibration_loss(model, batches[:2]), rel=1e-12)
    assert everything.points[0].calibration_loss == pytest.approx(calibration_loss(model, batches), rel=1e-12)
    assert scored.points[0].calibration_loss != pytest.approx(everything.points[0].calibration_loss, rel=1e-9)
