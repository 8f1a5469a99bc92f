"""``edice serve``: a run's track hub over HTTP on this machine, for IGV and igv.js.

Genome browsers read bigWigs piece by piece with HTTP range requests, and igv.js (a web
page of another origin) also needs CORS headers. Python's ``http.server`` answers a range
request with the whole file and sends no CORS headers, so this serves a folder read-only
with both: one byte range per request (206 Partial Content, 416 past the end), a
``Access-Control-Allow-Origin: *`` on every answer and the preflight of ``Range``.
Symbolic links are followed (observed tracks linked into the hub).

It binds 127.0.0.1 by default: for IGV on the same machine, or through an SSH tunnel. The
UCSC browser fetches hubs from its own servers, so it needs the folder on a public web
server or bucket instead.
"""

from __future__ import annotations

import http.server
import os
import re
from functools import partial

from . import runfolder, storage
from .errors import InputError
from .progress import log

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


class _Slice:
    """A file object that ends ``n`` bytes after where it starts (what copyfile reads)."""

    def __init__(self, f, n: int):
        self.f, self.left = f, n

    def read(self, size: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        size = self.left if size is None or size < 0 else min(size, self.left)
        data = self.f.read(size)
        self.left -= len(data)
        return data

    def close(self) -> None:
        self.f.close()


class HubRequestHandler(http.server.SimpleHTTPRequestHandler):
    """``SimpleHTTPRequestHandler`` with single byte ranges and CORS."""

    def end_headers(self):
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Access-Control-Allow-Headers", "Range")
        self.send_header("Access-Control-Expose-Headers",
                         "Content-Length, Content-Range, Accept-Ranges")
        self.send_header("Accept-Ranges", "bytes")
        super().end_headers()

    def do_OPTIONS(self):  # the CORS preflight of a request with a Range header
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def send_head(self):
        m = _RANGE.fullmatch((self.headers.get("Range") or "").strip())
        path = self.translate_path(self.path)
        # No range, a form not handled here (several ranges) or a folder: the whole
        # answer, which HTTP allows a server to give instead of a range.
        if m is None or not (m[1] or m[2]) or os.path.isdir(path):
            return super().send_head()
        try:
            f = open(path, "rb")
        except OSError:
            self.send_error(404, "File not found")
            return None
        size = os.fstat(f.fileno()).st_size
        if m[1]:
            start = int(m[1])
            end = min(int(m[2]), size - 1) if m[2] else size - 1
        else:  # bytes=-N: the last N bytes
            start, end = max(0, size - int(m[2])), size - 1
        if start >= size or start > end:
            f.close()
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        self.send_response(206)
        self.send_header("Content-Type", self.guess_type(path))
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        f.seek(start)
        return _Slice(f, end - start + 1)


def hub_folder(path: str) -> str:
    """The folder to serve: a run folder's ``bigwig/``, else ``path`` itself."""
    if storage.is_url(path):
        raise InputError(f"{path} is a URL: serve a local folder (a bucket or web server "
                         "already serves its files by their URLs).")
    path = os.path.abspath(path)
    if runfolder.is_run(path):
        path = runfolder.bigwig_dir(path)
    if not os.path.isdir(path):
        raise InputError(f"{path} is not a folder.")
    return path


def make_server(path: str, host: str = "127.0.0.1",
                port: int = 8000) -> http.server.ThreadingHTTPServer:
    """A server of :func:`hub_folder` of ``path`` (port 0: any free port)."""
    folder = hub_folder(path)
    handler = partial(HubRequestHandler, directory=folder)
    try:
        return http.server.ThreadingHTTPServer((host, port), handler)
    except OSError as e:
        raise InputError(f"Cannot listen on {host}:{port} ({e}); pick another --port.") from None


def serve(path: str, host: str = "127.0.0.1", port: int = 8000) -> None:
    """``edice serve PATH``: serve until interrupted, saying what to load where."""
    server = make_server(path, host, port)
    folder = server.RequestHandlerClass.keywords["directory"]
    url = f"http://{host}:{server.server_address[1]}/"
    log(f"serving {folder} at {url} (Ctrl-C to stop)")
    if os.path.exists(os.path.join(folder, "hub.txt")):
        log(f"track hub: {url}hub.txt (IGV and igv.js: load it by this URL)")
    with server:
        server.serve_forever()
