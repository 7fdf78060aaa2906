"""``maestro-lod bench`` on a tiny budget: every cell is a run directory, results and plots are
written, finished cells are not recomputed, the suite's configs round-trip through TOML, and a
``--sweep`` grid is a set of such cells with its own table and plot."""

import json
import re
from pathlib import Path

import pytest

from maestro_lod import cli
from maestro_lod.bench import (SUITES, VARIANTS, applicable, cell_config, config_toml, grid_points, parse_sweep,
                               point_label)
from maestro_lod.errors import UsageError
from maestro_lod.training import TrainConfig
from maestro_lod.training.train_config import read_toml


def test_every_cell_config_round_trips_through_the_toml_the_train_command_reads(tmp_path):
    for suite in SUITES.values():
        for task in suite.tasks:
            for method in VARIANTS:
                config = cell_config(task, method, 2, None)
                path = tmp_path / "cell.toml"
                path.write_text(config_toml(config))
                assert TrainConfig.from_dict(read_toml(path)) == config, (task.name, method)
    assert cell_config(SUITES["quick"].tasks[0], "maestro-no-gl", 0, None).method_options.lambda_gl == 0.0
    assert cell_config(SUITES["quick"].tasks[0], "svd", 0, 2).method_options.svd_finetune_epochs == 1


def test_quick_suite_on_a_tiny_budget_resumes_without_recomputing(tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["bench", "--suite", "quick", "--epochs", "2", "--out", str(out), "--repeats", "3", "--tasks", "mlp-digits",
            "--methods", "dense,maestro,pufferfish"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert [(c["task"], c["method"]) for c in results["cells"]] == [("mlp-digits", m) for m in
                                                                    ("dense", "maestro", "pufferfish")]
    for cell in results["cells"]:
        summary = json.loads((out / "mlp-digits" / cell["method"] / "seed0" / "summary.json").read_text())
        assert summary["method"] == cell["method"] and summary["epochs"] == 2
        assert cell["train_macs"] == summary["train_macs"] > 0 and cell["latency_ms"] > 0
    by_method = {c["method"]: c for c in results["cells"]}
    assert by_method["pufferfish"]["params"] < by_method["dense"]["params"]
    assert by_method["maestro"]["train_macs"] > by_method["dense"]["train_macs"]  # two passes per step
    table = (out / "results.md").read_text()
    assert "| pufferfish |" in table and "train MACs" in table
    assert (out / "accuracy-vs-macs.png").stat().st_size > 0 and (out / "training-cost.png").is_file()
    stamp = (out / "mlp-digits" / "dense" / "seed0" / "summary.json").stat().st_mtime_ns
    capsys.readouterr()
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.count("(done)") == 3
    assert (out / "mlp-digits" / "dense" / "seed0" / "summary.json").stat().st_mtime_ns == stamp


def test_sweep_trains_every_grid_point_as_a_resumable_cell(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["bench", "--tasks", "mlp-digits", "--epochs", "1", "--out", str(out), "--repeats", "2",
            "--methods", "dense,maestro,maestro-no-gl", "--sweep", "lambda_gl=1e-3,0.01", "--sweep", "eps_ps=1e-2"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["sweep"] == {"lambda_gl": [0.001, 0.01], "eps_ps": [0.01]}
    cells = {(c["method"], tuple(c["point"].items())): c for c in results["cells"]}
    # the grid varies MAESTRO; dense ignores it and maestro-no-gl fixes λ = 0, so both run once
    assert set(cells) == {("dense", ()), ("maestro", (("lambda_gl", 0.001), ("eps_ps", 0.01))),
                          ("maestro", (("lambda_gl", 0.01), ("eps_ps", 0.01))), ("maestro-no-gl", (("eps_ps", 0.01),))}
    for (method, point), cell in cells.items():
        config = json.loads((tmp_path / cell["directory"] / "config.json").read_text())
        for key, value in point:
            assert config[key] == value == cell[key]
    assert cells[("maestro-no-gl", (("eps_ps", 0.01),))]["lambda_gl"] == 0.0
    assert (out / "mlp-digits" / "maestro" / "lambda_gl=0.01,eps_ps=0.01" / "seed0" / "summary.json").is_file()
    rows = {(r["method"], r["point"].get("lambda_gl")): r for r in results["aggregate"]}
    assert rows[("dense", None)]["params_ratio"] == 1.0 and rows[("maestro", 0.01)]["params_ratio"] <= 1.0
    table = (out / "results.md").read_text()
    assert "| lambda_gl | eps_ps |" in table and "| maestro | 0.01 | 0.01 |" in table and "| dense | — | — |" in table
    assert (out / "sweep.png").stat().st_size > 1000
    capsys.readouterr()
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.count("(done)") == 4


def test_a_sweep_of_size_targets_trains_one_targeted_run_per_target(tmp_path, capsys):
    out = tmp_path / "targets"
    argv = ["bench", "--tasks", "mlp-digits", "--epochs", "3", "--out", str(out), "--repeats", "2",
            "--methods", "dense,maestro", "--sweep", "target=params=0.50,params=0.3"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert results["sweep"] == {"target": ["params=0.5", "params=0.3"]}  # canonical spelling
    cells = {(c["method"], c["point"].get("target")): c for c in results["cells"]}
    assert set(cells) == {("dense", None), ("maestro", "params=0.5"), ("maestro", "params=0.3")}
    for fraction in (0.5, 0.3):
        cell = cells[("maestro", f"params={fraction}")]
        assert Path(cell["directory"]).parent.name == f"target=params={fraction}"
        summary = json.loads((Path(cell["directory"]) / "summary.json").read_text())
        assert summary["target"] == f"params={fraction}"
        assert cell["params"] / cell["dense_params"] <= fraction + 1e-9  # the exported model meets its target
    table = (out / "results.md").read_text()
    assert "| target |" in table and "| maestro | params=0.3 |" in table and "| dense | — |" in table
    assert (out / "sweep.png").stat().st_size > 1000


@pytest.mark.parametrize("sweep, message", [
    (["lr=0.1"], "unknown key 'lr'"), (["lambda_gl"], "unknown key 'lambda_gl'"),
    (["lambda_gl=1e-3,abc"], "'abc' is not a number"), (["lambda_gl=-1e-3"], "lambda_gl=-1e-3 must be >= 0"),
    (["eps_ps=nan"], "'nan' is not a finite number"), (["epochs=2.5"], "'2.5' is not an int"),
    (["epochs=0"], "must be at least 1"), (["lambda_gl=1e-3,0.001"], "listed twice"), (["eps_ps="], "no values"),
    (["eps_ps=1e-3", "eps_ps=1e-2"], "swept twice"), (["target=flops=0.3"], "unknown cost 'flops'"),
    (["target=macs=1.5"], r"must be in \(0, 1\]"), (["target=macs=0.5,macs=0.50"], "target=macs=0.50 is listed twice"),
])
def test_bad_sweeps_are_refused_in_one_line(sweep, message, tmp_path, capsys):
    with pytest.raises(UsageError, match=message):
        parse_sweep(sweep)
    argv = ["bench", "--tasks", "mlp-digits", "--out", str(tmp_path / "b")]
    code = cli.main(argv + [arg for item in sweep for arg in ("--sweep", item)])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().count("\n") == 0 and re.search(message, err)
    assert not (tmp_path / "b").exists()  # refused before any cell is trained


def test_grid_points_are_the_cartesian_product_in_the_given_order():
    grid = parse_sweep(["lambda_gl=1e-4,1e-3,1e-2", "eps_ps=1e-4,1e-3"])
    points = grid_points(grid)
    assert len(points) == 6 and points[0] == {"lambda_gl": 1e-4, "eps_ps": 1e-4} and points[1]["eps_ps"] == 1e-3
    assert grid_points({}) == [{}]
    assert point_label(points[-1]) == "lambda_gl=0.01,eps_ps=0.001"
    assert applicable({"lambda_gl": 1e-3, "epochs": 3}, "pufferfish") == {"epochs": 3}
    assert applicable({"lambda_gl": 1e-3, "eps_ps": 1e-2}, "maestro-full") == {"lambda_gl": 1e-3, "eps_ps": 1e-2}
