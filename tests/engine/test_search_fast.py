"""Fast fronts: rank allocation without search, the lazy greedy search, targets that stop a
search, and progress reports."""

import copy
import itertools
import random

import pytest
import torch
from torch import nn

import maestro_lod as ml
from maestro_lod.deploy import calibration_batches, calibration_loss, greedy_front, materialize
from maestro_lod.engine.allocate import (knapsack, lagrangian_path, layer_moments, spectrum_errors,
                                         truncation_errors)
from maestro_lod.engine.search import SearchStatus, allocated_front
from maestro_lod.errors import ConfigError
from maestro_lod.layers import low_rank_layers

from conftest import SmallConvNet


def _problem(seed, layers=3, options=4, top=9):
    rng = random.Random(seed)
    costs = [[rng.randint(0, top) for _ in range(rng.randint(1, options))] for _ in range(layers)]
    errors = [[rng.random() * 10 for _ in c] for c in costs]
    return costs, errors


def _combinations(costs, errors):
    for combo in itertools.product(*[range(len(c)) for c in costs]):
        yield (list(combo), sum(c[k] for c, k in zip(costs, combo)), sum(e[k] for e, k in zip(errors, combo)))


@pytest.mark.parametrize("seed", range(30))
def test_knapsack_equals_brute_force(seed):
    costs, errors = _problem(seed, layers=random.Random(seed).randint(1, 4))
    budgets = list(range(-1, sum(max(c) for c in costs) + 2))
    for budget, choice in zip(budgets, knapsack(costs, errors, budgets)):
        feasible = [e for _, c, e in _combinations(costs, errors) if c <= budget]
        if not feasible:
            assert choice is None
            continue
        assert sum(c[k] for c, k in zip(costs, choice)) <= budget
        assert sum(e[k] for e, k in zip(errors, choice)) == pytest.approx(min(feasible), abs=1e-12)


def test_knapsack_on_a_coarse_grid_stays_within_budget():
    costs, errors = _problem(0, layers=4, options=6, top=10_000)
    budgets = [5_000, 12_000, 20_000]
    answers = knapsack(costs, errors, budgets, cells=50)
    assert any(choice is not None for choice in answers)
    for budget, choice in zip(budgets, answers):
        if choice is None:
            assert sum(min(c) for c in costs) > budget
        else:
            assert sum(c[k] for c, k in zip(costs, choice)) <= budget


def _lower_hull_value(points, cost):
    """The lower convex envelope of ``points`` (cost, error) at ``cost``."""
    best = min(e for c, e in points if c == cost) if any(c == cost for c, _ in points) else float("inf")
    for (c1, e1), (c2, e2) in itertools.combinations(points, 2):
        if min(c1, c2) < cost < max(c1, c2):
            best = min(best, e1 + (e2 - e1) * (cost - c1) / (c2 - c1))
    return best


@pytest.mark.parametrize("seed", range(15))
def test_lagrangian_points_lie_on_the_convex_hull(seed):
    costs, errors = _problem(seed, layers=3, options=5)
    everything = [(c, e) for _, c, e in _combinations(costs, errors)]
    path = lagrangian_path(costs, errors)
    totals = [(sum(c[k] for c, k in zip(costs, p)), sum(e[k] for e, k in zip(errors, p))) for p in path]
    assert totals[0][1] == pytest.approx(min(e for _, e in everything))  # least error first
    assert totals[-1][0] == min(c for c, _ in everything)  # the cheapest last
    for (c, e), (c_next, e_next) in zip(totals, totals[1:]):
        assert c_next < c and e_next >= e - 1e-12
    for c, e in totals:  # on the lower convex envelope of every combination
        assert e == pytest.approx(_lower_hull_value(everything, c), abs=1e-9)
    for before, after in zip(path, path[1:]):  # one layer changes at a time
        assert sum(a != b for a, b in zip(before, after)) == 1


class TwoLayers(nn.Module):
    def __init__(self, width=24, classes=6, depth=2):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(width, width) for _ in range(depth)])
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x)


def test_truncation_errors_are_the_output_errors_of_the_leading_ranks():
    model = ml.factorize(TwoLayers()).eval()
    layer = model.layers[0]
    x = torch.randn(300, 24)
    moments = layer_moments(model, {"layers.0": layer}, [(x, torch.zeros(300, dtype=torch.long))])
    errors, plain = truncation_errors(layer, moments["layers.0"]), truncation_errors(layer)
    with torch.no_grad():
        full = layer.dense_weight().double()
        for r in range(layer.rank + 1):
            layer.active_rank = r
            tail = full - layer.dense_weight().double()
            assert float(errors[r]) == pytest.approx(float((x.double() @ tail.T).square().sum()), rel=1e-6, abs=1e-8)
            assert float(plain[r]) == pytest.approx(float(tail.square().sum()), rel=1e-6, abs=1e-8)
    # an SVD factorisation truncates optimally: the weight errors are the singular value tails
    assert torch.allclose(plain, spectrum_errors(layer), rtol=1e-5, atol=1e-8)
    whitened = spectrum_errors(layer, moments["layers.0"])
    assert torch.all(whitened <= errors * (1 + 1e-6) + 1e-8)  # no rank-r weight does better on the data


def test_lazy_greedy_equals_exhaustive_where_scores_do_not_interact():
    """Layers on separate inputs feeding separate outputs: each removal's loss does not depend on
    the other layers' ranks, so stale scores are exact and the lazy search makes the same choices."""
    torch.manual_seed(0)

    class Parallel(nn.Module):
        def __init__(self):
            super().__init__()
            self.branches = nn.ModuleList([nn.Linear(12, 12) for _ in range(5)])

        def forward(self, x):
            parts = [branch(x[:, 12 * i:12 * (i + 1)]) for i, branch in enumerate(self.branches)]
            return torch.stack(parts, 1)  # one 12-way classification per branch

    model = Parallel()
    with torch.no_grad():
        for i, branch in enumerate(model.branches):
            branch.weight.mul_(1 + i)
    model = ml.factorize(model, ml.FactorizeConfig(min_rank=1)).eval()
    x = torch.randn(256, 60)
    with torch.no_grad():
        y = model(x).argmax(-1)
    exhaustive = greedy_front(model, [(x, y)], "params", step=0.25)
    lazy = greedy_front(model, [(x, y)], "params", step=0.25, search="lazy", top=1, refresh=1000)
    assert [p.ranks for p in lazy.points] == [p.ranks for p in exhaustive.points]
    assert [p.calibration_loss for p in lazy.points] == pytest.approx([p.calibration_loss for p in exhaustive.points])


def test_lazy_front_is_close_on_a_small_cnn(digits):
    torch.manual_seed(0)
    model = ml.factorize(SmallConvNet()).eval()
    calibration = calibration_batches(digits.train, 256, 128)
    scored = {}
    exhaustive = greedy_front(model, calibration, "params", step=0.5,
                              progress=lambda d, t, s: scored.__setitem__("exhaustive", s.scored))
    lazy = greedy_front(model, calibration, "params", step=0.5, search="lazy", top=1,
                        progress=lambda d, t, s: scored.__setitem__("lazy", s.scored))
    assert scored["lazy"] < scored["exhaustive"]
    assert lazy.points[0].ranks == exhaustive.points[0].ranks
    for point in exhaustive.points:  # at every cost of the exhaustive front the lazy one is about as good
        best = min(p.calibration_loss for p in lazy.points if p.params <= point.params)
        assert best <= point.calibration_loss * 1.1 + 0.05


def _loss_at(model, ranks, batches):
    """The calibration loss of ``model`` with its layers set to ``ranks`` (a copy; nothing cached)."""
    work = copy.deepcopy(model)
    for name, layer in low_rank_layers(work):
        layer.active_rank = ranks[name]
    return calibration_loss(work, batches)


def _deep_model(samples):
    """Nine factorised layers and ``samples`` inputs labelled by the model itself."""
    torch.manual_seed(0)
    model = ml.factorize(TwoLayers(width=32, depth=8), ml.FactorizeConfig(min_rank=1)).eval()
    x = torch.randn(samples, 32)
    with torch.no_grad():
        return model, x, model(x).argmax(-1)


def _layers_changed(front):
    """How many layers each round of ``front`` cut."""
    return [sum(a != b for a, b in zip(p.ranks.values(), q.ranks.values()))
            for p, q in zip(front.points, front.points[1:])]


def test_lazy_rounds_cut_several_layers_within_their_share_and_record_the_true_loss():
    model, x, y = _deep_model(512)
    batches = [(x[:256], y[:256]), (x[256:], y[256:])]
    one = greedy_front(model, batches, "params", search="lazy", share=0)
    several = greedy_front(model, batches, "params", search="lazy", share=0.1)
    assert set(_layers_changed(one)) == {1}
    changed = _layers_changed(several)
    assert max(changed) >= 3 and len(several.points) < len(one.points) / 2
    for before, after, count in zip(several.points, several.points[1:], changed):
        if count > 1:  # together within the share of the cost, and the point's loss is its own model's
            assert before.params - after.params <= 0.1 * before.params
            assert after.calibration_loss == pytest.approx(_loss_at(model, after.ranks, batches), rel=1e-9)
    assert several.points[-1].ranks == one.points[-1].ranks  # both end with every layer at its floor
    for point in one.points:  # at every cost of the one-by-one front the batched one is about as good
        best = min(p.calibration_loss for p in several.points if p.params <= point.params)
        assert best <= point.calibration_loss * 1.1 + 0.05


def test_lazy_rounds_remove_at_most_a_quarter_of_what_is_left_to_the_target():
    model, x, y = _deep_model(256)
    front = greedy_front(model, [(x, y)], "params", search="lazy", share=0.2, targets={"params": 0.5})
    goal = 0.5 * front.dense_params
    for before, after, count in zip(front.points, front.points[1:], _layers_changed(front)):
        if count > 1:
            assert before.params - after.params <= (before.params - goal) / 4 + 1e-9
    assert front.fraction(front.points[-1], "params") <= 0.5 < front.fraction(front.points[-2], "params")


class Counting(nn.Module):
    """Counts the calibration passes (forwards on more than one sample) of the model it wraps."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.passes = 0

    def forward(self, x):
        self.passes += x.shape[0] > 1
        return self.model(x)


def test_unreachable_target_refused_before_any_calibration_pass():
    model = Counting(ml.factorize(TwoLayers(), ml.FactorizeConfig(min_rank=2))).eval()
    x = torch.randn(64, 24)
    y = torch.randint(0, 6, (64,))
    for search in ("exhaustive", "lazy", "allocate"):
        with pytest.raises(ConfigError, match=r"params=0\.01 is unreachable.*0\.\d+ of the dense"):
            greedy_front(model, [(x, y)], "params", targets={"params": 0.01}, search=search)
    assert model.passes == 0
    with pytest.raises(ConfigError, match="latency table"):
        greedy_front(model, [(x, y)], "params", targets={"latency": 0.5})
    assert model.passes == 0


def test_targets_stop_the_search_early():
    torch.manual_seed(0)
    model = ml.factorize(TwoLayers(width=32, depth=3), ml.FactorizeConfig(min_rank=1)).eval()
    x = torch.randn(256, 32)
    with torch.no_grad():
        y = model(x).argmax(-1)
    full = greedy_front(model, [(x, y)], "params")
    for search in ("exhaustive", "lazy"):
        stopped = greedy_front(model, [(x, y)], "params", targets={"params": 0.5, "max_drop": 0.01}, search=search)
        assert len(stopped.points) < len(full.points)
        assert stopped.fraction(stopped.points[-1], "params") <= 0.5
        assert all(stopped.fraction(p, "params") > 0.5 for p in stopped.points[:-1])
        if search == "exhaustive":  # the same path as far as it goes
            assert [p.ranks for p in stopped.points] == [p.ranks for p in full.points[:len(stopped.points)]]
        assert stopped.select(params=0.5) is stopped.points[-1]


def test_progress_reports_rounds_cost_and_loss():
    torch.manual_seed(0)
    model = ml.factorize(TwoLayers(width=32, depth=3), ml.FactorizeConfig(min_rank=1)).eval()
    x = torch.randn(128, 32)
    y = torch.randint(0, 6, (128,))
    plain, detailed = [], []
    front = greedy_front(model, [(x, y)], "params", progress=lambda done, total: plain.append((done, total)))
    assert plain[-1] == (len(front.points) - 1,) * 2 and all(d <= t for d, t in plain)
    greedy_front(model, [(x, y)], "params", targets={"params": 0.4},
                 progress=lambda done, total, status: detailed.append(status))
    assert all(isinstance(s, SearchStatus) and s.round <= s.rounds for s in detailed)
    assert detailed[-1].round == detailed[-1].rounds and detailed[-1].cost <= 0.4
    assert detailed[-1].remaining == 0 and detailed[-1].loss > 0 and detailed[-1].scored > 0
    assert [s.round for s in detailed] == list(range(1, len(detailed))) + [len(detailed) - 1]


@pytest.mark.parametrize("weighting", ["measured", "probe", "relative", "none"])
def test_allocated_front_is_honest_and_meets_its_budgets(digits, weighting):
    torch.manual_seed(0)
    model = ml.factorize(SmallConvNet()).eval()
    calibration = calibration_batches(digits.train, 256, 128)
    front = allocated_front(model, calibration, "params", weighting=weighting, points=6, budgets=(0.3,))
    assert front.metadata["search"] == "allocate" and front.points[0].ranks == ml.rank_pattern(model)
    params = [p.params for p in front.points]
    assert params == sorted(params, reverse=True) and len(front.points) >= 6
    assert front.select(params=0.3).params <= 0.3 * front.dense_params
    for point in front.points[1::3]:  # the recorded loss is that of the model at the point (BatchNorm recomputed)
        assert point.calibration_loss == pytest.approx(calibration_loss(materialize(model, point, calibration),
                                                                        calibration), rel=1e-5)
    answered = greedy_front(model, calibration, "params", search="allocate", targets={"params": 0.25})
    assert len(answered.points) == 2 and answered.fraction(answered.points[1], "params") <= 0.25
