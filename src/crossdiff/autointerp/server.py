"""A local OpenAI-compatible server (`transformers serve`) for when no endpoint is configured.

Started on 127.0.0.1 and a free port, offline (HF_HUB_OFFLINE=1), pinned to one local model
directory, and stopped on exit from the `serve` context manager, also when the body raises, so a
failed run never leaves a server behind. Its access log counts the requests it actually answered
(what the resume-from-cache test checks).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

COMPLETIONS_ROUTE = "POST /v1/chat/completions"


class ServerError(RuntimeError):
    """The local server did not come up; the message carries the tail of its log."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: prctl(PR_SET_PDEATHSIG, SIGTERM). A no-op where prctl does not exist."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


class LocalServer:
    """A running `transformers serve` process: `base_url` for the client, `model` for its requests."""

    def __init__(self, model: str, port: int, log_path: Path, dtype: str = "auto", device: str = "auto"):
        if Path(model).is_dir() and not Path(model, "config.json").is_file():
            raise ServerError(f"cannot serve {model!r}: not a local model directory (no config.json)")
        if not Path(model).exists():
            log.info("%r is not a local dir: serving it as a hub id from the local HF cache (offline)", model)
        self.model, self.port, self.log_path, self.dtype = model, port, Path(log_path), dtype
        self.base_url = f"http://127.0.0.1:{port}/v1"
        cmd = [
            sys.executable, "-m", "transformers.cli.transformers", "serve", model,
            "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype, "--device", device,
            "--log-level", "info",  # uvicorn's access log: one line per answered request
        ]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        self._log = open(self.log_path, "ab")
        log.info("starting %s", " ".join(cmd))
        # Own process group, so stop() reaches any worker the server forks; and on Linux the kernel sends it
        # SIGTERM when this process dies without running `stop` (SIGKILL, a timeout), so no server is orphaned.
        self.process = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True, preexec_fn=_die_with_parent)

    def wait_healthy(self, timeout_s: float = 300.0) -> None:
        """Poll GET /health until it answers 200; fail early if the process exits."""
        url = f"http://127.0.0.1:{self.port}/health"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"server for {self.model} exited with code {self.process.returncode}:\n"
                                  f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        log.info("server up at %s serving %s", self.base_url, self.model)
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.25)
        raise ServerError(f"server for {self.model} not healthy at {url} after {timeout_s:.0f} s:\n{self.log_tail()}")

    def requests_served(self) -> int:
        """Chat completions this server has answered (from its access log)."""
        self._flush()
        return sum(COMPLETIONS_ROUTE in line for line in self.log_path.read_text(errors="replace").splitlines())

    def log_tail(self, n: int = 30) -> str:
        self._flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def _flush(self) -> None:
        if not self._log.closed:
            self._log.flush()

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL it if it lingers. Idempotent."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()

    def kill(self) -> None:
        """SIGKILL the process group at once, as a crash would: in-flight requests die unanswered."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self._log.close()


@contextlib.contextmanager
def serve(model: str | os.PathLike, dtype: str = "auto", device: str = "auto", log_path: str | os.PathLike | None = None,
          startup_timeout_s: float = 300.0, attempts: int = 3) -> Iterator[LocalServer]:
    """Run `transformers serve MODEL` on 127.0.0.1:<free port> for the duration of the block.

    A port taken between `free_port()` and the server's bind makes the server exit; that is retried
    on a new port (`attempts` times) before giving up with the server's log.
    """
    if log_path is None:
        log_path = Path(tempfile.mkdtemp(prefix="crossdiff-serve-")) / "server.log"
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(attempts):
        server = LocalServer(str(model), free_port(), Path(log_path), dtype=dtype, device=device)
        try:
            server.wait_healthy(startup_timeout_s)
            break
        except ServerError:
            server.stop()
            if attempt == attempts - 1 or "address already in use" not in server.log_tail().lower():
                raise
    try:
        yield server
    finally:
        server.stop()
        log.info("server at %s stopped", server.base_url)
