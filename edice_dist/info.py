"""`edice info PATH`: describe a track store, a model folder or an imputation run folder."""

from __future__ import annotations

import json

from . import _partial, runfolder, storage
from .errors import InputError


def describe(path: str) -> str:
    if storage.exists(storage.join(path, "model.pt")):
        from .checkpoint import describe as describe_model

        return describe_model(path)
    if runfolder.is_run(path):
        return runfolder.describe(path)
    if storage.exists(storage.join(path, "zarr.json")):
        from .store import describe as describe_store

        return _unfinished_store(path) or describe_store(path)
    hint = ""
    if storage.exists(path.rstrip("/") + ".partial"):
        hint = f" An unfinished result is at {path.rstrip('/')}.partial: re-run the command that makes it."
    raise InputError(f"{path} is not a track store, a model folder or a run folder.{hint}")


def _unfinished_store(path: str) -> str | None:
    """What ``edice info`` says of a track store that ingest has not finalised (such as an
    interrupted ingest's ``.partial`` folder); None for any other Zarr group."""
    from .store import FINALISED, FORMAT

    try:
        attrs = json.loads(storage.read_text(storage.join(path, "zarr.json"))).get("attributes", {})
    except (OSError, ValueError):
        return None
    if attrs.get("format") != FORMAT or attrs.get(FINALISED):
        return None
    total = sum(-(-int(c["n_bins"]) // int(attrs["chunk_bins"])) for c in attrs["chroms"])
    done = len(_partial.done_set(path))
    return "\n".join([
        f"unfinished track store {path}",
        f"tracks       {len(attrs.get('tracks', []))}",
        f"chunks       {done}/{total} written",
        "status       not finalised: no stage accepts it as input. Re-run the same "
        "`edice ingest` command to finish it.",
    ])
