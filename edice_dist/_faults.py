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
impute_lose_node_chunk : "chrom:index"
    The imputation actor given that chunk takes its whole Ray node down (its raylet, then
    itself), as when a spot instance is reclaimed, once per run folder.
train_lose_node_epoch : int
    The last Ray Train worker takes its whole Ray node down during that epoch, once per
    model folder.
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
fake_gpus : true
    The GPUs Ray schedules are fake (``ray start --num-gpus``, the fake multi-node
    cluster): imputation actors and training workers given one compute on the CPU, and
    data-parallel training uses gloo, instead of refusing a GPU that torch cannot see.

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
         "personal_log", "fake_gpus", "impute_lose_node_chunk", "train_lose_node_epoch")


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


def exit_once(folder: str, note: str, whole_node: bool = False) -> None:
    """Exit this process at once, as a killed worker would, unless :data:`MARKER` in
    ``folder`` says it already happened; ``note`` is written into the marker first.

    With ``whole_node`` the process's Ray node goes first: its raylet, the parent of
    every Ray worker process, is killed (SIGKILL), and every process of the node dies
    with it, as when the machine is lost. Never on a head node: that would end the
    cluster, not lose a node (a mistake in the test)."""
    marker = storage.join(folder, MARKER)
    if not storage.exists(marker):
        storage.write_text_atomic(marker, note.rstrip("\n") + "\n")
        if whole_node:
            import signal

            import ray

            me = ray.get_runtime_context().get_node_id()
            head = [n for n in ray.nodes()
                    if n["NodeID"] == me and "node:__internal_head__" in n["Resources"]]
            if head:
                raise RuntimeError(f"{ENV}: refusing to take the head node down")
            os.kill(os.getppid(), signal.SIGKILL)
        os._exit(1)
