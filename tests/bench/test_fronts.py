"""``maestro-lod bench --suite fronts`` on a tiny budget: every family is trained and measured,
a second run trains and searches nothing, MAESTRO's front can start from its pairs re-factorised
by whitened SVD, the budget tables are the best cached point within each
budget, the gap between two curves is an area that vanishes for identical curves, and a task's own
MAESTRO options reach its MAESTRO cell and the separately trained ones only."""

import dataclasses
import json
import math

import pytest
import torch

from maestro_lod import cli
from maestro_lod.bench import fronts, run_fronts
from maestro_lod.bench.front_curves import prepared, run_inputs
from maestro_lod.bench.front_tables import advantage, best_within, mean_gap
from maestro_lod.bench.fronts import FAMILIES, FAMILY_CELLS, FRONT_FAMILIES, PUFFERFISH, SEPARATE
from maestro_lod.errors import UsageError
from maestro_lod.layers import low_rank_layers
from maestro_lod.runs.loading import load_run

TASK = "mlp-digits"


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("fronts") / "out"
    argv = ["bench", "--suite", "fronts", "--tasks", TASK, "--seeds", "1", "--epochs", "1", "--out", str(out)]
    assert cli.main(argv) == 0
    return out


def _curves(out):
    return {path.stem: json.loads(path.read_text()) for path in (out / TASK / "curves" / "seed0").glob("*.json")}


def test_every_family_is_trained_searched_and_reported(suite):
    results = json.loads((suite / "fronts.json").read_text())
    (task,) = results["tasks"]
    assert task["task"] == TASK and task["seeds"] == [0] and task["epochs"] == 1
    assert results["machine"]["cpus"] >= 1 and results["machine"]["torch"]
    for axis in ("params", "macs"):
        assert [row["family"] for row in task["tables"][axis]] == list(FAMILIES)
    cells = ["maestro", "dense", *(f"pufferfish-{r:g}" for r in PUFFERFISH), *(f"separate-{i}" for i in (1, 2, 3))]
    for cell in cells:
        summary = json.loads((suite / TASK / cell / "seed0" / "summary.json").read_text())
        assert summary["epochs"] == 1 and summary["train_macs"] > 0
    curves = _curves(suite)
    fronts = {f"{name}-{axis}" for name in ("maestro", "dense-svd", "dense-whitened") for axis in ("params", "macs")}
    assert set(curves) == fronts | set(cells[2:])
    for name in fronts:
        front = curves[name]
        assert len(front["points"]) > 3 and front["key"]["search"] == "lazy" and front["key"]["calibration"] == 2048
        assert front["dense"] == front["front_dense"]  # one architecture, one denominator
        assert front["front"]["cost"] == name.rsplit("-", 1)[1]
    assert curves["maestro-params"]["key"]["prepare"] == "canonical"
    assert curves["dense-whitened-macs"]["key"]["prepare"] == "whitened"
    # Pufferfish's exported size falls with its rank ratio; the separately trained models hold the
    # ranks of MAESTRO's front points they were trained at, and export to the same size
    sizes = [curves[f"pufferfish-{r:g}"]["points"][0]["params"] for r in PUFFERFISH]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] < curves["maestro-params"]["dense"]["params"]
    front = {json.dumps(p["ranks"], sort_keys=True): p for p in curves["maestro-params"]["points"]}
    for index in range(1, len(SEPARATE) + 1):
        trained = curves[f"separate-{index}"]["points"][0]
        assert trained["params"] == front[json.dumps(trained["ranks"], sort_keys=True)]["params"]
        config = json.loads((suite / TASK / f"separate-{index}" / "seed0" / "config.json").read_text())
        assert config["factorize"]["rank_pattern"] == trained["ranks"] and config["lambda_gl"] == 0.0
    pairs = task["same_ranks"]
    assert [row["share"] for row in pairs] == list(SEPARATE)
    for index, row in enumerate(pairs, start=1):
        (pair,) = row["seeds"]
        trained = curves[f"separate-{index}"]["points"][0]
        assert pair["ranks"] == trained["ranks"] and pair["separate"] == trained["accuracy"]
        assert pair["maestro"] == front[json.dumps(trained["ranks"], sort_keys=True)]["accuracy"]
    assert "Trained separately at the ranks" in (suite / "fronts.md").read_text()
    costs = {row["family"]: row for row in task["costs"]}
    assert costs["Pufferfish"]["trainings"] == 3 and costs["MAESTRO"]["trainings"] == 1
    assert costs["MAESTRO"]["search_time"][0] > 0 and costs["Pufferfish"]["search_time"] == [0]
    table = (suite / "fronts.md").read_text()
    assert "| dense + whitened SVD |" in table and "| separately trained |" in table and "mean advantage" in table
    assert (suite / "fronts.png").stat().st_size > 5000


def test_a_second_run_trains_and_searches_nothing(suite, capsys):
    stamps = {p: p.stat().st_mtime_ns for p in (suite / TASK).rglob("*.json")}
    result = run_fronts(suite, tasks=[TASK], seeds=1, epochs=1)
    assert result.trained == [] and result.computed == []
    assert {p: p.stat().st_mtime_ns for p in (suite / TASK).rglob("*.json")} == stamps
    assert capsys.readouterr().out.count("(done)") == 8
    assert result.table == (suite / "fronts.md").read_text()


def test_the_budget_tables_are_the_best_cached_point_within_each_budget(suite):
    task = json.loads((suite / "fronts.json").read_text())["tasks"][0]
    curves = _curves(suite)
    for axis in ("params", "macs"):
        for row in task["tables"][axis]:
            family = row["family"]
            names = ([f"{FRONT_FAMILIES[family]}-{axis}"] if family in FRONT_FAMILIES else FAMILY_CELLS[family])
            points = [(p[axis] / curves[n]["dense"][axis], p["accuracy"]) for n in names for p in curves[n]["points"]]
            for budget, (value,) in zip(task["budgets"], row["values"]):
                within = [accuracy for cost, accuracy in points if cost <= budget + 1e-9]
                assert value == (max(within) if within else None), (family, axis, budget)
    gaps = {row["family"]: row for row in task["gaps"]}
    assert set(gaps) == set(FAMILIES) - {"MAESTRO"}
    assert all(math.isfinite(gaps[f]["params"]["gaps"][0]) for f in ("dense + SVD", "dense + whitened SVD"))


def test_the_gap_of_identical_curves_is_zero_and_of_shifted_ones_the_shift():
    curve = [{"params": 1.0, "macs": 1.0, "score": 0.97}, {"params": 0.3, "macs": 0.4, "score": 0.95},
             {"params": 0.12, "macs": 0.2, "score": 0.9}, {"params": 0.05, "macs": 0.08, "score": 0.6}]
    for axis in ("params", "macs"):
        assert mean_gap(curve, curve, axis, "accuracy") == (0.0, 0.1)
        assert mean_gap(curve, list(reversed(curve)), axis, "perplexity") == (0.0, 0.1)
    lower = [{**p, "score": p["score"] - 0.01} for p in curve]
    gap, start = mean_gap(curve, lower, "params", "accuracy")
    assert gap == pytest.approx(1.0) and start == 0.1  # one accuracy point everywhere
    gap, _ = mean_gap(lower, curve, "params", "perplexity")
    assert gap == pytest.approx(0.01)  # perplexity: lower is better, the gap is the other's excess
    # a family without a model below 0.3: its gap covers 0.3–1 only, area by log-width
    sparse = [curve[0], {"params": 0.3, "macs": 0.4, "score": 0.93}]
    gap, start = mean_gap(curve, sparse, "params", "accuracy")
    assert start == 0.3 and gap == pytest.approx(2.0)
    staircase = [{"params": 0.1, "macs": 0.1, "score": 0.5}, {"params": 1.0, "macs": 1.0, "score": 0.5}]
    step = [{"params": 0.1, "macs": 0.1, "score": 0.4}, {"params": math.sqrt(0.1), "macs": 1.0, "score": 0.5}]
    gap, _ = mean_gap(staircase, step, "params", "accuracy")
    assert gap == pytest.approx(5.0)  # 10 points over half of the log range
    assert mean_gap(curve, [{"params": 2.0, "macs": 2.0, "score": 1.0}], "params", "accuracy") == (None, None)
    assert best_within(curve, "params", 0.2, "accuracy") == 0.9
    assert best_within(curve, "params", 0.01, "accuracy") is None
    assert advantage(9.0, 9.5, "perplexity") == 0.5 and advantage(0.95, 0.9, "accuracy") == pytest.approx(5.0)


def test_the_fronts_suite_refuses_what_does_not_apply_in_one_line(tmp_path, capsys):
    for extra, message in ((["--methods", "dense"], "--methods and --sweep do not apply"),
                           (["--tasks", "resnet18-cifar10"], "unknown task"), (["--seeds", "0"], "at least 1")):
        code = cli.main(["bench", "--suite", "fronts", "--out", str(tmp_path / "x"), *extra])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.strip().count("\n") == 0, err
    assert not (tmp_path / "x").exists()
    with pytest.raises(UsageError, match="--epochs 0"):
        run_fronts(tmp_path / "y", epochs=0)


def test_a_call_on_other_tasks_keeps_the_tasks_reported_before(suite):
    results = json.loads((suite / "fronts.json").read_text())
    earlier = {**results["tasks"][0], "task": "lenet5-mnist5k", "epochs": 30}
    (suite / "fronts.json").write_text(json.dumps({**results, "tasks": [results["tasks"][0], earlier]}))
    result = run_fronts(suite, tasks=[TASK], seeds=1, epochs=1)
    assert [t["task"] for t in result.tasks] == [TASK]
    reported = json.loads((suite / "fronts.json").read_text())["tasks"]
    assert [t["task"] for t in reported] == ["lenet5-mnist5k", TASK]  # the suite's order
    table = (suite / "fronts.md").read_text()
    assert table == result.table
    assert table.index("### lenet5-mnist5k (30 epochs") < table.index(f"### {TASK} (1 epoch, seed 0)")


def test_maestro_options_of_a_task_reach_its_cell_and_the_separately_trained_ones(tmp_path, monkeypatch):
    task = next(t for t in fronts.TASKS if t.name == TASK)
    own = {"sampled_weight": 0.5, "factorize": {"keep_ends": True}}
    monkeypatch.setattr(fronts, "TASKS", (dataclasses.replace(task, maestro=own, maestro_order="canonical-whitened"),))
    run_fronts(tmp_path, tasks=[TASK], seeds=1, epochs=1)
    curves = _curves(tmp_path)
    assert {curves[f"{name}-params"]["key"]["prepare"] for name in ("maestro", "dense-svd", "dense-whitened")} == {
        "canonical-whitened", "svd", "whitened"}  # the task's order applies to MAESTRO's front only

    def config(cell):
        return json.loads((tmp_path / TASK / cell / "seed0" / "config.json").read_text())

    maestro = config("maestro")
    assert maestro["sampled_weight"] == 0.5 and maestro["factorize"]["keep_ends"] is True
    ends = set(json.loads((tmp_path / TASK / "maestro" / "seed0" / "summary.json").read_text())["initial_ranks"])
    for cell in ("dense", "pufferfish-0.5"):
        assert not config(cell)["factorize"].get("keep_ends")
    for index in range(1, len(SEPARATE) + 1):
        separate = config(f"separate-{index}")
        assert separate["factorize"]["keep_ends"] is True and set(separate["factorize"]["rank_pattern"]) == ends


def test_a_front_prepared_by_whitened_canonical_order_keeps_the_function_and_reorders_the_ranks(suite):
    run = load_run(suite / TASK / "maestro" / "seed0")
    inputs = run_inputs(run)
    plain, whitened = (prepared(run, how, inputs) for how in ("canonical", "canonical-whitened"))
    batch = inputs.calibration[0][0]
    with torch.no_grad():
        expected = run.model.eval()(batch)
        assert torch.allclose(whitened(batch), expected, atol=1e-4) and torch.allclose(plain(batch), expected, atol=1e-4)
    # the leading ranks differ from the plain SVD's: the calibration inputs decided their order
    layers = dict(low_rank_layers(whitened))
    assert any(not torch.allclose(layer.down[:1].abs(), dict(low_rank_layers(plain))[name].down[:1].abs(), atol=1e-3)
               for name, layer in layers.items())


def test_an_unknown_maestro_order_is_refused_in_one_line(tmp_path, monkeypatch):
    task = next(t for t in fronts.TASKS if t.name == TASK)
    monkeypatch.setattr(fronts, "TASKS", (dataclasses.replace(task, maestro_order="whitened"),))
    with pytest.raises(UsageError, match="maestro_order='whitened' must be one of canonical, canonical-whitened"):
        run_fronts(tmp_path / "out", tasks=[TASK], seeds=1, epochs=1)
    assert not (tmp_path / "out").exists()  # refused before anything was trained
