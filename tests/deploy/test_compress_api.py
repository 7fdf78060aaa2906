"""``ml.compress``: the front of any model (dense or factorised, a loss of one's own), its points as
models and artifacts, and the one-line refusals of bad input with nothing written."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import maestro_lod as ml
from maestro_lod.deploy.artifacts import load_plain
from maestro_lod.engine.search import calibration_loss

from conftest import SmallConvNet


def _task(seed=0, n=192):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=generator)
    y = (x[:, :4].sum(1) > 0).long()
    return x, y


@pytest.fixture(scope="module")
def trained_mlp():
    torch.manual_seed(0)
    x, y = _task()
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 2))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), [(x[i:i + 64], y[i:i + 64]) for i in range(0, len(x), 64)]


@pytest.mark.parametrize("init", ["svd", "whitened"])
def test_a_dense_model_is_factorised_at_full_rank_and_left_unchanged(trained_mlp, init):
    model, batches = trained_mlp
    before = {k: v.clone() for k, v in model.state_dict().items()}
    front = ml.compress(model, batches, batches, init=init)
    assert isinstance(front, ml.CompressedFront) and isinstance(front, ml.deploy.Front)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert front.metadata["factorized"] and front.metadata["init"] == init
    x = torch.cat([b[0] for b in batches])
    torch.testing.assert_close(front.model(0)(x), model(x), atol=1e-5, rtol=1e-4)  # full rank: the same function
    assert front.points[0].params == front.dense_params == ml.count_params(model)
    assert all(p.accuracy is not None for p in front.points)
    point = front.select(params=0.5)
    assert point.params <= 0.5 * front.dense_params
    assert front.model(point) is not front.model(point)  # a copy each time


def test_points_export_and_reproduce_their_figures(trained_mlp, tmp_path):
    model, batches = trained_mlp
    front = ml.compress(model, batches, batches, init="svd")
    point = front.select(params=0.6)
    paths = front.export(point, dir=tmp_path / "p")
    assert {p.name for p in paths} >= {"model.pt2", "model.safetensors", "point.json"}
    record = json.loads((tmp_path / "p" / "point.json").read_text())
    assert record["inputs"] == [{"shape": ["batch", 20], "dtype": "float32"}]
    assert record["outputs"] == [{"shape": ["batch", 2], "dtype": "float32"}]
    program = torch.export.load(tmp_path / "p" / "model.pt2").module()
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert (program(x).argmax(1) == y).float().mean().item() == pytest.approx(point.accuracy)
    plain = load_plain(nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 2)), tmp_path / "p" / "model.safetensors")
    torch.testing.assert_close(plain(x), program(x), atol=1e-5, rtol=1e-4)
    with pytest.raises(ml.ConfigError, match="already exist"):
        front.export(point, dir=tmp_path / "p")
    front.save(tmp_path / "front.json")
    assert ml.deploy.Front.load(tmp_path / "front.json").points[point.index].ranks == point.ranks
    front.save_family(tmp_path / "family.safetensors")
    small = ml.deploy.load_family(tmp_path / "family.safetensors",
                                  lambda: ml.factorize(nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 2))),
                                  point.index)
    torch.testing.assert_close(small(x), front.model(point)(x))


def test_a_factorised_model_is_ordered_and_its_trained_point_kept(trained_mlp):
    model, batches = trained_mlp
    factorised = ml.factorize(nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 2)),
                              ml.FactorizeConfig(init="random")).eval()
    x = torch.cat([b[0] for b in batches])
    fronts = {order: ml.compress(factorised, batches, batches, order=order) for order in ("svd", "whitened", "trained")}
    for order, front in fronts.items():
        assert front.metadata == {"factorized": False, "order": order, "torch": torch.__version__}
        torch.testing.assert_close(front.model(0)(x), factorised(x), atol=1e-5, rtol=1e-4)
        assert front.points[0].accuracy == fronts["trained"].points[0].accuracy
    # random factors: a leading-rank truncation of the SVD order is the best one, that of the trained order is not
    half = {"0": 10, "2": 1}
    error = {order: (ml.deploy.materialize(front.source, half)(x) - factorised(x)).norm().item()
             for order, front in fronts.items()}
    assert error["svd"] < error["trained"] and error["whitened"] < error["trained"]


def test_batchnorm_model_points_match_their_recorded_loss():
    torch.manual_seed(0)
    model = SmallConvNet().eval()
    batches = [(torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))) for _ in range(2)]
    front = ml.compress(model, batches, batches[:1], cost="params", step=0.5)
    for point in front.points[::5]:
        assert calibration_loss(front.model(point), batches) == pytest.approx(point.calibration_loss, rel=1e-6)


def test_a_loss_of_ones_own_on_inputs_only_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 12)).eval()  # an autoencoder
    batches = [torch.randn(32, 12) for _ in range(3)]
    seen = []

    def loss(output, batch):
        seen.append(batch)
        return F.mse_loss(output, batch)

    front = ml.compress(model, batches[:2], batches[2:], loss=loss, init="svd")
    assert any(b is batches[0] for b in seen)  # the batch exactly as given
    assert all(p.accuracy is None and p.val_loss is not None for p in front.points)
    assert front.points[0].val_loss == pytest.approx(F.mse_loss(model(batches[2]), batches[2]).item(), rel=1e-5)
    point = front.select(params=0.5)  # chosen by validation loss
    assert point.val_loss == min(p.val_loss for p in front.points if front.fraction(p, "params") <= 0.5)
    with pytest.raises(ml.ConfigError, match="max_drop needs validation accuracies"):
        front.select(max_drop=0.1)


def test_compress_with_out_writes_what_the_command_writes(trained_mlp, tmp_path):
    model, batches = trained_mlp
    front = ml.compress(model, batches, batches, targets=[("params", 0.5)], out=tmp_path / "out",
                        formats=("pt2",), latency_batch=2)
    assert (tmp_path / "out" / "front.json").is_file() and (tmp_path / "out" / "family.safetensors").is_file()
    chosen = front.select(params=0.5)
    assert json.loads((tmp_path / "out" / "params-0.5" / "point.json").read_text())["point"]["ranks"] == chosen.ranks
    assert front.metadata["init"] == "whitened"
    with pytest.raises(ml.ConfigError, match="already exist"):  # refused before any work
        ml.compress(model, batches, batches, targets=[("params", 0.5)], out=tmp_path / "out")


def _bad(model, batches):
    x, y = batches[0]
    return {
        "empty": (([],), "calibration is empty"),
        "a dataset": ((torch.utils.data.TensorDataset(x, y),), "must be a list or DataLoader"),
        "a bare tensor": (([x],), "tensor of inputs alone"),
        "wrong shape": (([(torch.randn(8, 7), y[:8])],), r"fails on inputs of shape \(8, 7\)"),
        "NaN inputs": (([(torch.full((8, 20), float("nan")), y[:8])],), "NaN or infinite values"),
        "dict batches": (([{"x": x}],), "is a dict"),
    }


@pytest.mark.parametrize("case", ["empty", "a dataset", "a bare tensor", "wrong shape", "NaN inputs", "dict batches"])
def test_bad_batches_one_line_nothing_written(trained_mlp, tmp_path, case):
    model, batches = trained_mlp
    (calibration,), message = _bad(model, batches)[case]
    with pytest.raises(ml.ConfigError, match=message) as info:
        ml.compress(model, calibration, out=tmp_path / "out")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_bad_models_and_options(trained_mlp, tmp_path):
    model, batches = trained_mlp
    broken = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 2))
    with torch.no_grad():
        broken[2].weight.fill_(float("inf"))
        broken[0].weight.fill_(float("inf"))
    with pytest.raises(ml.ConfigError, match="NaN or infinite"):
        ml.compress(broken, batches)
    with pytest.raises(ml.ConfigTypeError, match="must be a torch.nn.Module"):
        ml.compress("model", batches)
    with pytest.raises(ml.ConfigError, match="init='qr'"):
        ml.compress(model, batches, init="qr")
    with pytest.raises(ml.ConfigError, match="order='best'"):
        ml.compress(model, batches, order="best")
    with pytest.raises(ml.ConfigError, match="pass out"):
        ml.compress(model, batches, targets=[("params", 0.5)])
    with pytest.raises(ml.ConfigTypeError, match="scalar tensor"):
        ml.compress(model, [b[0] for b in batches], loss=lambda output, batch: output)
    front = ml.compress(model, batches, init="svd")
    with pytest.raises(ml.ConfigError, match="not an index"):
        front.model(len(front.points))
    assert not list(tmp_path.iterdir())


def test_gpt2_front_with_a_language_model_loss(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                                     eos_token_id=0, use_cache=False)
    model = transformers.GPT2LMHeadModel(config).eval()
    tokens = [torch.randint(0, 64, (8, 16)) for _ in range(3)]

    def lm_loss(output, batch):  # next-token cross-entropy from the logits of a ModelOutput
        return F.cross_entropy(output.logits[:, :-1].reshape(-1, 64), batch[:, 1:].reshape(-1))

    front = ml.compress(model, tokens[:2], tokens[2:], loss=lm_loss, cost="params")
    assert front.metadata["init"] == "whitened" and front.points[0].params == front.dense_params
    with torch.no_grad():
        assert front.points[0].val_loss == pytest.approx(lm_loss(model(tokens[2]), tokens[2]).item(), rel=1e-4)
    point = front.select(params=0.7)
    assert point.index > 0
    front.export(point, dir=tmp_path / "gpt2")
    program = torch.export.load(tmp_path / "gpt2" / "model.pt2").module()
    with torch.no_grad():
        assert lm_loss(program(tokens[2]), tokens[2]).item() == pytest.approx(point.val_loss, rel=1e-5)
    record = json.loads((tmp_path / "gpt2" / "point.json").read_text())
    assert record["inputs"] == [{"shape": ["batch", 16], "dtype": "int64"}]
    plain = load_plain(transformers.GPT2LMHeadModel(config), tmp_path / "gpt2" / "model.safetensors")
    with torch.no_grad():
        assert lm_loss(plain(tokens[2]), tokens[2]).item() == pytest.approx(point.val_loss, rel=1e-5)


def test_torchvision_resnet18_front(tmp_path):
    torchvision = pytest.importorskip("torchvision", reason="torchvision is an optional extra")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))) for _ in range(2)]
    front = ml.compress(model, batches[:1], batches[1:], cost="params", step=1.0, init="svd")
    assert front.points[0].params == front.dense_params == ml.count_params(model)
    point = front.select(params=0.5)
    front.export(point, formats=("pt2", "safetensors"), dir=tmp_path / "r18")
    program = torch.export.load(tmp_path / "r18" / "model.pt2").module()
    with torch.no_grad():
        loss = F.cross_entropy(program(batches[1][0]), batches[1][1]).item()
    assert loss == pytest.approx(point.val_loss, rel=1e-4)
    plain = load_plain(torchvision.models.resnet18(num_classes=10), tmp_path / "r18" / "model.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(plain(batches[1][0]), program(batches[1][0]), atol=1e-4, rtol=1e-3)
