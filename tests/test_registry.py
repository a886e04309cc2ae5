from __future__ import annotations

import json
from functools import partial
from typing import Any, Literal

import pytest

from nnarena.errors import ConfigError, UnknownNameError
from nnarena.registry import REGISTRY, Registry, coerce


def test_unknown_name_lists_valid_choices_and_closest() -> None:
    with pytest.raises(UnknownNameError, match=r"unknown rule 'backprob' \(did you mean "
                       r"'backprop'\?\); valid: .*backprop"):
        REGISTRY.get("rule", "backprob")


def test_unknown_family_lists_families() -> None:
    with pytest.raises(UnknownNameError, match=r"unknown family 'modle'.*'model'.*families:"):
        REGISTRY.list("modle")


def test_bad_keyword_lists_accepted_ones() -> None:
    with pytest.raises(ConfigError, match=r"model 'mlp' has no parameter 'widht' \(did you mean "
                       r"'width'\?\); accepted: .*width.*depth"):
        REGISTRY.create("model", "mlp", (4,), 2, widht=3)


def test_registration_rejects_bad_and_duplicate_names() -> None:
    reg = Registry()
    with pytest.raises(ValueError, match="lower case"):
        reg.register("rule", "Bad_Name")
    reg.register("rule", "one")(lambda: 1)
    with pytest.raises(ValueError, match=r"already registered.*override=True"):
        reg.register("rule", "one")(lambda: 2)
    reg.register("rule", "one", override=True)(lambda: 3)


def test_params_are_read_from_the_signature_with_types_and_defaults() -> None:
    entry = REGISTRY.get("model", "mlp")
    width = entry.param("width")
    assert width is not None and width.annotation is int and width.default == 256
    tiny = REGISTRY.get("model", "mlp-tiny")
    assert isinstance(tiny.factory, partial)
    assert tiny.param("width").default == 32


@pytest.mark.parametrize(("value", "annotation", "expected"), [
    ("3", int, 3), ("0.5", float, 0.5), ("true", bool, True), ("off", bool, False),
    ("none", int | None, None), ("7", int | None, 7), ("(32, 64)", tuple[int, ...], (32, 64)),
    ("relu", str | None, "relu"), ('{"basis": "rbf", "rank": 4}', dict[str, Any] | None,
                                   {"basis": "rbf", "rank": 4}),
    ("one-pass", Literal["two-pass", "one-pass"], "one-pass"),
])
def test_command_line_strings_are_coerced_to_declared_types(value, annotation, expected) -> None:
    assert coerce(value, annotation, where="x") == expected


def test_uncoercible_value_names_the_setting() -> None:
    with pytest.raises(ConfigError, match="model 'mlp' width: cannot read 'wide' as int"):
        REGISTRY.get("model", "mlp").coerce_kwargs({"width": "wide"})
    with pytest.raises(ConfigError, match="cannot read 'x' as one of 'a', 'b'"):
        coerce("x", Literal["a", "b"], where="w")
    with pytest.raises(ConfigError, match=r"cannot read '\[1\]' as dict"):
        coerce("[1]", dict[str, Any], where="w")


def test_every_entry_is_complete_and_json_serialisable() -> None:
    entries = REGISTRY.list()
    families = {e.family for e in entries}
    assert {"dataset", "layer", "model", "rule", "optimizer", "schedule"} <= families
    for entry in entries:
        assert entry.summary, f"{entry.family}/{entry.name} has no summary"
        json.dumps(entry.to_json())
