"""``maestro-lod bench`` on a tiny budget: every cell is a run directory, results and plots are
written, finished cells are not recomputed, and the suite's configs round-trip through TOML."""

import json

from maestro_lod import cli
from maestro_lod.commands.bench import SUITES, VARIANTS, cell_config, config_toml
from maestro_lod.training import TrainConfig
from maestro_lod.training.config import read_toml


def test_every_cell_config_round_trips_through_the_toml_the_train_command_reads(tmp_path):
    for suite in SUITES.values():
        for task in suite.tasks:
            for method in VARIANTS:
                config = cell_config(task, method, 2, None)
                path = tmp_path / "cell.toml"
                path.write_text(config_toml(config))
                assert TrainConfig.from_dict(read_toml(path)) == config, (task.name, method)
    assert cell_config(SUITES["quick"].tasks[0], "maestro-no-gl", 0, None).lambda_gl == 0.0
    assert cell_config(SUITES["quick"].tasks[0], "svd", 0, 2).svd_finetune_epochs == 1


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
