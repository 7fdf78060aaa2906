"""Every library entry point checks its arguments: a bad call raises a ``MaestroError`` (a
``ValueError`` or ``TypeError`` too) whose one-line message names the offending value, and the
good calls next to them keep working."""

import warnings

import pytest
import torch
from torch import nn

import maestro_lod as ml
from maestro_lod.errors import ConfigError, ConfigTypeError, MaestroError


def _dense() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))


def _factorised() -> nn.Module:
    return ml.factorize(_dense())


def _with_weight(value: float, name: str = "weight") -> nn.Module:
    model = _dense()
    with torch.no_grad():
        getattr(model[0], name)[0, ...] = value
    return model


def _with_nan_factor() -> nn.Module:
    model = _factorised()
    with torch.no_grad():
        model[0].up[0, 0] = float("nan")
    return model


def _other_optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD(_factorised().parameters(), lr=0.1, momentum=0.9)


X = torch.randn(2, 8)

# (id, call, exception class, text the message must contain)
BAD_CALLS = [
    # factorize / plan: the model, the config, the weights
    ("factorize-none", lambda: ml.factorize(None), ConfigTypeError, "model=None"),
    ("factorize-string", lambda: ml.factorize("resnet18"), ConfigTypeError, "model='resnet18'"),
    ("factorize-class", lambda: ml.factorize(nn.Linear), ConfigTypeError, "model=Linear"),
    ("factorize-nan-weight", lambda: ml.factorize(_with_weight(float("nan"))), ConfigError, "NaN"),
    ("factorize-inf-weight", lambda: ml.factorize(_with_weight(float("inf"))), ConfigError, "inf"),
    ("factorize-inf-bias", lambda: ml.factorize(_with_weight(float("-inf"), "bias")), ConfigError, "'bias'"),
    ("factorize-config-dict", lambda: ml.factorize(_dense(), {"rank": 2}), ConfigTypeError, "config={'rank': 2}"),
    ("factorize-config-zero", lambda: ml.factorize(_dense(), 0), ConfigTypeError, "config=0"),
    ("plan-none", lambda: ml.plan(None), ConfigTypeError, "model=None"),
    ("plan-config-string", lambda: ml.plan(_dense(), "svd"), ConfigTypeError, "config='svd'"),
    # FactorizeConfig
    ("config-seed-huge", lambda: ml.FactorizeConfig(seed=2**70, init="random"), ConfigError, str(2**70)),
    ("config-seed-2**64", lambda: ml.FactorizeConfig(seed=2**64), ConfigError, str(2**64)),
    ("config-seed-negative", lambda: ml.FactorizeConfig(seed=-1), ConfigError, "seed=-1"),
    ("config-seed-float", lambda: ml.FactorizeConfig(seed=1.5), ConfigTypeError, "seed=1.5"),
    ("config-seed-bool", lambda: ml.FactorizeConfig(seed=True), ConfigTypeError, "seed=True"),
    ("config-seed-string", lambda: ml.FactorizeConfig(seed="7"), ConfigTypeError, "seed='7'"),
    ("config-from-dict-seed", lambda: ml.FactorizeConfig.from_dict({"seed": 2**70}), ConfigError, str(2**70)),
    ("config-min-rank-negative", lambda: ml.FactorizeConfig(min_rank=-1), ConfigError, "min_rank=-1"),
    ("config-min-rank-bool", lambda: ml.FactorizeConfig(min_rank=True), ConfigTypeError, "min_rank=True"),
    ("config-min-rank-string", lambda: ml.FactorizeConfig(min_rank="2"), ConfigTypeError, "min_rank='2'"),
    ("config-rank-negative", lambda: ml.FactorizeConfig(rank=-1), ConfigError, "rank=-1"),
    ("config-rank-nan", lambda: ml.FactorizeConfig(rank=float("nan")), ConfigError, "rank=nan"),
    ("config-rank-bool", lambda: ml.FactorizeConfig(rank=True), ConfigTypeError, "True"),
    ("config-init-none", lambda: ml.FactorizeConfig(init=None), ConfigTypeError, "init=None"),
    ("config-init-unknown", lambda: ml.FactorizeConfig(init="qr"), ConfigError, "init='qr'"),
    ("config-damping-nan", lambda: ml.FactorizeConfig(damping=float("nan")), ConfigError, "damping=nan"),
    ("config-target-int", lambda: ml.FactorizeConfig(target_modules=5), ConfigTypeError, "5"),
    ("config-rank-pattern-key", lambda: ml.FactorizeConfig(rank_pattern={None: 2}), ConfigTypeError, "key None"),
    ("config-rank-pattern-zero", lambda: ml.FactorizeConfig(rank_pattern={"0": 0}), ConfigError, "rank_pattern['0']=0"),
    # truncate_
    ("truncate-none", lambda: ml.truncate_(None, {"0": 1}), ConfigTypeError, "model=None"),
    ("truncate-string", lambda: ml.truncate_("model", {"0": 1}), ConfigTypeError, "model='model'"),
    ("truncate-negative", lambda: ml.truncate_(_factorised(), {"0": -1}), ConfigError, "rank -1"),
    ("truncate-above", lambda: ml.truncate_(_factorised(), {"0": 100}), ConfigError, "rank 100"),
    ("truncate-unknown-layer", lambda: ml.truncate_(_factorised(), {"fc9": 1}), ConfigError, "'fc9'"),
    ("truncate-name-int", lambda: ml.truncate_(_factorised(), {0: 1}), ConfigTypeError, "layer name 0"),
    ("truncate-rank-bool", lambda: ml.truncate_(_factorised(), {"0": True}), ConfigTypeError, "True"),
    ("truncate-rank-float", lambda: ml.truncate_(_factorised(), {"0": 2.0}), ConfigTypeError, "2.0"),
    ("truncate-ranks-list", lambda: ml.truncate_(_factorised(), [("0", 2)]), ConfigTypeError, "ranks=[('0', 2)]"),
    ("truncate-optimizer-string", lambda: ml.truncate_(_factorised(), {"0": 2}, "sgd"), ConfigTypeError,
     "optimizer='sgd'"),
    ("truncate-other-optimizer", lambda: ml.truncate_(_factorised(), {"0": 2}, _other_optimizer()), ConfigError,
     "SGD"),
    ("truncate-dense-model", lambda: ml.truncate_(_dense(), {"0": 2}), ConfigError, "factorize() first"),
    # shrink_
    ("shrink-none", lambda: ml.shrink_(None, 0.1), ConfigTypeError, "model=None"),
    ("shrink-string", lambda: ml.shrink_("model", 0.1), ConfigTypeError, "model='model'"),
    ("shrink-threshold-nan", lambda: ml.shrink_(_factorised(), float("nan")), ConfigError, "threshold=nan"),
    ("shrink-threshold-negative", lambda: ml.shrink_(_factorised(), -1.0), ConfigError, "threshold=-1.0"),
    ("shrink-threshold-string", lambda: ml.shrink_(_factorised(), "0.1"), ConfigTypeError, "threshold='0.1'"),
    ("shrink-threshold-bool", lambda: ml.shrink_(_factorised(), True), ConfigTypeError, "threshold=True"),
    ("shrink-meta-device", lambda: ml.shrink_(_factorised().to("meta"), 0.1), ConfigError, "meta device"),
    ("shrink-nan-factor", lambda: ml.shrink_(_with_nan_factor(), 0.1), ConfigError, "NaN"),
    ("shrink-other-optimizer", lambda: ml.shrink_(_factorised(), 0.1, _other_optimizer()), ConfigError, "SGD"),
    ("shrink-optimizer-module", lambda: ml.shrink_(_factorised(), 0.1, _dense()), ConfigTypeError,
     "optimizer=Sequential("),
    # cost and queries
    ("count-params-none", lambda: ml.count_params(None), ConfigTypeError, "model=None"),
    ("count-params-string", lambda: ml.count_params("model"), ConfigTypeError, "model='model'"),
    ("count-macs-none", lambda: ml.count_macs(None, X), ConfigTypeError, "model=None"),
    ("count-macs-string-input", lambda: ml.count_macs(_dense(), "x"), ConfigTypeError, "'x'"),
    ("count-macs-list-input", lambda: ml.count_macs(_dense(), [X]), ConfigTypeError, "list"),
    ("count-macs-kwargs-int", lambda: ml.count_macs(_dense(), X, kwargs=1), ConfigTypeError, "got 1"),
    ("count-macs-kwargs-key", lambda: ml.count_macs(_dense(), X, kwargs={1: X}), ConfigTypeError, "key 1"),
    ("layer-summary-none", lambda: ml.layer_summary(None), ConfigTypeError, "model=None"),
    ("rank-pattern-none", lambda: ml.rank_pattern(None), ConfigTypeError, "model=None"),
    ("rank-pattern-string", lambda: ml.rank_pattern("model"), ConfigTypeError, "model='model'"),
    ("low-rank-layers-none", lambda: ml.low_rank_layers(None), ConfigTypeError, "model=None"),
    ("importances-string", lambda: ml.importances("model"), ConfigTypeError, "model='model'"),
    ("group-lasso-none", lambda: ml.group_lasso(None), ConfigTypeError, "model=None"),
    ("sampled-ranks-none", lambda: ml.sampled_ranks(None, ml.IndependentSampler(seed=0)).__enter__(),
     ConfigTypeError, "model=None"),
    # export
    ("export-none", lambda: ml.export(None), ConfigTypeError, "model=None"),
    ("export-string", lambda: ml.export("model"), ConfigTypeError, "model='model'"),
    ("export-inputs-string", lambda: ml.export(_factorised(), example_inputs="bad"), ConfigTypeError,
     "example_inputs='bad'"),
    ("export-inputs-int", lambda: ml.export(_factorised(), example_inputs=3), ConfigTypeError, "example_inputs=3"),
    ("export-inputs-dict", lambda: ml.export(_factorised(), example_inputs={"x": 1}), ConfigTypeError,
     "example_kwargs"),
    ("export-kwargs-list", lambda: ml.export(_factorised(), example_kwargs=[X]), ConfigTypeError,
     "example_kwargs=[tensor(shape=(2, 8)"),
    ("export-kwargs-key", lambda: ml.export(_factorised(), example_kwargs={1: X}), ConfigTypeError, "key 1"),
    ("export-keep-int", lambda: ml.export(_factorised(), keep=5), ConfigTypeError, "keep=5"),
    ("export-keep-string", lambda: ml.export(_factorised(), keep="LowRankLinear"), ConfigTypeError,
     "keep='LowRankLinear'"),
    ("export-keep-instance", lambda: ml.export(_factorised(), keep=(nn.Linear(2, 2),)), ConfigTypeError,
     "keep=(Linear(...),)"),
    ("export-keep-not-module", lambda: ml.export(_factorised(), keep=(int,)), ConfigTypeError, "int"),
    ("export-merge-unknown", lambda: ml.export(_factorised(), merge="sometimes"), ConfigError, "merge='sometimes'"),
    ("export-merge-bool", lambda: ml.export(_factorised(), merge=True), ConfigTypeError, "merge=True"),
    ("export-keep-read-string", lambda: ml.export(_factorised(), keep_read="yes"), ConfigTypeError,
     "keep_read='yes'"),
]


@pytest.mark.parametrize("call, error, text", [case[1:] for case in BAD_CALLS], ids=[case[0] for case in BAD_CALLS])
def test_a_bad_call_raises_a_maestro_error_naming_the_value(call, error, text):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error) as caught:
            call()
    assert isinstance(caught.value, MaestroError)
    assert isinstance(caught.value, TypeError if error is ConfigTypeError else ValueError)
    message = str(caught.value)
    assert text in message, message
    assert "\n" not in message


def test_the_bad_calls_have_distinct_ids():
    assert len({case[0] for case in BAD_CALLS}) == len(BAD_CALLS)


def test_min_rank_above_every_layer_is_warned_about_in_one_line():
    with pytest.warns(UserWarning, match=r"min_rank=1000 exceeds the full rank of every factorised layer \(at most 6\)") \
            as caught:
        model = ml.factorize(_dense(), ml.FactorizeConfig(min_rank=1000))
    assert all("\n" not in str(w.message) for w in caught)
    assert ml.rank_pattern(model) == {"0": 6, "2": 4}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ml.factorize(_dense(), ml.FactorizeConfig(min_rank=5))  # above one layer's rank only: no warning


def test_the_good_calls_still_work():
    config = ml.FactorizeConfig(init="random", seed=2**64 - 1, min_rank=0, rank=0.5)
    assert ml.FactorizeConfig.from_dict(config.to_dict()) == config
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = ml.factorize(_dense(), config)
    assert ml.rank_pattern(model) == {"0": 3, "2": 2}
    assert dict(ml.low_rank_layers(model)).keys() == {"0", "2"}
    assert "total" in ml.layer_summary(model)
    assert ml.count_params(model) == 3 * (8 + 6) + 6 + 2 * (6 + 4) + 4
    assert ml.count_macs(model, X) == 2 * (3 * (8 + 6) + 2 * (6 + 4))
    assert ml.count_macs(model, (X,), kwargs={}) == ml.count_macs(model, X)
    optimizer = torch.optim.Adam(model.parameters())
    model(X).sum().backward()
    optimizer.step()
    assert ml.truncate_(model, {"0": 2}, optimizer) == {"0": (3, 2)}
    assert ml.shrink_(model, 0.0, optimizer=optimizer) == {"0": (2, 2), "2": (2, 2)}
    head_only = torch.optim.SGD(model[2].parameters(), lr=0.1)  # part of the model: accepted
    assert ml.truncate_(model, {"2": 1}, head_only) == {"2": (2, 1)}
    for kept in (ml.LowRankLinear, (ml.LowRankLinear,), [ml.Factorized]):
        assert type(ml.export(model, keep=kept)[0]) is ml.LowRankLinear
    exported = ml.export(model, merge="never", example_inputs=[X], example_kwargs={})
    torch.testing.assert_close(exported(X), model(X))
    assert ml.factorize(nn.Linear(8, 6)).rank == 6  # a single layer is a model too


def test_a_meta_device_model_can_still_be_factorised_and_truncated():
    model = ml.factorize(_dense().to("meta"))
    assert ml.truncate_(model, {"0": 2}) == {"0": (6, 2)}
    assert model[0].up.is_meta


def test_inputs_the_model_rejects_keep_the_model_s_own_error():
    with pytest.raises(RuntimeError):
        ml.count_macs(_dense(), torch.randn(2, 5))
