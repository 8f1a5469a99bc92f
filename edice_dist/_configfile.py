"""Config files: one JSON or YAML mapping, with errors that name the file."""

from __future__ import annotations

import json

from .errors import InputError


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
