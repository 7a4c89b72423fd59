"""A real git server for tests: `git http-backend` (smart HTTP, protocol v2) behind a threaded
HTTP server on 127.0.0.1 and an ephemeral port, serving the bare repositories under a root, with
optional Basic auth. Plus `GitRepo`, a work tree to commit to and push from."""

from __future__ import annotations

import base64
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

GIT = shutil.which("git") or "git"
_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "test@example.com",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "test@example.com",
}


def git(*args: str, cwd: Path | None = None) -> str:
    done = subprocess.run(
        [GIT, *args], cwd=cwd, env=_ENV, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {done.stderr}")
    return done.stdout.strip()


@dataclass
class GitRepo:
    """A bare repository `<root>/<name>.git` served by the server and a work tree to change it."""

    bare: Path
    work: Path

    @classmethod
    def create(cls, root: Path, name: str, branch: str = "main") -> GitRepo:
        bare = root / f"{name}.git"
        work = root.parent / f"{name}-work"
        git("init", "--bare", "-q", "-b", branch, str(bare))
        git("init", "-q", "-b", branch, str(work))
        git("remote", "add", "origin", str(bare), cwd=work)
        return cls(bare, work)

    def commit(self, files: dict[str, str], message: str = "change", branch: str = "main") -> str:
        """Write `files` (relative paths), commit them and push; the new commit's sha."""
        for rel, text in files.items():
            path = self.work / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        git("add", "-A", cwd=self.work)
        git("commit", "-q", "-m", message, cwd=self.work)
        git("push", "-q", "origin", f"HEAD:refs/heads/{branch}", cwd=self.work)
        return git("rev-parse", "HEAD", cwd=self.work)

    def tag(self, name: str) -> None:
        git("tag", "-a", "-m", name, name, cwd=self.work)
        git("push", "-q", "origin", f"refs/tags/{name}", cwd=self.work)


@dataclass(frozen=True)
class GitServer:
    url: str  # http://127.0.0.1:<port>
    root: Path
    requests: list[str]


def _handler(root: Path, auth: tuple[str, str] | None, log: list[str]) -> type:
    expected = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode() if auth else ""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def _serve(self) -> None:
            log.append(f"{self.command} {self.path}")
            if auth is not None and self.headers.get("Authorization") != expected:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="git"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            path, _, query = self.path.partition("?")
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            env = {
                **_ENV,
                "GIT_PROJECT_ROOT": str(root),
                "GIT_HTTP_EXPORT_ALL": "1",
                "REQUEST_METHOD": self.command,
                "PATH_INFO": path,
                "QUERY_STRING": query,
                "CONTENT_TYPE": self.headers.get("Content-Type", ""),
                "CONTENT_LENGTH": str(len(body)),
                "REMOTE_ADDR": "127.0.0.1",
                "GIT_PROTOCOL": self.headers.get("Git-Protocol", ""),
                "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding", ""),
            }
            done = subprocess.run(
                [GIT, "http-backend"], input=body, env=env, capture_output=True, check=False
            )
            head, _, payload = done.stdout.partition(b"\r\n\r\n")
            status = 200
            headers: list[tuple[str, str]] = []
            for line in head.decode(errors="replace").split("\r\n"):
                key, _, value = line.partition(":")
                if key.lower() == "status":
                    status = int(value.strip().split()[0])
                elif key:
                    headers.append((key, value.strip()))
            self.send_response(status)
            for key, value in headers:
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = _serve
        do_POST = _serve

    return Handler


@contextmanager
def git_server(root: Path, auth: tuple[str, str] | None = None) -> Iterator[GitServer]:
    """Serve the bare repositories under `root` until the block ends."""
    root.mkdir(parents=True, exist_ok=True)
    log: list[str] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(root, auth, log))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield GitServer(f"http://127.0.0.1:{server.server_address[1]}", root, log)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


__all__ = ["GitRepo", "GitServer", "git", "git_server"]
