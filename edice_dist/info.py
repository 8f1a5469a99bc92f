"""`edice info PATH`: describe a track store, a model folder or an imputation run folder."""

from __future__ import annotations

from . import runfolder, storage
from .errors import InputError


def describe(path: str) -> str:
    if storage.exists(storage.join(path, "model.pt")):
        from .checkpoint import describe as describe_model

        return describe_model(path)
    if runfolder.is_run(path):
        return runfolder.describe(path)
    if storage.exists(storage.join(path, "zarr.json")):
        from .store import describe as describe_store

        return describe_store(path)
    hint = ""
    if storage.exists(path.rstrip("/") + ".partial"):
        hint = f" An unfinished result is at {path.rstrip('/')}.partial: re-run the command that makes it."
    raise InputError(f"{path} is not a track store, a model folder or a run folder.{hint}")
