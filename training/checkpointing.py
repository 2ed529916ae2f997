"""One resumable checkpoint file, replaced in place, and the training log beside it.

Why this shape: the demo model's training takes longer than one sitting, so it is run in
pieces and each piece's end is committed to the repository. A growing series of
checkpoints would grow the repository by megabytes a piece; one file replaced in place
grows it only by what git keeps of old versions.

Half precision where it is safe: Adam's two moments are *kept* at bfloat16 precision
throughout training (rounded after every step, :func:`round_moments`), so storing them
as bfloat16 loses nothing and a resumed run is bit-for-bit the run that did not stop.
The weights stay float32: in bfloat16 (8 mantissa bits) an update of a thousandth of a
weight would be rounded away.
"""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path
from typing import Any

import torch

__all__ = ["round_moments", "save", "load", "StopFlag", "TrainLog"]

_MOMENTS = ("exp_avg", "exp_avg_sq")


@torch.no_grad()
def round_moments(opt: torch.optim.Optimizer) -> None:
    """Round Adam's moments to bfloat16 values in place (they stay float32 tensors)."""
    for st in opt.state.values():
        for name in _MOMENTS:
            t = st.get(name)
            if t is not None:
                t.copy_(t.to(torch.bfloat16))


def _opt_state_half(opt_state: dict) -> dict:
    state = {k: {n: (v.to(torch.bfloat16) if n in _MOMENTS else v).cpu() for n, v in s.items()}
             for k, s in opt_state["state"].items()}
    return {"state": state, "param_groups": opt_state["param_groups"]}


def _cpu_float32(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """float32 CPU copies, where tensors that share storage (tied embeddings) stay one tensor,
    so the file holds them once."""
    seen: dict[tuple, torch.Tensor] = {}
    out = {}
    for k, v in tensors.items():
        ident = (v.device, v.data_ptr(), v.shape, v.dtype)
        if ident not in seen:
            seen[ident] = v.detach().float().cpu()
        out[k] = seen[ident]
    return out


def save(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, step: int, rng: random.Random,
         meta: dict[str, Any]) -> int:
    """Write the checkpoint atomically (a temporary file, then a rename); returns its size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": "oprm-demo-checkpoint/1", "step": step,
                "model": _cpu_float32(model.state_dict()),
                "opt": _opt_state_half(opt.state_dict()), "py_rng": rng.getstate(),
                "torch_rng": torch.get_rng_state(), "meta": meta}, tmp)
    os.replace(tmp, path)
    return path.stat().st_size


def load(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer | None, rng: random.Random | None) -> dict:
    """Restore weights (and optimiser and random state when given); returns the checkpoint dict."""
    state = torch.load(path, weights_only=False, map_location="cpu")
    if state.get("format") != "oprm-demo-checkpoint/1":
        raise SystemExit(f"{path} is not a demo-model checkpoint of this script's format")
    model.load_state_dict(state["model"])
    if opt is not None:
        opt_state = state["opt"]
        opt_state = {"state": {k: {n: (v.float() if n in _MOMENTS else v) for n, v in s.items()}
                               for k, s in opt_state["state"].items()},
                     "param_groups": opt_state["param_groups"]}
        opt.load_state_dict(opt_state)
    if rng is not None:
        rng.setstate(state["py_rng"])
        torch.set_rng_state(state["torch_rng"])
    return state


class StopFlag:
    """Set by SIGTERM or SIGINT: the loop finishes its step, writes the checkpoint, and exits."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._set)
            except ValueError:  # not the main thread (a test): no handler, no flag
                pass
        return self

    def _set(self, signum: int, frame: Any) -> None:
        self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def __bool__(self) -> bool:
        return self.signal is not None


class TrainLog:
    """The training log as JSON lines, beside the checkpoint; a resumed run first drops the
    rows written after the checkpoint it resumes from (they describe steps it will redo)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def rows(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def truncate_after(self, step: int) -> None:
        keep = [r for r in self.rows() if r.get("step", 0) <= step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")

    def append(self, row: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(_no_nan(row), allow_nan=False) + "\n")


def _no_nan(value: Any) -> Any:
    """NaN (an empty evaluation group) as null: the log stays strict JSON."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return value
