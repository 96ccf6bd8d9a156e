"""The device side's records (edge/schema.py): types without coercion, bounds, patterns, lengths, choices, nested
records and lists, aliases, unknown and missing fields, cross-field rules, and every problem reported at once."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import pytest

from edge.identity import DeviceId
from edge.schema import MAX_JSON_DEPTH, Record, Rule, SchemaError, load_json, setting


class Part(Record):
    name: str = setting(pattern=r"^[a-z]+$", max_length=8)
    size: int = setting(ge=0)


class Even(Record):
    low: float = setting(0.0, ge=0.0, lt=1.0)
    high: float = setting(1.0, gt=0.0, le=1.0)

    def problems(self) -> Iterator[str]:
        if self.low > self.high:
            yield "low must not exceed high"


class Thing(Record):
    schema_id: Literal["thing/1"] = setting("thing/1", alias="schema")
    device: DeviceId = "cam-1"
    parts: list[Part] = setting(min_length=1, max_length=3)
    tags: dict[str, str] = setting(default_factory=dict)
    codes: list[Annotated[str, Rule(pattern=r"^[A-Z]{2}$")]] = setting(default_factory=list)
    extra: Any = None
    where: Path | None = None
    ratio: Even | None = None


GOOD = {"schema": "thing/1", "parts": [{"name": "bolt", "size": 3}]}


def test_a_valid_record_is_made_frozen_and_written_back_with_its_aliases():
    thing = Thing.from_dict({**GOOD, "where": "/tmp/x", "ratio": {"low": 0, "high": 1}, "extra": [1, None]})
    assert thing.parts == [Part(name="bolt", size=3)] and thing.where == Path("/tmp/x")
    assert thing.ratio == Even(low=0.0, high=1.0) and isinstance(thing.ratio.low, float)  # an int is widened
    assert thing.to_dict() == {"schema": "thing/1", "device": "cam-1", "parts": [{"name": "bolt", "size": 3}],
                               "tags": {}, "codes": [], "extra": [1, None], "where": "/tmp/x",
                               "ratio": {"low": 0.0, "high": 1.0}}
    assert Thing.from_dict(thing.to_dict()) == thing
    with pytest.raises(dataclasses.FrozenInstanceError):
        thing.device = "cam-2"  # type: ignore[misc]


@pytest.mark.parametrize(("changes", "location", "message"), [
    ({"low": -0.1}, "low", "greater than or equal to 0.0"),
    ({"low": 1.0, "high": 1.0}, "low", "less than 1.0"),
    ({"high": 0.0}, "high", "greater than 0.0"),
    ({"high": 1.5}, "high", "less than or equal to 1.0"),
    ({"high": float("nan")}, "high", "finite"),
    ({"high": 10**400}, "high", "finite"),
    ({"high": True}, "high", "must be a number, not bool"),
    ({"high": "0.5"}, "high", "must be a number, not str"),
])
def test_bounds_and_number_types(changes, location, message):
    with pytest.raises(SchemaError) as caught:
        Even.from_dict(changes)
    assert caught.value.problems[0][0] == (location,) and message in caught.value.problems[0][1]


@pytest.mark.parametrize(("part", "location", "message"), [
    ({"name": "Bolt", "size": 1}, "name", "does not match"),
    ({"name": "bolt\n", "size": 1}, "name", "does not match"),  # Python's `$` would take a final newline
    ({"name": "boltboltbolt", "size": 1}, "name", "at most 8 characters"),
    ({"name": "bolt", "size": -1}, "size", "greater than or equal to 0"),
    ({"name": "bolt", "size": "5"}, "size", "must be an integer, not str"),
    ({"name": "bolt", "size": 5.0}, "size", "must be an integer, not float"),
    ({"name": "bolt", "size": False}, "size", "must be an integer, not bool"),
    ({"name": 7, "size": 1}, "name", "must be a string, not int"),
])
def test_patterns_lengths_and_strict_types_in_a_nested_list(part, location, message):
    with pytest.raises(SchemaError) as caught:
        Thing.from_dict({**GOOD, "parts": [{"name": "nut", "size": 1}, part]})
    [(where, problem)] = caught.value.problems
    assert where == ("parts", 1, location) and message in problem, caught.value


def test_every_problem_is_reported_at_once_with_its_location():
    with pytest.raises(SchemaError) as caught:
        Thing.from_dict({"schema": "thing/2", "device": "cam--1", "parts": [{"name": "x", "size": -1, "colour": 1}],
                         "codes": ["AB", "abc"], "tags": {"a": 1}, "surprise": True})
    found = {where: message for where, message in caught.value.problems}
    assert set(found) == {("surprise",), ("schema",), ("device",), ("parts", 0, "colour"), ("parts", 0, "size"),
                          ("tags", "a"), ("codes", 1)}, found
    assert found[("surprise",)] == "unknown field" and "'thing/1'" in found[("schema",)]
    assert "1-64 letters and digits" in found[("device",)]  # the Annotated rule's own message
    text = str(caught.value)
    assert "parts.0.colour: unknown field" in text and "codes.1: 'abc' does not match" in text


def test_missing_fields_unknown_fields_and_bad_values_together():
    with pytest.raises(SchemaError) as caught:
        Part.from_dict({"name": "BAD", "weight": 3})
    assert caught.value.problems == [(("weight",), "unknown field"), (("size",), "required"),
                                     (("name",), "'BAD' does not match the pattern '^[a-z]+$'")]


@pytest.mark.parametrize(("parts", "message"), [([], "at least 1 item, not 0"), ([GOOD["parts"][0]] * 4, "at most 3"),
                                                ("bolt", "must be a list, not str"), ({"a": 1}, "must be a list")])
def test_list_lengths_and_shapes(parts, message):
    with pytest.raises(SchemaError, match=message):
        Thing.from_dict({**GOOD, "parts": parts})


@pytest.mark.parametrize("data", [None, [], "thing", 3])
def test_a_record_must_be_an_object(data):
    with pytest.raises(SchemaError, match="must be an object"):
        Thing.from_dict(data)


def test_cross_field_rules_run_once_each_field_is_fine():
    with pytest.raises(SchemaError) as caught:
        Even(low=0.9, high=0.5)
    assert caught.value.problems == [((), "low must not exceed high")] and str(caught.value).startswith("record: ")
    with pytest.raises(SchemaError) as caught:  # a bad field: the cross-field rule is not consulted
        Even(low=0.9, high=2.0)
    assert [where for where, _ in caught.value.problems] == [("high",)]


def test_making_and_replacing_check_too():
    with pytest.raises(SchemaError, match="size"):
        Part(name="bolt", size=-1)
    part = Part(name="bolt", size=1)
    assert part.replace(size=2).size == 2
    with pytest.raises(SchemaError, match="does not match"):
        part.replace(name="../etc")


def test_text_from_flags_and_variables_is_converted_to_each_fields_type():
    class Settings(Record):
        port: int = setting(8080, ge=1, le=65535)
        rate: float = 0.5
        verbose: bool = False
        paths: list[Path] = setting(default_factory=list)
        runtimes: list[Literal["tflite", "onnx"]] | None = None
        limit: int | None = None

    made = Settings.from_text({"port": " 9000 ", "rate": "1e-2", "verbose": "Yes", "paths": ["/a", "b"],
                               "runtimes": ["onnx"], "limit": "3"})
    assert (made.port, made.rate, made.verbose, made.paths, made.runtimes, made.limit) == (
        9000, 0.01, True, [Path("/a"), Path("b")], ["onnx"], 3)
    with pytest.raises(SchemaError) as caught:
        Settings.from_text({"port": "70000", "rate": "fast", "verbose": "maybe", "runtimes": ["tpu"], "limit": "1.5"})
    assert [where for where, _ in caught.value.problems] == [("port",), ("rate",), ("verbose",), ("runtimes", 0),
                                                             ("limit",)]
    assert "not str 'fast'" in str(caught.value) and "one of 'tflite', 'onnx'" in str(caught.value)
    for text in ("\u0661\u0662", "1_000", "0x10", "inf"):  # what int() or float() would take, a setting does not
        with pytest.raises(SchemaError, match="must be"):
            Settings.from_text({"limit": text, "rate": text})


@pytest.mark.parametrize(("content", "message"), [
    (b"\xff{}", "not JSON"), (b'{"a": ', "not JSON"), (b"[" * 100_000 + b"]" * 100_000, "not JSON"),
    (b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1), "nested deeper"),
    (b'{"a": "\\ud800"}', "unpaired surrogate"), (b'{"\\udc00": 1}', "unpaired surrogate"),
    (b"1" * 5000, "not JSON"),
])
def test_json_that_is_not_readable_is_a_schema_error(content, message):
    with pytest.raises(SchemaError, match=message):
        load_json(content)


def test_json_within_limits_reads_as_python():
    assert load_json(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH) is not None
    assert load_json('{"a": [1, 2.5, null, "\\u00e9"]}') == {"a": [1, 2.5, None, "é"]}
    with pytest.raises(SchemaError, match="parts.0.size"):
        Thing.from_json(b'{"parts": [{"name": "a", "size": 1.5}]}')
