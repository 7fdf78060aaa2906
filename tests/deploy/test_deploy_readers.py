"""The front's costs are those of the artifacts for a model whose own code reads its layers: a
layer it multiplies by (merged in every artifact) costs its dense size at every point and is never
cut, a layer it reads only for metadata keeps its savings, and every point's recorded parameters
and MACs equal those counted on the deployed model and on the loaded ``.pt2`` program."""

import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import maestro_lod as ml
from maestro_lod.deploy import deployable, greedy_front, materialize
from maestro_lod.deploy.artifacts import build_artifacts, program_macs
from maestro_lod.export import MergedForReaders
from maestro_lod.layers import LowRankLinear


class ReadingNet(nn.Module):
    """``mix`` is multiplied by through its weight (its forward never runs, as in Swin's attention);
    ``proj`` is read for its size only; ``head`` is not read."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Linear(24, 48)
        self.proj = nn.Linear(48, 32)
        self.head = nn.Linear(32, 6)

    def forward(self, x):
        hidden = torch.relu(F.linear(x, self.mix.weight, self.mix.bias))
        assert hidden.shape[-1] == self.proj.in_features
        return self.head(torch.relu(self.proj(hidden)))


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = ml.factorize(ReadingNet()).eval()
    ml.truncate_(model, {"mix": 8, "proj": 12, "head": 4})  # ranks at which pairs are smaller than dense
    x = torch.randn(256, 24)
    with torch.no_grad():
        y = model(x).argmax(-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MergedForReaders)
        front = greedy_front(model, [(x, y)], cost="params", step=0.5)
    return model, x, front


def test_a_multiplied_layer_costs_its_dense_size_and_is_never_cut(setup):
    model, _, front = setup
    assert {p.ranks["mix"] for p in front.points} == {model.mix.rank}
    assert front.points[-1].ranks["proj"] == 1 and front.points[-1].ranks["head"] == 1
    as_pairs = ml.count_params(ml.export(model, merge="never"))  # what a cost model of pairs would say
    assert front.trained.params == as_pairs - model.mix.rank * (24 + 48) + 24 * 48


def test_every_point_costs_what_its_deployed_model_costs(setup):
    model, x, front = setup
    example = x[:1]
    with pytest.warns(MergedForReaders, match="mix"):
        for point in front.points:
            deployed = deployable(materialize(model, point), example)
            assert type(deployed.mix) is nn.Linear
            assert (point.params, point.macs) == (ml.count_params(deployed), ml.count_macs(deployed, example))
    with pytest.warns(MergedForReaders):
        assert type(deployable(model, example).proj) is LowRankLinear  # read for its size only: kept


def test_the_pt2_artifact_costs_what_the_front_records(setup):
    model, x, front = setup
    point = front.points[len(front.points) // 2]
    with pytest.warns(MergedForReaders):
        files, report = build_artifacts(materialize(model, point), ["pt2", "safetensors"], [x[:16], x[:3]],
                                        ReadingNet)
    loaded = torch.export.load(io.BytesIO(files["pt2"])).module()
    assert ml.count_params(loaded) == point.params and program_macs(loaded, x[:1]) == point.macs
    assert report["costs"]["pt2"] == {"params": point.params, "macs": point.macs}
    # the plain form merges the size-read layer too (a pair has no in_features): never cheaper
    assert report["costs"]["safetensors"]["params"] >= point.params
