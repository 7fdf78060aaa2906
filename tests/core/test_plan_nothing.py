"""A plan of a model with no supported layer says what it found and why nothing is factorised."""

import pytest
from torch import nn

import maestro_lod as ml


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(8, 16)
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        return self.norm(self.lstm(x)[0])


def test_plan_of_an_lstm_names_the_modules_and_why_none_is_factorised():
    table = str(ml.plan(Recurrent()))
    lines = table.splitlines()
    assert lines[2].split()[:3] == ["lstm", "LSTM", "-"] and "no handler for LSTM" in lines[2]
    assert "1,696 left dense; 1,696 after factorize" in lines[4]
    assert lines[-1] == ("nothing to factorise: no supported layer found (supported: nn.Linear, "
                         "nn.Conv1d/Conv2d/Conv3d, nn.MultiheadAttention, transformers Conv1D); the modules with "
                         "parameters, lstm (LSTM), norm (LayerNorm), have no handler")
    with pytest.raises(ml.ConfigError, match=r"^nothing to factorise: .*lstm \(LSTM\), norm \(LayerNorm\)"):
        ml.factorize(Recurrent())


def test_a_plan_with_factorised_layers_ends_with_its_totals():
    table = str(ml.plan(nn.Sequential(nn.Linear(8, 8), nn.LSTM(8, 8))))
    assert table.splitlines()[-1].startswith("total") and "nothing to factorise" not in table
