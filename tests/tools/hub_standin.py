"""A loopback stand-in of the Hugging Face Hub's file API, as much of it as `hf_hub_download` and
`get_hf_file_metadata` use: HEAD and GET on /{repo}/resolve/{revision}/{filename}.

HEAD answers like the hub for a file in Git LFS: `X-Repo-Commit`, `ETag` and `X-Linked-Etag` (the SHA-256 of
the content), `X-Linked-Size`, `Content-Length`. GET sends the content, or from a `Range: bytes=N-` on. What
GET sends can be made to differ from what HEAD reports (`serve_instead`), as a broken transfer would.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class StandInHub:
    repo_id: str
    files: dict[str, bytes]  # what the hub holds: HEAD reports their sizes and SHA-256
    lfs: bool = True  # False: answer as for a file in plain git (an ETag that is no SHA-256, no X-Linked-*)
    serve_instead: dict[str, bytes] = field(default_factory=dict)  # what GET sends instead, per file
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, file name)
    url: str = ""

    def gets(self, name: str) -> int:
        return self.requests.count(("GET", name))

    def headers(self, name: str) -> dict[str, str]:
        content = self.files[name]
        if not self.lfs:
            return {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha1(content).hexdigest()}"'}
        digest = hashlib.sha256(content).hexdigest()
        return {
            "X-Repo-Commit": COMMIT,
            "ETag": f'"{digest}"',
            "X-Linked-Etag": f'"{digest}"',
            "X-Linked-Size": str(len(content)),
        }


def _handler(hub: StandInHub) -> type[BaseHTTPRequestHandler]:
    route = re.compile(rf"/{re.escape(hub.repo_id)}/resolve/([^/]+)/(.+)")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # quiet tests
            pass

        def _file(self) -> str | None:
            m = route.fullmatch(self.path.split("?")[0])
            name = unquote(m.group(2)) if m else None
            if m is None or unquote(m.group(1)) not in ("main", COMMIT) or name not in hub.files:
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            hub.requests.append((self.command, name))
            return name

        def do_HEAD(self) -> None:
            if (name := self._file()) is None:
                return
            self.send_response(200)
            for k, v in hub.headers(name).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(hub.files[name])))
            self.end_headers()

        def do_GET(self) -> None:
            if (name := self._file()) is None:
                return
            body = hub.serve_instead.get(name, hub.files[name])
            start = int(m.group(1)) if (m := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))) else 0
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            self.wfile.write(body[start:])

    return Handler


@contextmanager
def standin_hub(repo_id: str, files: dict[str, bytes]) -> Iterator[StandInHub]:
    """The stand-in on 127.0.0.1 at a free port, for the `with` block."""
    hub = StandInHub(repo_id, files)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="standin-hub", daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
