"""Export gives plain torch.nn models with the same outputs and the same cost as the factorised model."""

import io

import pytest
import torch
from safetensors.torch import load, save
from torch import nn

from maestro_lod import count_macs, count_params, export, factorize, rank_pattern, truncate_


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1, groups=2), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1, groups=64), nn.ReLU(),  # depthwise: skipped
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10),
    )


def _only_torch_nn(model: nn.Module) -> bool:
    return all(type(m).__module__.startswith("torch.nn.") for m in model.modules())


@pytest.mark.parametrize("merge", ["never", "always", "auto"])
def test_export_is_plain_torch_with_equal_outputs(merge):
    model = factorize(_cnn()).eval()
    truncate_(model, {"0": 4, "3": 6, "9": 12, "11": 5})
    exported = export(model, merge=merge).eval()
    assert _only_torch_nn(exported)
    assert not _only_torch_nn(model)
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(exported(x), model(x), rtol=1e-5, atol=1e-5)


def test_export_never_has_the_factorised_params_and_macs():
    model = factorize(_cnn()).eval()
    truncate_(model, {"0": 4, "3": 6, "9": 12, "11": 5})
    exported = export(model, merge="never")
    x = torch.randn(1, 3, 16, 16)
    assert count_params(exported) == count_params(model)
    assert count_macs(exported, x) == count_macs(model, x)
    # auto never keeps a pair that is larger than the dense layer
    auto = export(model, merge="auto")
    assert count_params(auto) <= count_params(exported)


def test_active_rank_is_exported_and_the_source_model_is_untouched():
    model = factorize(nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4)))
    model[0].active_rank = 3
    exported = export(model, merge="never")
    assert exported[0][0].out_features == 3
    assert model[0].rank == 16 and model[0].active_rank == 3
    x = torch.randn(2, 20)
    torch.testing.assert_close(exported(x), model(x))


def test_macs_of_a_factorised_linear_at_rank_b():
    model = factorize(nn.Sequential(nn.Linear(64, 32)))
    truncate_(model, {"0": 5})
    assert count_macs(model, torch.randn(3, 64)) == 3 * 5 * (64 + 32)
    assert count_params(model) == 5 * (64 + 32) + 32


def test_state_dict_round_trip_through_safetensors_across_ranks():
    model = factorize(_cnn())
    truncate_(model, {"0": 7, "3": 9, "11": 2})
    blob = save(model.state_dict())
    fresh = factorize(_cnn())
    fresh.load_state_dict(load(blob), strict=True)
    assert rank_pattern(fresh) == rank_pattern(model)
    x = torch.randn(2, 3, 16, 16)
    model.eval(), fresh.eval()
    torch.testing.assert_close(fresh(x), model(x))
    buffer = io.BytesIO()
    torch.save(export(model).state_dict(), buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True).keys() == export(model).state_dict().keys()


def test_bad_merge_mode():
    with pytest.raises(ValueError, match="merge='sometimes'"):
        export(factorize(nn.Linear(3, 3)), merge="sometimes")


def test_export_leaves_the_global_random_generator_alone():
    """Exporting mid-training must not change the run's later draws (data order, dropout masks):
    the plain layers it builds are never randomly initialised."""
    torch.manual_seed(0)
    model = factorize(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)))
    attention = factorize(nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 1))
    for factorised, merge in ((model, "auto"), (model, "always"), (model, "never"), (attention, "auto")):
        state = torch.get_rng_state()
        export(factorised, merge=merge)
        assert torch.equal(torch.get_rng_state(), state), merge
