"""Typed records checked when they are made: the device side's one validation mechanism, standard library only.

A record is a frozen, keyword-only dataclass whose fields carry their constraints::

    class PayloadFile(Record):
        name: str = setting(pattern=SAFE_NAME)
        size_bytes: int = setting(ge=0)

Making one (``PayloadFile(name=..., size_bytes=...)``, :meth:`Record.from_dict` for parsed JSON,
:meth:`Record.from_text` for flags and environment variables) checks every field against its type and
constraints, then the record's cross-field rules (:meth:`Record.problems`). Every problem is collected as
``(location, message)`` and raised as one :class:`SchemaError`. Types: ``str``, ``int``, ``float``
(finite; an int is widened), ``bool``, ``Path``, ``Any``, ``Literal[...]``, ``X | None``, ``list[X]``,
``dict[str, X]``, nested records, and ``Annotated[X, Rule(...)]`` for a reusable constrained type
(:data:`edge.identity.DeviceId`). Nothing is coerced from JSON (no ``"5"`` for 5, no ``true`` for 1).

The device's service once spent 11 MB of its 64 MB on pydantic for these records; this is the part of it
the device needs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union, dataclass_transform, get_args, get_origin, get_type_hints

Location = tuple[str | int, ...]
Problem = tuple[Location, str]
MAX_JSON_DEPTH = 200  # pydantic's JSON parser refused deeper documents: so does this
TRUE_WORDS, FALSE_WORDS = {"1", "true", "t", "yes", "y", "on"}, {"0", "false", "f", "no", "n", "off"}
_RULE = "edge.schema.rule"
_BAD = object()  # a value that failed its check (its problem is already recorded)


class SchemaError(ValueError):
    """Everything wrong with one record's values, each problem with its location."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{where(location)}: {message}" for location, message in problems))


def where(location: Location) -> str:
    """``models.0.file``; ``record`` for the record as a whole."""
    return ".".join(str(part)[:64] for part in location) or "record"


@dataclasses.dataclass(frozen=True)
class Rule:
    """A field's constraints (all optional); ``check`` returns the value or raises ``ValueError`` with its rule."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    min_length: int | None = None
    max_length: int | None = None
    pattern: str | None = None
    check: Callable[[Any], Any] | None = None
    alias: str | None = None
    description: str = ""

    def merged(self, other: Rule | None) -> Rule:
        """This rule with ``other``'s constraints added (``other`` wins where both set one)."""
        if other is None:
            return self
        changes = {f.name: getattr(other, f.name) for f in dataclasses.fields(other) if getattr(other, f.name)
                   not in (None, "")}
        return dataclasses.replace(self, **changes)


def setting(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, **rule: Any) -> Any:
    """A record field with a default (or none: required) and :class:`Rule` constraints."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={_RULE: Rule(**rule)})


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _scalar(kind: Any, value: Any) -> Any:
    """``value`` as ``kind`` (str, int, float, bool, Path, Any); ``ValueError`` naming what was expected."""
    if kind is Any or (kind is str and isinstance(value, str)) or (kind is bool and isinstance(value, bool)):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value) if isinstance(value, float) or abs(value) < 2**1023 else math.inf
        if not math.isfinite(number):
            raise ValueError(f"must be a finite number, not {_shown(value)}")
        return number
    if kind is Path and isinstance(value, (str, Path)):
        return Path(value)
    expected = {str: "a string", int: "an integer", float: "a number", bool: "true or false", Path: "a path"}
    raise ValueError(f"must be {expected.get(kind, kind)}, not {_type_name(value)} {_shown(value)}")


def _constraints(value: Any, rule: Rule) -> Any:
    """``value`` once it meets ``rule``'s bounds, lengths, pattern and check; ``ValueError`` otherwise."""
    for bound, holds, words in ((rule.ge, lambda b: value >= b, "greater than or equal to"),
                                (rule.gt, lambda b: value > b, "greater than"),
                                (rule.le, lambda b: value <= b, "less than or equal to"),
                                (rule.lt, lambda b: value < b, "less than")):
        if bound is not None and not holds(bound):
            raise ValueError(f"must be {words} {bound}, not {_shown(value)}")
    for limit, fits, words in ((rule.min_length, lambda n: len(value) >= n, "at least"),
                               (rule.max_length, lambda n: len(value) <= n, "at most")):
        if limit is not None and not fits(limit):
            unit = "item" if isinstance(value, (list, dict)) else "character"
            raise ValueError(f"should have {words} {limit} {unit}{'s' * (limit != 1)}, not {len(value)}")
    if rule.pattern is not None and not _matches(rule.pattern, value):
        raise ValueError(f"{_shown(value)} does not match the pattern {rule.pattern!r}")
    return rule.check(value) if rule.check is not None else value


def _matches(pattern: str, text: str) -> bool:
    """Whether ``pattern`` is found in ``text``; an ending ``$`` is the end of the text (Python's ``$`` also
    matches before a final newline, so ``"v1\\n"`` would pass ``^v1$``)."""
    match = re.search(pattern, text)
    return match is not None and (not pattern.endswith("$") or match.end() == len(text))


def _checked(hint: Any, value: Any, rule: Rule, location: Location, problems: list[Problem]) -> Any:
    """``value`` checked against the type ``hint`` and ``rule``; :data:`_BAD` once its problems are recorded."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Annotated:
        extra = next((item for item in hint.__metadata__ if isinstance(item, Rule)), None)
        return _checked(args[0], value, Rule().merged(extra).merged(rule), location, problems)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(arg for arg in args if arg is not type(None))  # X | None: the only union a record has
        return _checked(hint, value, rule, location, problems)
    try:
        value = _shaped(hint, origin, args, value, location, problems)
        return value if value is _BAD else _constraints(value, rule)
    except ValueError as error:
        problems.append((location, str(error)))
        return _BAD


def _shaped(hint: Any, origin: Any, args: tuple, value: Any, location: Location, problems: list[Problem]) -> Any:
    """``value`` as a literal choice, a list, a dict, a record or a scalar (its items checked where it has any)."""
    if origin is Literal:
        if not any(value == choice and type(value) is type(choice) for choice in args):
            raise ValueError(f"must be one of {', '.join(map(repr, args))}, not {_shown(value)}")
        return value
    if origin in (list, dict):
        if not isinstance(value, origin):
            raise ValueError(f"must be {'a list' if origin is list else 'an object'}, not {_type_name(value)}")
        if origin is dict:
            bad_keys = [key for key in value if not isinstance(key, str)]
            if bad_keys:
                raise ValueError(f"keys must be strings, not {_shown(bad_keys[0])}")
            items = {key: _checked(args[1], item, Rule(), (*location, key), problems) for key, item in value.items()}
            return _BAD if any(item is _BAD for item in items.values()) else items
        items = [_checked(args[0], item, Rule(), (*location, index), problems) for index, item in enumerate(value)]
        return _BAD if any(item is _BAD for item in items) else items
    if isinstance(hint, type) and issubclass(hint, Record):
        if isinstance(value, hint):
            return value
        try:
            return hint.from_dict(value)
        except SchemaError as error:
            problems += [((*location, *inner), message) for inner, message in error.problems]
            return _BAD
    return _scalar(hint, value)


@dataclass_transform(kw_only_default=True, frozen_default=True, field_specifiers=(setting,))
class Record:
    """A frozen dataclass checked when made; subclasses are made dataclasses by this base."""

    _hints: ClassVar[dict[str, Any]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        dataclasses.dataclass(frozen=True, kw_only=True)(cls)
        cls._hints = get_type_hints(cls, include_extras=True)

    def __post_init__(self) -> None:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        checked, problems = _check_fields(type(self), values)
        for name, value in checked.items():
            object.__setattr__(self, name, value)  # the checked value: a widened float, a Path, nested records
        if not problems:
            problems = [((), message) for message in self.problems()]
        if problems:
            raise SchemaError(problems)

    def problems(self) -> Iterator[str]:
        """What is wrong across fields, once each field is fine on its own (a subclass yields its rules')."""
        return iter(())

    @classmethod
    def fields(cls) -> dict[str, tuple[Any, Rule, dataclasses.Field]]:
        """Field name -> (type, rule, dataclass field), in declaration order."""
        return {f.name: (cls._hints[f.name], f.metadata.get(_RULE, Rule()), f) for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls, data: Any) -> Any:
        """The record in ``data`` (parsed JSON: keys are field names or aliases); :class:`SchemaError` listing
        unknown fields, missing ones and every bad value."""
        if not isinstance(data, dict):
            raise SchemaError([((), f"must be an object, not {_type_name(data)}")])
        fields = cls.fields()
        names = {(rule.alias or name): name for name, (_, rule, _) in fields.items()}
        problems: list[Problem] = [((key,), "unknown field") for key in data if key not in names]
        values = {names[key]: value for key, value in data.items() if key in names}
        problems += [((key,), "required") for key, name in names.items()
                     if name not in values and _required(fields[name][2])]
        if problems:  # unknown or missing fields: reported with the given fields' own problems
            raise SchemaError(problems + _check_fields(cls, values)[1])
        return cls(**values)

    @classmethod
    def from_json(cls, content: bytes | str) -> Any:
        """The record in JSON text; :class:`SchemaError` for bad JSON too."""
        return cls.from_dict(load_json(content))

    @classmethod
    def from_text(cls, values: Mapping[str, Any]) -> Any:
        """The record from flags and environment variables: text converted to each field's type first."""
        fields = cls.fields()
        return cls(**{name: _from_text(fields[name][0], value) for name, value in values.items() if name in fields})

    def to_dict(self, by_alias: bool = True) -> dict[str, Any]:
        """The record as JSON values (paths as strings, nested records as objects)."""
        return {(rule.alias if by_alias and rule.alias else name): _jsonable(getattr(self, name))
                for name, (_, rule, _) in self.fields().items()}

    def replace(self, **changes: Any) -> Any:
        """A copy with ``changes``, checked again."""
        return dataclasses.replace(self, **changes)


def _required(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def _check_fields(cls: type[Record], values: dict[str, Any]) -> tuple[dict[str, Any], list[Problem]]:
    problems: list[Problem] = []
    checked = {}
    for name, (hint, rule, _) in cls.fields().items():
        if name in values:
            checked[name] = _checked(hint, values[name], rule, (rule.alias or name,), problems)
    return checked, problems


def _jsonable(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, list):
        return [_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    return str(value) if isinstance(value, Path) else value


def _from_text(hint: Any, value: Any) -> Any:
    """``value`` converted from text where ``hint`` wants something else; left as it is when it does not
    convert, so the check names it."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Annotated or origin in (Union, types.UnionType):
        inner = [arg for arg in args if arg is not type(None)] if origin is not Annotated else [args[0]]
        return _from_text(inner[0], value) if len(inner) == 1 else value
    if origin is list and isinstance(value, (list, tuple)):
        return [_from_text(args[0], item) for item in value]
    if not isinstance(value, str):
        return value
    text = value.strip()
    if hint is int and re.fullmatch(r"[+-]?[0-9]+", text):
        return int(text)
    if hint is float and re.fullmatch(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?", text):
        return float(text)
    if hint is bool and text.lower() in TRUE_WORDS | FALSE_WORDS:
        return text.lower() in TRUE_WORDS
    return Path(value) if hint is Path else value


def load_json(content: bytes | str) -> Any:
    """Parsed JSON, refused (:class:`SchemaError`) when it is not UTF-8, not JSON, nested deeper than
    :data:`MAX_JSON_DEPTH` or holds an unpaired surrogate; ``NaN`` and ``Infinity`` are kept as floats."""
    try:
        text = content.decode("utf-8") if isinstance(content, bytes) else content
        value = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as error:  # RecursionError: nested past the stack
        raise SchemaError([((), f"not JSON ({str(error)[:200]})")]) from None
    _within_limits(value)
    return value


def _within_limits(value: Any) -> None:
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if depth > MAX_JSON_DEPTH:
            raise SchemaError([((), f"not JSON this service reads: nested deeper than {MAX_JSON_DEPTH} levels")])
        if isinstance(item, dict):
            pending += [(key, depth) for key in item] + [(child, depth + 1) for child in item.values()]
        elif isinstance(item, list):
            pending += [(child, depth + 1) for child in item]
        elif isinstance(item, str) and re.search("[\ud800-\udfff]", item):
            raise SchemaError([((), "not JSON this service reads: a string holds an unpaired surrogate")])
