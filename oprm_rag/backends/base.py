"""What every model family provides: an empty state, and a forward pass from a state.

A backend wraps a loaded transformers model and runs it *from a given
:class:`~oprm_rag.state.RecurrentState`*, returning the logits and the new state. The
input state is never modified, so one stored state can serve many continuations (the
shared prefix, the cached per-chunk states, the winning chunk's decode).

Backends exist because transformers' own cache handling cannot be trusted for this:
Mamba-1 drops the initial SSM state on multi-token continuation, RecurrentGemma keeps
its state in module attributes, RWKV mutates the state it is given. Each backend's
tests compare it against a plain forward of the whole token sequence from scratch.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..state import RecurrentState

__all__ = ["Backend", "DecodeSession", "StepSession", "ForwardOutput", "StepInput", "KERNEL_CHOICES",
           "call_threads", "logits_close"]

logger = logging.getLogger("oprm_rag")

KERNEL_CHOICES = ("auto", "torch", "cuda")


@dataclass
class StepInput:
    """One forward call's inputs, checked: ids on the device, the state (empty if none was
    given, expanded from batch 1 if needed), left padding and its mask (None if none)."""

    ids: torch.Tensor
    state: RecurrentState
    pad_left: torch.Tensor | None
    mask: torch.Tensor | None

    @property
    def batch(self) -> int:
        return int(self.ids.shape[0])

    @property
    def length(self) -> int:
        return int(self.ids.shape[1])

    def position_after(self) -> torch.Tensor:
        """Tokens consumed per row once this call is done (pads do not count)."""
        real = self.length if self.pad_left is None else self.length - self.pad_left
        return self.state.tensors["position"] + real


@dataclass
class ForwardOutput:
    """Logits (float32; [b, v] for the last position, or [b, t, v]) and the state after."""

    logits: torch.Tensor
    state: RecurrentState


class Backend(ABC):
    """Runs one model family from explicit states. Subclasses set ``family``."""

    family: ClassVar[str] = "?"
    #: True when continuing from a state equals running the plain sequence, with a state
    #: of fixed size. False for the token-replay fallback (the state is the token prefix).
    exact_continuation: ClassVar[bool] = True
    #: True when ``forward`` takes left-padded batches (``pad_left``) with exact results,
    #: from any state: padded positions leave the state untouched. Otherwise the
    #: scheduler only batches sequences of equal length.
    supports_left_padding: bool = False
    #: True when the state holds attention keys at absolute positions (a transformer, a
    #: hybrid): the model then has a position limit, and its state grows with the chunk.
    positional: bool = False

    def __init__(self, model: Any, kernels: str = "auto") -> None:
        if kernels not in KERNEL_CHOICES:
            raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {kernels!r}")
        self.model = model
        self.config = model.config
        self.kernels = kernels

    # ------------------------------------------------------------------ identity
    @classmethod
    @abstractmethod
    def handles(cls, model: Any) -> bool:
        """True if this backend runs ``model``."""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def use_cuda_kernels(self) -> bool:
        """Whether this call should take the fused CUDA kernels (raises if forced but absent)."""
        if self.kernels == "torch":
            return False
        on_cuda = self.device.type == "cuda"
        if self.kernels == "cuda":
            if not on_cuda:
                raise RuntimeError("kernels='cuda' needs the model on a CUDA device")
            self._require_cuda_kernels()
            return True
        if not on_cuda:
            return False
        try:
            self._require_cuda_kernels()
        except ImportError as exc:
            _warn_once(f"{self.family}: {exc} Falling back to the torch scan on CUDA.")
            return False
        return True

    def _require_cuda_kernels(self) -> None:
        """Raise ImportError (naming the extra to install) if the fast kernels are missing."""
        raise ImportError("this model family has no fused CUDA kernels")

    # ------------------------------------------------------------------ states
    @abstractmethod
    def empty_state(self, batch_size: int = 1) -> RecurrentState:
        """The state before any token."""

    def state_nbytes(self, tokens: int = 0) -> int:
        """Bytes of one sequence's state after ``tokens`` tokens (fixed-size states ignore
        ``tokens``; states with attention keys grow with them; 0 for the token replay)."""
        return self.empty_state(1).nbytes

    def check_state(self, state: RecurrentState, batch_size: int) -> RecurrentState:
        if state.family != self.family:
            raise ValueError(f"a {state.family!r} state cannot run on a {self.family!r} model")
        state = state.to(self.device)  # cached states live on the CPU; a no-op when already here
        if state.batch_size == batch_size:
            return state
        if state.batch_size == 1:
            return state.expand(batch_size)
        raise ValueError(f"state batch {state.batch_size} does not match input batch {batch_size}")

    # ------------------------------------------------------------------ running
    @abstractmethod
    def forward(
        self, input_ids: torch.Tensor, state: RecurrentState | None = None, *, all_logits: bool = False,
        pad_left: torch.Tensor | None = None,
    ) -> ForwardOutput:
        """Run ``input_ids`` [b, t] from ``state`` (None: empty). Never mutates ``state``.

        ``pad_left`` [b] counts pad tokens at the start of each row (only where
        ``supports_left_padding``); the last position's logits are real for every row.
        """

    def append(self, state: RecurrentState, input_ids: torch.Tensor) -> RecurrentState:
        """The state after ``input_ids`` when no logits are wanted. Exact backends run the
        model; the token-replay fallback only records the tokens (its state is the prefix)."""
        return self.forward(input_ids, state).state

    def session(self, state: RecurrentState) -> "DecodeSession":
        """A mutable cursor for token-by-token decoding from ``state``."""
        return DecodeSession(self, state)

    def _begin(self, input_ids: torch.Tensor, state: RecurrentState | None,
               pad_left: torch.Tensor | None) -> StepInput:
        """The checks every ``forward`` starts with."""
        b, t = input_ids.shape
        if t == 0:
            raise ValueError("forward needs at least one token")
        state = self.empty_state(b) if state is None else self.check_state(state, b)
        pad_left = self._check_padding(pad_left, t)
        return StepInput(input_ids.to(self.device), state, pad_left, valid_mask(pad_left, b, t, self.device))

    def _check_padding(self, pad_left: torch.Tensor | None, t: int) -> torch.Tensor | None:
        if pad_left is None or not bool((pad_left > 0).any()):
            return None
        if not self.supports_left_padding:
            raise ValueError(f"the {self.family} backend does not take padded batches")
        if bool((pad_left >= t).any()) or bool((pad_left < 0).any()):
            raise ValueError("every row needs at least one real token")
        return pad_left.to(self.device)

    def _lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.model.get_output_embeddings()
        return head(hidden.to(head.weight.dtype)).float()

    @staticmethod
    def _advance(state: RecurrentState, t: int) -> torch.Tensor:
        return state.tensors["position"] + t


class DecodeSession:
    """Feeds tokens one step at a time and tracks the state (default: ``forward``)."""

    def __init__(self, backend: Backend, state: RecurrentState) -> None:
        self.backend = backend
        self.state = state

    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Feed ``input_ids`` [b, t]; return the last position's logits [b, v]."""
        out = self.backend.forward(input_ids, self.state)
        self.state = out.state
        return out.logits


class StepSession(DecodeSession):
    """A decode session on a backend's single-token path (``Backend._step``).

    A one-token step of a small model is a few dozen tiny ops, so what costs is per-op
    overhead, not arithmetic: the session owns a private copy of the state and updates
    it in place, the backend's per-layer constants are prepared once per session
    (``Backend._step_constants``), and steps of small models run on one intra-op thread
    of the calling thread (:mod:`oprm_rag.threads`), so that no op waits at a thread
    barrier on a busy machine. Inputs of more than one token, or of another batch size,
    take ``forward``. The state given is never modified; ``state`` is a snapshot.

    A backend with a step path provides ``_step_constants()`` (called once here) and
    ``_step(ids [b], tensors, constants) -> logits [b, v]``, which advances ``tensors``
    (this session's own copy) by one token, position excepted. On CPU with the native
    kernels built, a Mamba-2 layer's whole mixer between its two projections is one C call.
    """

    def __init__(self, backend: Backend, state: RecurrentState) -> None:
        self.backend = backend
        self._device = backend.device
        self._load(state)
        self._consts = backend._step_constants()  # type: ignore[attr-defined]
        self._threads = call_threads(backend, self._batch)

    def _load(self, state: RecurrentState) -> None:
        state = self.backend.check_state(state, state.batch_size)
        self._tensors = {k: v.clone(memory_format=torch.contiguous_format) for k, v in state.tensors.items()}
        self._batch = state.batch_size

    @property
    def state(self) -> RecurrentState:  # type: ignore[override]
        """The state after every token fed so far (a copy: later steps do not change it)."""
        return RecurrentState(self.backend.family, {k: v.clone(memory_format=torch.contiguous_format)
                                                    for k, v in self._tensors.items()})

    @state.setter
    def state(self, state: RecurrentState) -> None:
        self._load(state)

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        from ..threads import intra_op_threads

        if input_ids.dim() != 2 or input_ids.shape[1] != 1 or input_ids.shape[0] != self._batch:
            out = self.backend.forward(input_ids, self.state)
            self._load(out.state)
            return out.logits
        with intra_op_threads(self._threads):
            logits = self.backend._step(  # type: ignore[attr-defined]
                input_ids[:, 0].to(self._device), self._tensors, self._consts)
        self._tensors["position"] += 1
        return logits


def call_threads(backend: Backend, tokens: int) -> int | None:
    """Intra-op threads for a call of ``tokens`` tokens (all rows) on ``backend``: 1 when the
    call is small (:func:`oprm_rag.threads.step_threads`), else None (torch's setting)."""
    from ..threads import step_threads

    if backend.device.type != "cpu":
        return None
    params = getattr(backend, "_oprm_params", None)
    if params is None:
        params = sum(p.numel() for p in backend.model.parameters())
        backend._oprm_params = params  # type: ignore[attr-defined]
    return step_threads(params * tokens)


def valid_mask(pad_left: torch.Tensor | None, b: int, t: int, device: torch.device) -> torch.Tensor | None:
    """[b, t] bool, False on left padding."""
    if pad_left is None:
        return None
    return torch.arange(t, device=device)[None, :] >= pad_left[:, None]


def shifted_conv_input(conv_state: torch.Tensor, x: torch.Tensor, pad_left: torch.Tensor | None) -> torch.Tensor:
    """``[conv_state, x]`` along time, with each row's pads moved in front of its conv state.

    With left padding, a row's first real token must see the previous state's last
    inputs in its conv window, not the pads: so the pads (zeroed) go first.
    """
    full = torch.cat([conv_state.to(x.dtype), x], dim=-1)
    if pad_left is None:
        return full
    k1, total = conv_state.shape[-1], full.shape[-1]
    j = torch.arange(total, device=x.device)[None, :]
    p = pad_left[:, None]
    src = torch.where(j < p, k1 + j, torch.where(j < p + k1, j - p, j))
    return full.gather(-1, src[:, None, :].expand(-1, full.shape[1], -1))


def causal_conv_time_major(x: torch.Tensor, state: torch.Tensor, conv: Any, act: Any, silu: bool,
                           mask: torch.Tensor | None, pad_left: torch.Tensor | None,
                           use_kernel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A Mamba mixer's depthwise causal conv and activation on ``x`` [b, t, c] (time-major),
    continuing from the conv ``state`` [b, c, k-1]: the output [b, t, c] (0 on pads) and
    the new conv state.

    Mamba-1 and Mamba-2 differ only in which channels they convolve, so both call this.
    On CPU in float32 it is one C pass (``kernels/native.py``: no transposes, SiLU fused
    when ``silu``); else (CUDA kernels requested, other dtypes, no compiler) torch's conv1d.
    """
    from ..kernels.native import causal_conv_tm

    dtype = x.dtype
    if not use_kernel and x.device.type == "cpu" and dtype == torch.float32 == conv.weight.dtype:
        out = causal_conv_tm(x, state, conv.weight[:, 0, :], conv.bias, pad_left, silu=silu)
        if out is not None:
            y, new_state = out
            if not silu:
                y = act(y)
                if mask is not None:
                    y = y * mask[..., None].to(y.dtype)
            return y, new_state.to(state.dtype)
    if mask is not None:
        x = x * mask[..., None].to(x.dtype)
    conv_in = shifted_conv_input(state, x.transpose(1, 2), pad_left)
    new_state = conv_in[..., conv_in.shape[-1] - (conv.weight.shape[-1] - 1):].contiguous()
    y = torch.nn.functional.conv1d(conv_in.to(conv.weight.dtype), conv.weight, conv.bias,
                                   groups=conv.weight.shape[0])
    y = act(y).to(dtype).transpose(1, 2)
    if mask is not None:
        y = y * mask[..., None].to(y.dtype)
    return y.contiguous(), new_state


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        logger.warning(message)


def logits_close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    """Same logits up to the float noise of the model's ``dtype`` (cached vs uncached kernels)."""
    if a.shape != b.shape or not torch.equal(torch.isfinite(a), torch.isfinite(b)):
        return False
    finite = torch.isfinite(b)
    if not bool(finite.any()):
        return True
    scale = max(1.0, float(b[finite].abs().max()))
    tol = 1e-3 if dtype in (torch.float32, torch.float64) else 3e-2
    return bool((a[finite] - b[finite]).abs().max() <= tol * scale)

