"""Configuration: config files, and the one typed loader of every dataclass config.

Training settings, simulation settings, stage options and cluster job sections are all
dataclasses. Their values arrive as text (``--KEY=VALUE`` on a command line) or typed (a
YAML or JSON file); :func:`values` turns either into the fields' types, refusing unknown
keys with the list of valid ones, and :func:`load` builds the dataclass from layers of
them (defaults, then a file, then the command line).

Field types understood: ``bool``, ``int``, ``float``, ``str``, ``list[str]``,
``tuple[int, ...]``, ``Literal[...]`` and any of them ``| None`` (where ``auto``, ``none``,
``null`` or an empty text mean None). Field metadata (see :func:`option`) adds a help line, a minimum, a
command-line flag and whether the value is a path.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from . import storage
from .errors import InputError

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")
_NONE = ("", "auto", "none", "null")


# ----------------------------------------------------------------------------- files


def parse_mapping(text: str, path: str, what: str = "Config file") -> dict:
    """Parse ``text`` (JSON when ``path`` ends in .json, else YAML) into a dict.

    Raises
    ------
    InputError
        Invalid JSON/YAML, PyYAML missing for a YAML file, or a top level that is not a
        mapping; the message starts with ``what`` and ``path``.
    """
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{what} {path} is not valid JSON: {e}.") from None
    else:
        try:
            import yaml  # a dependency of Ray too
        except ImportError:
            raise InputError(f"{what} {path} is YAML but PyYAML is not installed: "
                             "`pip install pyyaml`, or write it as JSON.") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise InputError(f"{what} {path} is not valid YAML: {e}.") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError(f"{what} {path} must hold a mapping of keys to values "
                         f"(e.g. `epochs: 5`), not a {type(data).__name__}.")
    return data


def read_mapping(path: str, what: str = "Config file") -> dict:
    """Read and parse a JSON or YAML config file (local path or URL)."""
    return parse_mapping(storage.read_input(path, what.lower()), path, what)


# ----------------------------------------------------------------------------- fields


def option(default=None, help: str = "", *, minimum: int | None = None,
           flag: str | None = None, path: bool = False):
    """A dataclass field with what the loader and the command line need to know.

    Parameters
    ----------
    default : the value when the key is not given.
    help : one line for ``--help`` and the docs.
    minimum : the smallest number allowed.
    flag : the command-line flag when it is not ``--<name with dashes>``.
    path : the value is a path or URL (job configs resolve it against their folder).
    """
    meta = {"help": help, "minimum": minimum, "flag": flag, "path": path}
    return field(default=default, metadata=meta)


def field_types(cls: type) -> dict[str, object]:
    """``{field name: resolved type}`` of a dataclass, in field order."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def unwrap(typ) -> tuple[object, bool]:
    """(the type without ``| None``, whether None is allowed)."""
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if len(args) == 1:
            return args[0], len(args) < len(typing.get_args(typ))
    return typ, False


def describe_type(typ) -> str:
    """What a value of ``typ`` must be, for messages and help: ``an integer``, ..."""
    inner, optional = unwrap(typ)
    if typing.get_origin(inner) is typing.Literal:
        text = "one of " + ", ".join(str(c) for c in typing.get_args(inner))
    elif typing.get_origin(inner) is list:
        text = "a list of names"
    elif typing.get_origin(inner) is tuple:
        text = "a list of integers (e.g. 4,20,100; none for an empty list)"
    else:
        text = {bool: "a bool (true or false)", int: "an integer", float: "a number",
                str: "a string"}.get(inner, str(inner))
    return text + (" or auto" if optional else "")


# ----------------------------------------------------------------------------- values


@dataclass(frozen=True)
class Source:
    """One layer of values and where it came from (for messages).

    Attributes
    ----------
    values : key -> value; keys may use dashes for underscores.
    where : e.g. ``command line`` or ``config file x.yaml``.
    text : values were typed as text (a command line): booleans may be spelt yes/no.
        In files, booleans must be YAML/JSON booleans; other values may be text (YAML
        reads ``3e-4`` as text).
    prefix : shown before each key in messages (``--impute.``, ``ingest.``).
    names : how messages name particular keys instead (``{"chunk_bins": "--chunk-bins"}``).
    """

    values: Mapping
    where: str = "command line"
    text: bool = True
    prefix: str = ""
    names: Mapping = field(default_factory=dict)

    def name(self, key: str) -> str:
        return self.names.get(key) or self.prefix + key


def check_keys(keys: Iterable[str], valid: Iterable[str], where: str,
               noun: tuple[str, str] = ("key", "keys"), prefix: str = "") -> None:
    """Refuse keys not in ``valid``.

    Raises
    ------
    InputError
        ``Unknown <noun> 'k' (<where>). Valid <nouns>: a, b, ...``
    """
    valid = list(valid)
    bad = [k for k in keys if str(k).replace("-", "_") not in valid]
    if bad:
        names = ", ".join(repr(f"{prefix}{k}") for k in bad)
        raise InputError(f"Unknown {noun[0]}{'s' if len(bad) > 1 else ''} {names} ({where}). "
                         f"Valid {noun[1]}: {', '.join(valid)}.")


def convert(value, typ, key: str, where: str, text: bool = True, minimum: int | None = None):
    """One value as ``typ``.

    Raises
    ------
    InputError
        ``<where>: <key> must be <what typ is>, got <value>``.
    """
    where = where[:1].upper() + where[1:]
    inner, optional = unwrap(typ)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in _NONE):
        if optional:
            return None
        raise InputError(f"{where}: {key} cannot be empty; it must be {describe_type(typ)}.")
    want = describe_type(typ)
    try:
        v = _convert(value, inner, text)
    except (TypeError, ValueError):
        if inner in (bool, int, float):
            kind = {bool: "bool", int: "integer", float: "number"}[inner]
            if inner is bool and isinstance(value, str) and not text:
                raise InputError(f"{where}: {key} must be {want}, unquoted; got the text "
                                 f"{value!r}.") from None
            raise InputError(f"{where}: {key} must be {want}; {value!r} is not a valid "
                             f"{kind}.") from None
        raise InputError(f"{where}: {key} must be {want}, got {value!r}.") from None
    if minimum is not None and v is not None and v < minimum:
        raise InputError(f"{where}: {key} must be {want.replace(' or auto', '')} >= {minimum}, "
                         f"got {value!r}.")
    if optional and v == []:
        return None
    return v


def _convert(value, inner, text: bool):
    """``value`` as ``inner``; TypeError/ValueError when it is not one."""
    if inner is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and text:
            s = value.strip().lower()
            if s in _TRUE or s in _FALSE:
                return s in _TRUE
        raise ValueError
    if inner is int:
        if isinstance(value, bool):
            raise TypeError
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)  # exact for big numbers; takes 2_000_000 too
            except ValueError:
                pass
        f = float(value)  # "1e4", or 5.0 from a file
        if not f.is_integer():
            raise ValueError
        return int(f)
    if inner is float:
        if isinstance(value, bool):
            raise TypeError
        return float(value)
    if inner is str:
        if not isinstance(value, str):
            raise TypeError
        return value
    if typing.get_origin(inner) is typing.Literal:
        v = value.strip() if isinstance(value, str) else value
        if v not in typing.get_args(inner):
            raise ValueError
        return v
    if typing.get_origin(inner) is tuple:  # tuple[int, ...]
        if isinstance(value, str):
            words = value.replace(",", " ").split()
            value = [] if [w.lower() for w in words] in ([], ["none"]) else words
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list | tuple):
            raise TypeError
        return tuple(_convert(v, int, text) for v in value)
    if typing.get_origin(inner) is list:
        if isinstance(value, str):
            return [v for v in value.replace(",", " ").split() if v]
        if isinstance(value, list | tuple) and all(isinstance(v, str | int) for v in value):
            return [str(v) for v in value if str(v)]
        raise TypeError
    raise TypeError(f"unsupported field type {inner!r}")


def values(cls: type, source: Source, noun: tuple[str, str] = ("key", "keys"),
           extra: Iterable[str] = ()) -> dict:
    """The values of ``source`` typed as ``cls``'s fields (only the keys given).

    Parameters
    ----------
    extra : keys that are valid but handled by the caller (listed in the error, not
        converted, left out of the result).

    Raises
    ------
    InputError
        An unknown key (the message lists the valid ones) or a value of the wrong type.
    """
    typed = field_types(cls)
    meta = {f.name: f.metadata for f in dataclasses.fields(cls)}
    extra = tuple(extra)
    check_keys(source.values, [*typed, *extra], source.where, noun, source.prefix)
    out = {}
    for key, value in source.values.items():
        k = str(key).replace("-", "_")
        if k in extra:
            continue
        out[k] = convert(value, typed[k], source.name(k), source.where, source.text,
                         meta[k].get("minimum"))
    return out


def load(cls: type, *sources: Source, defaults: Mapping | None = None,
         noun: tuple[str, str] = ("key", "keys")):
    """A ``cls`` from its defaults, then ``defaults``, then each source in turn.

    Raises
    ------
    InputError
        As :func:`values`, or from the dataclass's own checks.
    """
    merged = dict(defaults or {})
    for s in sources:
        merged.update(values(cls, s, noun))
    return cls(**merged)
