"""A throwaway S3-compatible server for tests: moto's server on 127.0.0.1.

``S3Server`` starts moto's WSGI application (the one ``python -m moto.server`` serves) on
a free loopback port in a child process, behind a small middleware that counts the bytes
of every object body it sends; creates a bucket and hands out the ``AWS_*`` environment
that boto3, s3fs and ``edice_dist.storage`` read. ``bytes_sent()`` returns the counts,
which is how a test proves that a stage reads each source once. ``stop()`` ends that
child by its own PID only.

Run as a script (``python s3server.py PORT``) it is that child.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

COUNTS_PATH = "/_edice/bytes-sent"
"""GET: the bytes sent per object (``{"bucket/key": n}``) as JSON; DELETE: reset them."""


class ByteCounter:
    """WSGI middleware: counts the response body bytes of every GET per object path."""

    def __init__(self, app):
        import threading

        self.app = app
        self.sent: dict[str, int] = {}
        self.lock = threading.Lock()

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == COUNTS_PATH:
            if environ["REQUEST_METHOD"] == "DELETE":
                with self.lock:
                    self.sent.clear()
            with self.lock:
                body = json.dumps(self.sent).encode()
            start_response("200 OK", [("Content-Type", "application/json"),
                                      ("Content-Length", str(len(body)))])
            return [body]
        body = self.app(environ, start_response)
        if environ["REQUEST_METHOD"] != "GET" or path.startswith("/moto-api"):
            return body
        return self._count(path.lstrip("/"), body)

    def _count(self, key, body):
        try:
            for part in body:
                with self.lock:
                    self.sent[key] = self.sent.get(key, 0) + len(part)
                yield part
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()


def serve(port: int) -> None:
    """Serve moto's S3 (and its moto-api) on 127.0.0.1:``port`` behind :class:`ByteCounter`."""
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import run_simple

    run_simple("127.0.0.1", port, ByteCounter(DomainDispatcherApplication(create_backend_app)),
               threaded=True)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """moto's S3 server in a child process.

    Parameters
    ----------
    bucket : str
        Bucket created once the server answers.
    startup_timeout : float
        Seconds to wait for the server to answer before giving up.
    """

    def __init__(self, bucket: str = "edice-test", startup_timeout: float = 30.0):
        self.bucket = bucket
        self.startup_timeout = startup_timeout
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The environment a user of AWS tools would export for this server."""
        return {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
            # Never ask an instance metadata service for credentials from a test.
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def url(self, *parts: str) -> str:
        """``s3://<bucket>/<parts...>``."""
        return "/".join([f"s3://{self.bucket}", *(p.strip("/") for p in parts)])

    def start(self) -> S3Server:
        self.port = free_port()
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), str(self.port)],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **self.env()},
        )
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"moto server did not answer on {self.endpoint} within "
                        f"{self.startup_timeout:.0f} s:\n{self.log()}"
                    ) from None
                time.sleep(0.1)
        self.client().create_bucket(Bucket=self.bucket)
        return self

    def client(self):
        """A boto3 S3 client for this server (independent of ``edice_dist.storage``)."""
        import boto3

        env = self.env()
        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name=env["AWS_REGION"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        )

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under ``prefix`` in the bucket, listed with boto3."""
        out: list[str] = []
        for page in self.client().get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix):
            out.extend(o["Key"] for o in page.get("Contents", []))
        return sorted(out)

    def bytes_sent(self) -> dict[str, int]:
        """Object body bytes sent since the start (or :meth:`reset_counts`), per
        ``bucket/key``, as counted by the server."""
        with urllib.request.urlopen(self.endpoint + COUNTS_PATH, timeout=10) as r:
            return json.loads(r.read())

    def reset_counts(self) -> None:
        req = urllib.request.Request(self.endpoint + COUNTS_PATH, method="DELETE")
        with urllib.request.urlopen(req, timeout=10):
            pass

    def log(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-4000:]

    def stop(self) -> None:
        """Stop the server process (this one PID only) and wait for it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None
        if self._log is not None:
            with contextlib.suppress(OSError):
                self._log.close()
            self._log = None

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def clear_fsspec_cache() -> None:
    """Close and forget cached S3 filesystems, so that new ``AWS_*`` settings take effect
    and no HTTP session is left open."""
    with contextlib.suppress(ImportError):
        import s3fs

        for fs in list(s3fs.S3FileSystem._cache.values()):
            creator = getattr(fs, "_s3creator", None)
            if creator is not None:
                with contextlib.suppress(Exception):
                    fs.close_session(fs.loop, creator)
        s3fs.S3FileSystem.clear_instance_cache()


if __name__ == "__main__":
    serve(int(sys.argv[1]))
