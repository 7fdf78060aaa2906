"""The README's library example runs as written and does what its comments say."""

import re
from pathlib import Path

import torch
from torch import nn

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_library_example_trains_shrinks_and_exports():
    code = re.search(r"## The library in ten lines\s+```python\n(.*?)```", README.read_text(), re.S).group(1)
    torch.manual_seed(0)
    x = torch.randn(256, 20)
    y = (x[:, :4].sum(1) > 0).long()  # a task that a rank-1 first layer can solve
    namespace = {
        "my_model": nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 2)),
        "loader": [(x[i:i + 32], y[i:i + 32]) for i in range(0, 256, 32)],
        "epochs": 200,
    }
    exec(compile(code, str(README), "exec"), namespace)
    model, deployable = namespace["model"], namespace["deployable"]
    assert all(type(m).__module__.startswith("torch.nn.") for m in deployable.modules())
    assert model[0].rank < 20  # ranks were shrunk during training
    torch.testing.assert_close(deployable(x), model(x))
    assert (deployable(x).argmax(1) == y).float().mean() > 0.9


def test_readme_compress_example_runs_as_written(tmp_path, monkeypatch):
    code = re.search(r"### Compressing any model\s+```python\n(.*?)```", README.read_text(), re.S).group(1)
    torch.manual_seed(0)
    x = torch.randn(128, 20)
    y = (x[:, :4].sum(1) > 0).long()
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 2))
    batches = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 128, 64)]
    monkeypatch.chdir(tmp_path)
    namespace = {"ml": __import__("maestro_lod"), "model": model, "calibration": batches, "validation": batches}
    exec(compile(code, str(README), "exec"), namespace)
    point, small = namespace["point"], namespace["small"]
    assert point.params <= 0.5 * namespace["front"].dense_params
    assert (tmp_path / "half" / "model.pt2").is_file() and (tmp_path / "front.json").is_file()
    program = torch.export.load(tmp_path / "half" / "model.pt2").module()
    torch.testing.assert_close(program(x), small(x), atol=1e-5, rtol=1e-4)
