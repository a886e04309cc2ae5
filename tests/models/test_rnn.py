"""The recurrent model: how it reads inputs as sequences, what the head sees, causality."""

from __future__ import annotations

import pytest
import torch

from nnarena.cell import Cell, run_cell
from nnarena.errors import ConfigError
from nnarena.models import create_model
from nnarena.models.rnn import ToSequence, rnn


def test_inputs_are_read_as_sequences() -> None:
    x = torch.randn(2, 3, 5, 7)
    seq = ToSequence()(x)
    assert seq.shape == (2, 5, 21)
    torch.testing.assert_close(seq[:, 2], x[:, :, 2, :].flatten(1))  # step t = row t
    assert ToSequence()(torch.randn(2, 4, 9)).shape == (2, 9, 4)  # (C, L): L steps of C
    assert ToSequence()(torch.randn(2, 9)).shape == (2, 9, 1)  # (L,): L steps of one value


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_each_block_returns_every_step_and_the_head_reads_the_last(cell: str) -> None:
    model = create_model("rnn", (1, 12), 3, hidden=6, depth=2, cell=cell).eval()
    x = torch.randn(4, 1, 12)
    features, out = model.forward_intermediates(x)
    assert [tuple(f.shape) for f in features] == [(4, 12, 6), (4, 12, 6)]
    torch.testing.assert_close(out, model.head[1](features[-1][:, -1]))
    reference = getattr(torch.nn, cell.upper() if cell != "rnn" else "RNN")(1, 6, batch_first=True)
    reference.load_state_dict(model.blocks[0][1].rnn.state_dict())
    torch.testing.assert_close(features[0], reference(x.transpose(1, 2))[0])


def test_states_depend_only_on_earlier_steps() -> None:
    model = create_model("rnn", (10,), 2, hidden=5, depth=2).eval()
    x = torch.randn(3, 10)
    changed = x.clone()
    changed[:, 6:] += 1.0
    before = model.forward_intermediates(x)[0][-1]
    after = model.forward_intermediates(changed)[0][-1]
    torch.testing.assert_close(before[:, :6], after[:, :6])
    assert not torch.allclose(before[:, 6:], after[:, 6:])


def test_bad_settings_are_rejected_with_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"cell 'tcn'.*valid: rnn, gru, lstm"):
        rnn((4,), 2, cell="tcn")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="tcn"):
        create_model("rnn", (4,), 2, cell="tcn")
    with pytest.raises(ConfigError, match="depth must be >= 1"):
        create_model("rnn", (4,), 2, depth=0)


@pytest.mark.slow
def test_backprop_trains_the_rnn_on_digits_row_by_row() -> None:
    result = run_cell(Cell(dataset="digits", model="rnn", trainer={"epochs": 15, "lr": 1e-3}))
    assert result.status == "ok", result.reason
    assert result.metrics["test_accuracy"] >= 0.9
