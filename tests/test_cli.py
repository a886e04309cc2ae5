from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from nnarena.cli import app
from nnarena.registry import REGISTRY

runner = CliRunner()


def test_list_json_comes_from_the_registry() -> None:
    result = runner.invoke(app, ["list", "rule", "--json"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)
    assert [e["name"] for e in listed] == REGISTRY.names("rule")
    assert {"name", "family", "paper", "summary", "params", "capabilities"} <= set(listed[0])


def test_list_table_shows_every_family() -> None:
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0
    for family in ("dataset", "model", "rule", "optimizer"):
        assert family in result.stdout


def test_train_json_writes_a_complete_run_folder(tmp_path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--dataset", "digits", "--model", "mlp-tiny",
                                 "--epochs", "2", "--seed", "3", "--out", str(out), "--json",
                                 "lr=0.01", "model.width=16", "batch_size=32"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout[result.stdout.index("{"):])
    assert metrics["status"] == "ok" and metrics["epochs"] == 2
    for name in ("config.json", "metrics.jsonl", "result.json", "weights.safetensors"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())["cell"]
    assert config["model_kwargs"] == {"width": 16}
    assert config["trainer"] == {"lr": 0.01, "batch_size": 32, "epochs": 2.0}
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_train_table_output(tmp_path) -> None:
    result = runner.invoke(app, ["train", "--dataset", "digits", "--model", "linear",
                                 "--epochs", "1", "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert "test_accuracy" in result.stdout and "status" in result.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--dataset", "mnist5"], "unknown dataset 'mnist5' (did you mean 'mnist5k'"),
    (["--model", "mpl"], "unknown model 'mpl' (did you mean 'mlp'"),
    (["--rule", "backpro"], "unknown rule 'backpro' (did you mean 'backprop'"),
    (["lr=fast"], "trainer lr: cannot read 'fast' as float"),
    (["learning_rate=0.1"], "unknown trainer setting 'learning_rate'"),
    (["model.widht=3"], "model 'mlp' has no parameter 'widht' (did you mean 'width'"),
    (["optimizer=adm"], "unknown optimizer 'adm' (did you mean 'adam'"),
    (["layer.bias=maybe"], "cannot read 'maybe'"),
    (["lr"], "setting 'lr' is not key=value"),
    (["--epochs", "0"], "epochs must be > 0"),
])
def test_bad_input_gives_one_clear_line_and_exit_code_2(args, message, tmp_path) -> None:
    result = runner.invoke(app, ["train", "--out", str(tmp_path / "r"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr.replace("\n", " ") or message in result.output
    assert not (tmp_path / "r").exists()
