"""The ``nnarena`` command: ``list`` and ``train`` (the arena's ``bench`` commands join later)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from nnarena.cell import TRAINER_KEYS, Cell, run_cell
from nnarena.errors import ConfigError, NNArenaError
from nnarena.registry import REGISTRY, closest
from nnarena.train import default_progress

app = typer.Typer(add_completion=False, no_args_is_help=False,
                  help="Neural-network methods from recent papers, side by side.")
_out = Console()
_err = Console(stderr=True)

_PREFIXES = {"data": "dataset_kwargs", "model": "model_kwargs", "rule": "rule_kwargs"}


@app.command("list")
def list_cmd(
    family: Annotated[str | None, typer.Argument(help="dataset, layer, model, rule, ...")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List registered components (all families, or one)."""
    entries = REGISTRY.list(family)
    if as_json:
        print(json.dumps([e.to_json() for e in entries], indent=2))
        return
    table = Table("family", "name", "paper", "summary", "parameters")
    for e in entries:
        params = ", ".join(p.name if p.required else f"{p.name}={p.to_json()['default']}"
                           for p in e.params if p.name not in _FILLED)
        name = e.name + (" (experimental)" if e.status == "experimental" else "")
        table.add_row(e.family, name, e.paper or "", e.summary, params)
    _out.print(table)


_FILLED = {"input_shape", "n_outputs", "in_features", "out_features", "params", "seed",
           "total_steps"}


@app.command()
def train(
    overrides: Annotated[list[str] | None, typer.Argument(
        help="key=value settings: trainer keys (lr, optimizer, batch_size, schedule, ...) or "
             "data.KEY, model.KEY, layer.KEY, rule.KEY.", show_default=False)] = None,
    dataset: Annotated[str, typer.Option(help="Dataset name (see `nnarena list dataset`).")
                       ] = "mnist1d",
    model: Annotated[str, typer.Option(help="Model name (see `nnarena list model`).")] = "mlp",
    rule: Annotated[str, typer.Option(help="Learning rule (see `nnarena list rule`).")
                    ] = "backprop",
    epochs: Annotated[float | None, typer.Option(help="Budget in epochs (default 10).")] = None,
    samples: Annotated[int | None, typer.Option(help="Budget in training samples.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for data split, init and batch order.")] = 0,
    out: Annotated[Path | None, typer.Option(help="Run folder (default runs/train/...).")
                   ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print every metric as JSON.")] = False,
) -> None:
    """Train one model with one learning rule and print its metrics."""
    try:
        cell = _cell_from_args(dataset, model, rule, epochs, samples, seed, overrides or [])
        cell.check()
    except NNArenaError as err:
        _fail(err)
    folder = out or Path("runs") / "train" / (
        f"{time.strftime('%Y%m%d-%H%M%S')}-{dataset.replace(':', '_').replace('/', '_')}"
        f"-{model}-{rule}-s{seed}")
    try:
        result = run_cell(cell, out_dir=folder, callbacks=[default_progress()])
    except NNArenaError as err:
        _fail(err)
    if as_json:
        print(json.dumps({"status": result.status, "reason": result.reason, "run_dir": str(folder),
                          **result.metrics}, indent=2, default=str))
    else:
        _print_result(cell, result.status, result.reason, result.metrics, folder)
    if result.status == "failed":
        raise typer.Exit(1)


def _cell_from_args(dataset: str, model: str, rule: str, epochs: float | None,
                    samples: int | None, seed: int, overrides: list[str]) -> Cell:
    fields: dict[str, dict[str, Any]] = {v: {} for v in _PREFIXES.values()}
    trainer: dict[str, Any] = {}
    layer_kwargs: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"setting '{item}' is not key=value (e.g. lr=0.01, model.width=128)")
        prefix, dot, name = key.partition(".")
        if dot and prefix == "layer":
            layer_kwargs[name] = value
        elif dot and prefix in _PREFIXES:
            fields[_PREFIXES[prefix]][name] = value
        elif dot:
            raise ConfigError(f"setting '{key}': unknown prefix '{prefix}'; use data., model., "
                              "layer., rule. or a bare trainer key")
        elif key in TRAINER_KEYS:
            trainer[key] = value
        else:
            near = closest(key, TRAINER_KEYS)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(f"unknown trainer setting '{key}'{hint}; trainer keys: "
                              f"{', '.join(TRAINER_KEYS)}; "
                              "or prefix with data./model./layer./rule.")
    if epochs is not None:
        trainer["epochs"] = epochs
    if samples is not None:
        trainer["samples"] = samples
    fields["model_kwargs"] = _coerce("model", model, fields["model_kwargs"])
    if layer_kwargs:
        layer = fields["model_kwargs"].get("layer") or _default(model, "layer") or "linear"
        fields["model_kwargs"]["layer_kwargs"] = _coerce("layer", layer, layer_kwargs)
    fields["rule_kwargs"] = _coerce("rule", rule, fields["rule_kwargs"])
    fields["dataset_kwargs"] = _coerce("dataset", dataset.partition(":")[0],
                                       fields["dataset_kwargs"])
    return Cell(dataset=dataset, model=model, rule=rule, seed=seed,
                trainer=_coerce_trainer(trainer), **fields)


def _coerce(family: str, name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    return REGISTRY.get(family, name).coerce_kwargs(kwargs)


def _default(model: str, key: str) -> Any:
    param = REGISTRY.get("model", model).param(key)
    return None if param is None or param.required else param.default


def _coerce_trainer(kwargs: dict[str, Any]) -> dict[str, Any]:
    import inspect
    import typing

    from nnarena.registry import coerce
    from nnarena.train import Trainer

    hints = typing.get_type_hints(Trainer.__init__)
    return {k: coerce(v, hints.get(k, inspect.Parameter.empty), where=f"trainer {k}")
            for k, v in kwargs.items()}


def _print_result(cell: Cell, status: str, reason: str, metrics: dict[str, Any],
                  folder: Path) -> None:
    title = f"{cell.dataset} · {cell.model} · {cell.rule} · seed {cell.seed}"
    table = Table("metric", "value", title=title)
    table.add_row("status", status + (f" ({reason})" if reason else ""))
    for key, value in metrics.items():
        table.add_row(key, _fmt(key, value))
    _out.print(table)
    _out.print(f"run folder: {folder}")


def _fmt(key: str, value: Any) -> str:
    if isinstance(value, float):
        if key.endswith("bytes"):
            return f"{value / 2**20:.2f} MiB"
        return f"{value:.4g}"
    if isinstance(value, int) and key.endswith("bytes"):
        return f"{value / 2**20:.2f} MiB"
    return str(value)


def _fail(err: Exception) -> None:
    _err.print(f"[red]error:[/red] {err}", highlight=False, markup=True)
    raise typer.Exit(2)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="nnarena")


if __name__ == "__main__":
    sys.exit(main())
