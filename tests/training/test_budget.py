"""Training to a size: ``TrainConfig.target`` steers the group-lasso weight until the exported
model reaches the requested share of the dense model's cost."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import resume_matches_uninterrupted

from maestro_lod import cli
from maestro_lod.deploy import calibration_batches, greedy_front
from maestro_lod.errors import ConfigError
from maestro_lod.export import export
from maestro_lod.engine.counting import count_params
from maestro_lod.models import build_model
from maestro_lod.training import TrainConfig, Trainer, load_checkpoint
from maestro_lod.training.budget import (CUT_CALIBRATION, CUT_STEP, GAIN, HOLD_LAMBDA, STEP_LIMIT, TargetLambda,
                                         greedy_cut)
from maestro_lod.engine.targets import parse_target

DATA = Path(__file__).resolve().parents[1] / "fixtures"


def _config(**changes) -> TrainConfig:
    options = dict(model="mlp", data="digits", epochs=6, batch_size=64, lr=0.05, augment=False, eps_ps=1e-2,
                   lambda_gl=1e-3, target="params=0.5")
    return TrainConfig.from_dict({**options, **changes})


def _trainer(digits, config: TrainConfig) -> Trainer:
    torch.manual_seed(config.seed)
    return Trainer(build_model("mlp", digits, hidden_sizes=[64, 32]), digits.train, digits.val, config)


def test_controller_reaches_the_target(digits):
    trainer = _trainer(digits, _config())
    result = trainer.fit()
    exported = count_params(export(result.model)) / trainer.dense_params
    assert exported == pytest.approx(0.5, rel=0.1)
    assert result.summary.extra["target"] == "params=0.5"
    assert result.summary.extra["target_cost"] == 0.5
    assert result.summary.extra["achieved_cost"] == pytest.approx(exported)
    lambdas = [r.extra["lambda_gl"] for r in result.history]
    assert lambdas[0] == 1e-3 and max(lambdas) > 1e-3  # steered, not the configured weight
    assert all(r.extra["target_cost"] == 0.5 and "planned_cost" in r.extra for r in result.history)
    planned = [r.extra["planned_cost"] for r in result.history]
    assert planned == sorted(planned, reverse=True) and planned[-1] == pytest.approx(0.5)
    met = [r.extra["target_met"] for r in result.history]
    first = met.index(True)
    assert met[-1] and result.history[-1].total_rank == result.history[first].total_rank  # shrinking stopped
    # λ drops to the holding weight from the epoch after the target was met
    assert [r.extra["lambda_gl"] for r in result.history[first + 1:]] == [HOLD_LAMBDA] * (len(met) - first - 1)
    assert result.summary.extra["final_lambda_gl"] == HOLD_LAMBDA


def test_resumed_targeted_run_matches_uninterrupted_run(digits, tmp_path):
    config = _config(epochs=5)
    full, resumed = resume_matches_uninterrupted(lambda: _trainer(digits, config), tmp_path / "ck.safetensors")
    lambdas = [r.extra["lambda_gl"] for r in full.history]
    assert lambdas[2] != lambdas[0]  # the weight after the interruption comes from the controller's state
    assert resumed.method.scheduler.state_dict() == full.method.scheduler.state_dict()


def test_a_gap_left_after_the_last_epoch_is_closed_by_the_greedy_search(digits):
    # λ too small and ε = 0: nothing shrinks during training, so the whole way to the target is the final cut
    trainer = _trainer(digits, _config(epochs=2, lambda_gl=1e-6, eps_ps=0.0, target="params=0.4"))
    result = trainer.fit()
    last = result.history[-1]
    assert result.history[0].extra["exported_cost"] == 1.0 and result.history[0].extra["gap_closed"] == 0.0
    exported = count_params(export(result.model)) / trainer.dense_params
    assert exported <= 0.4 and last.extra["exported_cost"] == pytest.approx(exported)
    assert last.extra["gap_closed"] == pytest.approx(1.0 - exported) and last.extra["target_met"]
    assert result.summary.extra["achieved_cost"] == pytest.approx(exported)


def test_greedy_cut_is_the_first_point_of_the_deploy_search_within_the_target(digits):
    trainer = _trainer(digits, _config(epochs=1, lambda_gl=1e-6, eps_ps=0.0, target="params=0.4"))
    state = torch.random.get_rng_state()
    ranks = greedy_cut(trainer, "params", 0.4)
    assert torch.equal(torch.random.get_rng_state(), state)  # training's random stream is untouched
    front = greedy_front(trainer.model, calibration_batches(trainer.train_data, CUT_CALIBRATION, seed=0), "params",
                         CUT_STEP)
    fractions = [p.params / trainer.dense_params for p in front.points]
    first = next(i for i, f in enumerate(fractions) if f <= 0.4)
    assert ranks == front.points[first].ranks and fractions[first - 1] > 0.4
    assert greedy_cut(trainer, "params", 1e-6) == front.points[-1].ranks  # out of reach: the cheapest pattern


def test_unreachable_target_is_refused_with_the_reachable_minimum(digits):
    with pytest.raises(ConfigError, match=r"below what mlp can reach.*params=0\.0\d+") as info:
        _trainer(digits, _config(target="params=0.01"))
    floor = float(str(info.value).rsplit("params=", 1)[1].split()[0])
    # every layer at rank 1: r·(m+n) weights plus biases, over the dense m·n plus biases
    sizes = [(64, 64), (64, 32), (32, 10)]
    dense = sum(m * n + n for m, n in sizes)
    assert floor == pytest.approx(sum(m + n + n for m, n in sizes) / dense, rel=1e-3)
    _trainer(digits, _config(target=f"params={floor * 1.01}"))  # just above it is accepted


def test_controller_update_on_a_synthetic_cost_sequence():
    controller = TargetLambda("params", 0.3, 1e-3, factorised_epochs=10, target_by=0.6)
    assert controller.target_epoch == 6
    controller.start = 1.0
    planned = [controller.planned(j) for j in range(1, 8)]
    assert planned[0] == pytest.approx(0.3 ** (1 / 6)) and planned[5:] == pytest.approx([0.3, 0.3])
    lam = controller.update(1, 0.95)  # behind plan: pushed harder, by exp(GAIN · relative gap)
    assert lam == pytest.approx(1e-3 * math.exp(GAIN * (0.95 - planned[0]) / planned[0]))
    lam = controller.update(2, 1.0)  # far behind: the step is clipped
    assert lam == pytest.approx(1e-3 * math.exp(GAIN * (0.95 - planned[0]) / planned[0]) * STEP_LIMIT)
    before = lam
    lam = controller.update(3, controller.planned(3) * 0.9)  # ahead of plan: held, never lowered before the target
    assert lam == before
    lam = controller.update(4, 0.29)  # met: the holding weight from now on
    assert controller.met and lam == HOLD_LAMBDA == 0.0
    assert controller.history[-1]["lambda_gl"] == before
    assert controller.update(5, 0.35) == lam and controller.met  # met once is met for good
    restored = TargetLambda("params", 0.3, 5.0, 10, 0.6)
    restored.load_state_dict(controller.state_dict())
    assert restored.state_dict() == controller.state_dict() and restored.lam == lam
    assert [h["epoch"] for h in controller.history] == [1, 2, 3, 4, 5]
    holding = TargetLambda("macs", 0.5, 1e-2, 4, hold=1e-4)
    holding.update(1, 0.9)
    assert holding.update(2, 0.5) == 1e-4


@pytest.mark.parametrize("target, message", [
    ("flops=0.3", "unknown cost 'flops'"), ("params=0", r"must be in \(0, 1\]"), ("macs=1.5", r"must be in \(0, 1\]"),
    ("macs=abc", "is not a number"), ("0.3", "unknown cost"), (0.3, "must be a string"),
])
def test_bad_targets_are_refused(target, message):
    with pytest.raises(ConfigError, match=message):
        parse_target(target)
    with pytest.raises(ConfigError, match=message):
        _config(target=target)


def test_target_needs_maestro_and_a_starting_weight():
    assert parse_target("macs=1") == ("macs", 1.0)
    with pytest.raises(ConfigError, match="needs method='maestro'"):
        _config(method="dense")
    with pytest.raises(ConfigError, match="lambda_gl > 0"):
        _config(lambda_gl=0.0)
    with pytest.raises(ConfigError, match="target_by"):
        _config(target_by=0.0)


def test_cli_refuses_a_bad_target_in_one_line(tmp_path, capsys):
    code = cli.main(["train", "--data", "digits", "--model", "mlp", "--quiet", "--epochs", "1",
                     "--out", str(tmp_path / "run"), "--target", "latency=0.3"])
    captured = capsys.readouterr()
    assert code == 2 and captured.err.strip().count("\n") == 0 and "unknown cost 'latency'" in captured.err


def test_cost_plot_shows_the_target_trajectory(tmp_path):
    from maestro_lod.runs.plots import plot_cost

    history = [{"epoch": e, "params": 100 - 10 * e, "macs": 200 - 20 * e, "exported_cost": 1 - 0.1 * e,
                "planned_cost": 1 - 0.12 * e, "target_cost": 0.5} for e in range(1, 5)]
    plot_cost(history, 100, 200, tmp_path / "cost.png")
    assert (tmp_path / "cost.png").stat().st_size > 1000
    plot_cost([{k: v for k, v in r.items() if "cost" not in k} for r in history], 100, 200, tmp_path / "plain.png")
    assert (tmp_path / "plain.png").is_file()


def test_a_checkpoint_written_before_the_scheduler_existed_resumes_to_the_same_numbers(digits):
    # written after epoch 2 of 3 by the code whose λ controller was part of MAESTRO's method, with
    # the numbers of that code's uninterrupted run (tests/fixtures)
    expected = json.loads((DATA / "targeted-expected.json").read_text())
    config = TrainConfig.from_dict(expected["config"])
    torch.manual_seed(config.seed)
    trainer = Trainer(build_model("mlp", digits, hidden_sizes=[32]), digits.train, digits.val, config)
    trainer.load_state_dict(load_checkpoint(DATA / "targeted-epoch2.safetensors"))
    assert isinstance(trainer.method.scheduler, TargetLambda) and trainer.method.scheduler.start is not None
    result = trainer.fit()
    history = [{k: v for k, v in r.to_dict().items() if k not in ("train_time", "epoch_time")} for r in result.history]
    assert history == expected["history"]
    assert {k: v for k, v in result.summary.extra.items() if k != "communication_time"} == expected["summary_extra"]
