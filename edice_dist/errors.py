"""Errors that reach a user: one paragraph that names the file, track, chromosome or
chunk and says what to do.

Stages raise :class:`EdiceError` (or :class:`InputError`) for what a user can act on.
Anything else that escapes a stage (an OS error such as a full disk or a read-only file
system, an object-store error such as missing credentials, an error raised inside a Ray
task or actor, a bug) is turned into such a paragraph in one place, :func:`explain`,
which the stage runner (:func:`edice_dist.stages.run_stage`) applies to every stage.
The command line and the cluster jobs print the paragraph with :func:`report`: the full
trace goes to a log file (and to the terminal with ``--debug``), never in the paragraph.

This module imports nothing heavy: Ray's and botocore's exception types are recognised
only when those libraries are already loaded (an error cannot come from one that is not).
"""

from __future__ import annotations

import errno
import os
import sys

LOG_DIR_ENV = "EDICE_LOG_DIR"
"""Where :func:`report` writes the full trace of an error (default: the temp folder)."""

S3_HINT = ("Credentials and endpoint come from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
           "AWS_ENDPOINT_URL and AWS_REGION (or an instance profile / ~/.aws); on a Ray "
           "cluster they must be set on every node or passed in the job's runtime_env "
           "env_vars.")


class EdiceError(Exception):
    """A failure the user can act on; the message is shown as it is."""


class InputError(EdiceError, ValueError):
    """Bad input: a manifest, a source file, a store or an option that cannot be used."""


# ----------------------------------------------------------------------------- translation

# errno -> (what happened, what to do)
_OS_ERRORS = {
    errno.EROFS: ("the file system is read-only",
                  "Choose a location on a writable file system."),
    errno.ENOSPC: ("no space is left on the device",
                   "Free some space (or choose a larger disk) and run the same command "
                   "again: what was finished is kept."),
    errno.EDQUOT: ("the disk quota is exceeded",
                   "Free some space (or raise the quota) and run the same command again: "
                   "what was finished is kept."),
    errno.EACCES: ("permission denied", "Check the permissions, or choose another location."),
    errno.EPERM: ("the operation is not permitted",
                  "Check the permissions, or choose another location."),
    errno.ENOENT: ("it does not exist", "Check the path."),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "Check the path."),
    errno.EISDIR: ("it is a folder, not a file", "Check the path."),
    errno.EMFILE: ("too many files are open",
                   "Raise the open-file limit (`ulimit -n`) and run the same command again."),
}


def os_error_text(e: OSError) -> str:
    """One paragraph for an OS error (or an fsspec error, which may have no errno): what
    happened to which file, and what to do."""
    what, fix = _OS_ERRORS.get(e.errno, (e.strerror or str(e).strip() or type(e).__name__,
                                         "Check the path and the storage, then run the "
                                         "same command again."))
    where = f"Cannot use {e.filename}: " if e.filename else "An input/output error: "
    code = f" ({errno.errorcode[e.errno]})" if e.errno in errno.errorcode else ""
    return f"{where}{what.rstrip('.')}{code}. {fix}"


def s3_error_text(e: Exception, what: str) -> str:
    """One paragraph for a botocore error met while using ``what`` (a URL and its role)."""
    import botocore.exceptions as bx

    endpoint = (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                or "the default AWS S3 endpoint")  # as storage.storage_options reads it
    if isinstance(e, bx.NoCredentialsError | bx.PartialCredentialsError):
        return f"{what}: no S3 credentials were found. {S3_HINT}"
    if isinstance(e, bx.EndpointConnectionError | bx.ConnectTimeoutError | bx.ReadTimeoutError
                  | bx.ConnectionClosedError | bx.ProxyConnectionError | bx.SSLError):
        return (f"{what}: cannot reach the S3 endpoint {endpoint} ({e}). Check AWS_ENDPOINT_URL "
                f"and that the endpoint is reachable from this machine. {S3_HINT}")
    if isinstance(e, bx.ClientError):
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket"):
            return f"{what}: the bucket does not exist at {endpoint}. Create it or fix the URL."
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                    "ExpiredToken", "InvalidToken"):
            return (f"{what}: access denied ({code}). The credentials in use cannot access it. "
                    f"{S3_HINT}")
        return f"{what}: S3 error {code or ''} ({e}). {S3_HINT}"
    return f"{what}: {type(e).__name__}: {e}. {S3_HINT}"


def unwrap(e: BaseException) -> BaseException:
    """The error itself inside Ray's wrappers: an error raised in a Ray task or actor
    reaches the driver as a ``RayTaskError`` holding it as ``cause``."""
    for _ in range(20):
        cause = getattr(e, "cause", None)
        if not isinstance(cause, BaseException) or cause is e:
            break
        e = cause
    return e


def _is(e: BaseException, module: str, *names: str) -> bool:
    """``e`` is one of the exception types ``names`` of ``module``, if it is loaded."""
    mod = sys.modules.get(module)
    types = tuple(t for t in (getattr(mod, n, None) for n in names) if isinstance(t, type))
    return bool(types) and isinstance(e, types)


def explain(e: BaseException, where: str = "", urls: tuple[str, ...] = ()) -> EdiceError:
    """``e`` as one paragraph: the EdiceError it is (or wraps, from a Ray task or actor),
    or a new one that says what failed and what to do.

    Parameters
    ----------
    where : what was being done, for errors that name no file (``the impute stage of
        RUN``).
    urls : the object-store URLs in use, named by an object-store error (which names none).

    Returns
    -------
    EdiceError
        Raise it ``from e`` so that the full trace stays available (:func:`report`).
    """
    orig = unwrap(e)
    if isinstance(orig, EdiceError):
        return orig
    during = f" while running {where}" if where else ""
    if type(orig).__module__.startswith(("botocore", "aiobotocore")):
        shown = f"Using {', '.join(urls)}" if urls else "The object store"
        return EdiceError(s3_error_text(orig, shown))
    if isinstance(orig, OSError):
        return EdiceError(os_error_text(orig) + (f" (This happened{during}.)" if during and
                                                 not orig.filename else ""))
    if _is(orig, "ray.exceptions", "RayActorError", "WorkerCrashedError", "NodeDiedError",
           "ObjectLostError", "OutOfMemoryError"):
        brief = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
        return EdiceError(
            f"A Ray worker process died{during} ({type(orig).__name__}: {brief}). Run the same "
            "command again to resume; if it keeps happening, check the memory and the logs of "
            "the Ray nodes (`ray status`, /tmp/ray/session_latest/logs).")
    text = str(orig).strip().splitlines()
    brief = text[-1] if text else ""
    return EdiceError(
        f"Unexpected {type(orig).__name__}{during}" + (f": {brief}" if brief else "") + ". "
        "This is likely a bug in edice-dist; run the command again with --debug for the full "
        "trace, and report it.")


# ----------------------------------------------------------------------------- reporting


def _write_log(e: BaseException, prog: str) -> str | None:
    """The full trace of ``e`` (remote ones included) in a new log file; its path, or None
    when it cannot be written (the error itself may be a full or read-only disk)."""
    import datetime as _dt
    import tempfile
    import traceback

    folder = os.environ.get(LOG_DIR_ENV) or tempfile.gettempdir()
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = prog.replace("/", "-").replace(" ", "-").replace(".py", "")
    path = os.path.join(folder, f"{name}-{stamp}-{os.getpid()}.log")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(path, "w") as f:
            f.write(f"{prog} {' '.join(sys.argv[1:])}\n\n")
            f.write("".join(traceback.format_exception(e)))
    except OSError:
        return None
    return path


def report(e: BaseException, prog: str, debug: bool = False,
           again: str = "re-run the same command") -> int:
    """Print ``e`` as ``PROG: error: <one paragraph>`` on stderr; return the exit status.

    An interruption (Ctrl-C) is ``PROG: interrupted; <again> to resume.`` with status 130,
    in every stage. For any error that is not a plain input error, the full trace is
    written to a log file named at the end of the paragraph; ``debug`` also prints it.
    """
    import traceback

    if isinstance(e, KeyboardInterrupt):
        print(f"{prog}: interrupted; {again} to resume.", file=sys.stderr, flush=True)
        return 130
    err = explain(e)
    if debug:
        traceback.print_exception(e, file=sys.stderr)
    log = None
    if not (isinstance(e, EdiceError) and e.__cause__ is None):
        log = _write_log(e, prog)
    msg = str(err).strip()
    if log:
        msg += f" (Full trace in {log}.)"
    print(f"{prog}: error: {msg}", file=sys.stderr, flush=True)
    return 1
