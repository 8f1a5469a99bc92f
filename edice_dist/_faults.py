"""Fault injection for the tests; never a product option.

The tests set ``EDICE_TEST_FAULTS`` to a JSON object (with ``monkeypatch.setenv``), e.g.
``{"train_exit_epoch": 2}``. Each driver reads it once with :func:`active` when a stage
starts and hands the faults to its Ray tasks, actors or Train workers inside their specs:
Ray's worker processes are started before a test sets the variable, so they never see it
themselves.

Faults
------
ingest_fail_chunk : "chrom:index"
    The ingest task that reaches that chunk raises before writing it.
ingest_exit_chunk : "chrom:index"
    The ingest task that reaches that chunk exits abruptly before writing it, once per
    store (Ray then retries the task).
train_exit_epoch : int
    The last Ray Train worker exits abruptly during that epoch, once per model folder.
impute_exit_chunk : "chrom:index"
    The imputation actor given that chunk exits abruptly, once per run folder.
impute_enospc_chunk : "chrom:index"
    Writing that chunk of the output store fails as on a full disk (``ENOSPC``).
impute_stop_after : int
    The imputation driver stops with an error after this many chunks are written.
impute_log : path
    Imputation actors append ``chrom<TAB>index`` of every chunk they compute.
personal_fail_unit : str
    The ``edice personal`` unit of that id (``ind01/fold-2/finetuned``) fails with an
    error before doing anything (the run stops there, as after a crash).
personal_log : path
    ``edice personal`` units append their id when they start computing.

An abrupt exit leaves the marker file :data:`MARKER` in the model or run folder (or the
unfinished store), so that
the restarted worker carries on, and so that a test can see the fault fired.
"""

from __future__ import annotations

import json
import os

from . import storage

ENV = "EDICE_TEST_FAULTS"
MARKER = "_fail_once"
KNOWN = ("ingest_fail_chunk", "ingest_exit_chunk", "train_exit_epoch", "impute_exit_chunk",
         "impute_enospc_chunk", "impute_stop_after", "impute_log", "personal_fail_unit",
         "personal_log")


def active() -> dict:
    """The faults asked for in ``EDICE_TEST_FAULTS`` (``{}`` when it is unset).

    Raises
    ------
    ValueError
        The variable is not a JSON object of known faults (a mistake in a test).
    """
    text = os.environ.get(ENV, "").strip()
    if not text:
        return {}
    faults = json.loads(text)
    if not isinstance(faults, dict) or set(faults) - set(KNOWN):
        raise ValueError(f"{ENV} must be a JSON object with keys among {', '.join(KNOWN)}; "
                         f"got {text!r}")
    return faults


def at_chunk(faults: dict, name: str, chrom: str, index: int) -> bool:
    """True when fault ``name`` names chunk ``index`` of ``chrom``."""
    return faults.get(name) == f"{chrom}:{index}"


def exit_once(folder: str, note: str) -> None:
    """Exit this process at once, as a killed worker would, unless :data:`MARKER` in
    ``folder`` says it already happened; ``note`` is written into the marker first."""
    marker = storage.join(folder, MARKER)
    if not storage.exists(marker):
        storage.write_text_atomic(marker, note.rstrip("\n") + "\n")
        os._exit(1)
