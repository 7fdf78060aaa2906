"""BatchNorm recalibration: an exact cumulative average over the given batches."""

import torch
from conftest import SmallConvNet

from maestro_lod.engine.batchnorm import recalibrate_batchnorm


def test_batchnorm_recalibration_is_the_exact_average_over_batches():
    model = SmallConvNet()
    model.bn1.running_mean.fill_(5.0)
    batches = [torch.randn(8, 1, 8, 8) + i for i in range(3)]
    used = recalibrate_batchnorm(model, batches, model, max_batches=2)
    assert used == 2
    expected = torch.stack([model.conv1(b).mean(dim=(0, 2, 3)) for b in batches[:2]]).mean(0)
    torch.testing.assert_close(model.bn1.running_mean, expected.detach(), rtol=1e-5, atol=1e-6)
    assert model.bn1.momentum == 0.1 and model.training
