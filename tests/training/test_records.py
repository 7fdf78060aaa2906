"""Records of a run: step numbers, epoch sums and means, and the mappings written to metrics.jsonl
and summary.json."""

import json
from collections.abc import Mapping

import pytest
import torch

from maestro_lod.training.records import EpochRecord, EpochTotals, RunSummary, StepStats


def _record(**changes):
    values = dict(epoch=3, phase="maestro", train_loss=1.25, train_loss_full=0.5, train_loss_sampled=0.625,
                  train_penalty=0.125, train_accuracy=0.75, lr=0.01, val_loss=0.875, val_accuracy=0.8,
                  ranks={"conv1": 4, "fc": 7}, total_rank=11, params=1234, macs=56789, train_time=1.5,
                  epoch_time=2.0)
    values.update(changes)
    return EpochRecord(**values)


def _summary(**changes):
    values = dict(model="lenet5", data="mnist5k", method="maestro", kind="classification", epochs=4, device="cpu",
                  final_accuracy=0.9, final_loss=0.3, initial_ranks={"a": 6, "b": 16}, final_ranks={"a": 3, "b": 9},
                  params=300, dense_params=1200, macs=5000, dense_macs=20000, exported_params=280,
                  exported_macs=4900, train_time=12.5)
    values.update(changes)
    return RunSummary(**values)


def test_step_stats_from_tensor_and_objective():
    stats = StepStats.from_tensor(torch.tensor([1.5, 1.0, 0.5, 7.0, 8.0]), torch.tensor(0.25, dtype=torch.float64))
    assert stats == StepStats(loss=1.5, loss_full=1.0, loss_sampled=0.5, correct=7.0, count=8.0, penalty=0.25)
    assert all(isinstance(v, float) for v in stats)
    assert stats.objective == 1.75


def test_epoch_totals_sum_steps_and_average_them_under_record_names():
    totals = EpochTotals()
    assert totals.accuracy == 0.0  # no positions yet: no division by zero
    assert totals.means() == {"train_loss": 0.0, "train_loss_full": 0.0, "train_loss_sampled": 0.0,
                              "train_penalty": 0.0, "train_accuracy": 0.0}
    totals.add(StepStats(3.0, 2.0, 1.0, 6.0, 8.0, 0.5))
    totals.add(StepStats(1.0, 0.5, 0.5, 2.0, 4.0, 0.25))
    assert totals.steps == 2
    assert totals.sums == StepStats(4.0, 2.5, 1.5, 8.0, 12.0, 0.75)
    assert totals.accuracy == pytest.approx(8 / 12)  # over positions, not a mean of per-step accuracies
    assert totals.means() == pytest.approx({"train_loss": (4.0 + 0.75) / 2, "train_loss_full": 1.25,
                                            "train_loss_sampled": 0.75, "train_penalty": 0.375,
                                            "train_accuracy": 8 / 12})


def test_epoch_record_is_a_read_only_mapping_in_file_order():
    record = _record(extra={"train_macs": 99, "lambda_gl": 0.5})
    assert isinstance(record, Mapping)
    assert list(record) == ["epoch", "phase", "train_loss", "train_loss_full", "train_loss_sampled", "train_penalty",
                            "train_accuracy", "lr", "val_loss", "val_accuracy", "ranks", "total_rank", "params",
                            "macs", "train_time", "epoch_time", "train_macs", "lambda_gl"]
    assert len(record) == 18
    assert record["val_loss"] == record.val_loss == 0.875
    assert record["train_macs"] == 99  # extras read like fields
    with pytest.raises(KeyError):
        record["val_perplexity"]  # only language tasks have it
    assert "val_perplexity" not in record
    with pytest.raises(TypeError):
        record["epoch"] = 4
    record.to_dict()["ranks"]["fc"] = 0  # a copy: the record keeps its ranks
    assert record.ranks == {"conv1": 4, "fc": 7}


def test_epoch_record_perplexity_goes_after_val_accuracy():
    keys = list(_record(val_perplexity=2.5))
    assert keys[keys.index("val_accuracy") + 1] == "val_perplexity"
    assert _record(val_perplexity=2.5)["val_perplexity"] == 2.5


def test_epoch_record_round_trips_through_json_with_extras():
    record = _record(val_perplexity=3.0, extra={"train_macs": 10, "target_met": True})
    line = json.dumps(record.to_dict())
    back = EpochRecord.from_dict(json.loads(line))
    assert back.extra == {"train_macs": 10, "target_met": True}
    assert back.val_perplexity == 3.0 and back.ranks == {"conv1": 4, "fc": 7}
    assert back == record and back.to_dict() == record.to_dict()
    assert json.dumps(back.to_dict()) == line  # same bytes in metrics.jsonl


def test_epoch_record_equality_compares_the_written_keys():
    record = _record()
    assert record == record.to_dict()
    assert record != {**record.to_dict(), "val_loss": 0.9}
    assert record != _record(extra={"train_macs": 1})
    assert record != [("epoch", 3)]
    assert _record(ranks={"conv1": 4, "fc": 6}) != record


def test_run_summary_derives_totals_and_ratios():
    summary = _summary()
    assert summary.initial_total_rank == 22 and summary.final_total_rank == 12
    assert summary.params_ratio == 0.25 and summary.macs_ratio == 0.25
    assert _summary(dense_macs=0, macs=7).macs_ratio == 7.0  # no division by zero
    data = summary.to_dict()
    assert list(data) == ["model", "data", "method", "kind", "epochs", "device", "final_accuracy", "final_loss",
                          "initial_ranks", "final_ranks", "initial_total_rank", "final_total_rank", "params",
                          "dense_params", "params_ratio", "macs", "dense_macs", "macs_ratio", "exported_params",
                          "exported_macs", "train_time"]
    assert summary["final_total_rank"] == 12 and summary["macs_ratio"] == 0.25
    assert dict(summary) == data and len(summary) == len(data)


def test_run_summary_perplexity_and_extras():
    summary = _summary(final_perplexity=5.5, extra={"world_size": 2, "train_macs": 123})
    keys = list(summary)
    assert keys[keys.index("final_loss") + 1] == "final_perplexity"
    assert keys[-2:] == ["world_size", "train_macs"]
    assert summary["world_size"] == 2
    assert json.loads(json.dumps(summary.to_dict()))["final_perplexity"] == 5.5
    assert "final_perplexity" not in _summary()
