"""Fallback for models whose cache we cannot continue exactly: replay the token prefix.

Hybrids (Zamba2, Jamba, Falcon-H1, Bamba), transformers, remote-code RWKV-5/6/7 and
anything else with a causal-LM head run here. Their "state" is the token prefix itself,
so every continuation re-runs the prefix from scratch: exact by construction, but each
chunk costs a full prefill and the state grows with the text (nothing worth caching).

Decoding inside a session may use the model's own cache, whatever the model calls it:
``cache`` (transformers 5), ``past_key_values`` (older transformers, fla's RWKV-7),
``state`` (remote-code RWKV-5/6),
``cache_params`` (Mamba-style), ``mems``... The session takes the cache from the output
field of that name and feeds it back under the same name. Because nothing guarantees a
foreign cache continues exactly (a model may ignore it, want extra inputs, or mutate it
wrongly), the first continuation from a cache is checked against a recomputation of the
whole prefix; if they differ, or the model returns no cache, or the cached call fails,
the session recomputes from the token prefix for the rest of its life. Answers are
therefore the plain model's greedy answers in every case; only the speed differs.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch

from ..state import RecurrentState
from .base import Backend, DecodeSession, ForwardOutput, logits_close

__all__ = ["ReplayBackend", "CACHE_FIELDS"]

logger = logging.getLogger("oprm_rag")

#: Output fields that hold a model's own cache, and the input argument of the same name, in
#: order of preference: ``cache`` (transformers >= 5.2x, where ``past_key_values`` and
#: ``cache_params`` are deprecated aliases), then the older and remote-code names.
CACHE_FIELDS = ("cache", "past_key_values", "state", "cache_params", "mems", "past_buckets_states")


def _accepted_kwargs(model: Any) -> set[str] | None:
    """Names ``model.forward`` takes (None: it takes ``**kwargs``, so anything)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # builtins, odd wrappers: assume anything goes
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return set(params)


def _logits(out: Any) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        return out[0]
    return out.logits


def _cache_of(out: Any, name: str | None = None) -> tuple[str | None, Any]:
    """The model's cache in ``out`` (the field ``name``, or the first known field set)."""
    if isinstance(out, (tuple, list)):
        return None, None  # positions are model-specific: recompute instead
    names = (name,) if name else CACHE_FIELDS
    keys = set(out.keys()) if hasattr(out, "keys") else set()
    # Real fields first: a deprecated alias (an attribute that is not a field) only as a fallback.
    for field in [f for f in names if f in keys] + [f for f in names if f not in keys]:
        try:
            value = out[field] if field in keys else getattr(out, field, None)
        except (KeyError, AttributeError):
            value = None
        if value is not None:
            return field, value
    return None, None


class ReplayBackend(Backend):
    family = "replay"
    exact_continuation = False

    def __init__(self, model: Any, kernels: str = "auto") -> None:
        from .hf_cache import why_not_exact

        super().__init__(model, kernels)
        self._accepts = _accepted_kwargs(model)
        #: Why this model is not run from stored states (logged once when it is loaded).
        self.reason = why_not_exact(model)

    @classmethod
    def handles(cls, model: Any) -> bool:
        return callable(getattr(model, "forward", None))

    def empty_state(self, batch_size: int = 1) -> RecurrentState:
        dev = self.device
        return RecurrentState(self.family, {
            "position": torch.zeros(batch_size, dtype=torch.long, device=dev),
            "tokens": torch.zeros(batch_size, 0, dtype=torch.long, device=dev),
        })

    def state_nbytes(self, tokens: int = 0) -> int:
        return 0

    def call(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        """``model(input_ids=..., **kwargs)`` with only the arguments its forward accepts."""
        if self._accepts is not None:
            kwargs = {k: v for k, v in kwargs.items() if k in self._accepts}
        return self.model(input_ids=input_ids, **kwargs)

    def accepts(self, name: str) -> bool:
        """Whether ``name`` can be passed to the model's forward (named, or through ``**kwargs``)."""
        return self._accepts is None or name in self._accepts

    def names(self, name: str) -> bool:
        """Whether the model's forward names ``name`` as a parameter."""
        try:
            return name in inspect.signature(self.model.forward).parameters
        except (TypeError, ValueError):
            return False

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, state: RecurrentState | None = None, *,
                all_logits: bool = False, pad_left: torch.Tensor | None = None) -> ForwardOutput:
        if pad_left is not None and bool((pad_left > 0).any()):
            raise ValueError("the replay backend does not take padded batches")
        b, t = input_ids.shape
        state = self.empty_state(b) if state is None else self.check_state(state, b)
        full = torch.cat([state.tensors["tokens"], input_ids.to(self.device)], dim=1)
        logits = _logits(self.call(full, use_cache=False))
        logits = logits[:, -t:] if all_logits else logits[:, -1]
        new = RecurrentState(self.family, {"position": self._advance(state, t), "tokens": full})
        return ForwardOutput(logits.float(), new)

    def append(self, state: RecurrentState, input_ids: torch.Tensor) -> RecurrentState:
        """The state is the token prefix: appending runs nothing (the question pass replays it)."""
        b, t = input_ids.shape
        state = self.check_state(state, b)
        full = torch.cat([state.tensors["tokens"], input_ids.to(self.device)], dim=1)
        return RecurrentState(self.family, {"position": self._advance(state, t), "tokens": full})

    def session(self, state: RecurrentState) -> DecodeSession:
        return _CachedSession(self, state)


class _CachedSession(DecodeSession):
    """Token-by-token decoding on the model's own cache when it proves exact, else replay.

    ``mode``: ``"unknown"`` until the first continuation from a cache has been checked,
    then ``"cache"`` or ``"recompute"``.
    """

    def __init__(self, backend: ReplayBackend, state: RecurrentState) -> None:
        super().__init__(backend, state)
        self._cache: Any = None
        self._cache_name: str | None = None
        self.mode = "unknown"

    def _full(self, tokens: torch.Tensor, want_cache: bool) -> tuple[torch.Tensor, str | None, Any]:
        """The whole prefix from scratch: last logits, and the cache (name, value) if wanted."""
        backend: ReplayBackend = self.backend  # type: ignore[assignment]
        out = backend.call(tokens, use_cache=want_cache)
        name, cache = _cache_of(out) if want_cache else (None, None)
        if name is not None and not backend.accepts(name):
            name, cache = None, None  # returned but cannot be given back
        return _logits(out)[:, -1].float(), name, cache

    def _continue(self, ids: torch.Tensor, done: int) -> tuple[torch.Tensor, Any]:
        backend: ReplayBackend = self.backend  # type: ignore[assignment]
        assert self._cache_name is not None
        kwargs: dict[str, Any] = {self._cache_name: self._cache, "use_cache": True}
        if backend.names("cache_position"):
            kwargs["cache_position"] = torch.arange(done, done + ids.shape[1], device=ids.device)
        out = backend.call(ids, **kwargs)
        _, cache = _cache_of(out, self._cache_name)
        return _logits(out)[:, -1].float(), cache

    def _recompute_from_now_on(self, why: str, level: int = logging.WARNING) -> None:
        if self.mode != "recompute":
            logger.log(level, "replay decoding recomputes the prefix at each step (%s)", why)
        self.mode = "recompute"
        self._cache = None
        self._cache_name = None

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.to(self.backend.device)
        done = int(self.state.tensors["tokens"].shape[1])
        tokens = torch.cat([self.state.tensors["tokens"], ids], dim=1)
        if self.mode == "recompute":
            logits, _, _ = self._full(tokens, want_cache=False)
        elif self._cache is None:  # the first step: the prefix and the model's cache after it
            logits, self._cache_name, self._cache = self._full(tokens, want_cache=True)
            if self._cache is None:
                self._recompute_from_now_on(f"{type(self.backend.model).__name__} returns no cache it takes back",
                                            logging.INFO)
        else:
            try:
                logits, cache = self._continue(ids, done)
            except Exception as exc:  # noqa: BLE001 - a foreign cache may want what we cannot give
                self._recompute_from_now_on(f"continuing from its {self._cache_name} failed: "
                                            f"{exc.__class__.__name__}: {exc}")
                logits, _, _ = self._full(tokens, want_cache=False)
            else:
                if self.mode == "unknown":  # trust a foreign cache only once it has matched
                    reference, _, _ = self._full(tokens, want_cache=False)
                    if logits_close(logits, reference, self.backend.dtype):
                        self.mode = "cache"
                    else:
                        self._recompute_from_now_on(f"continuing from its {self._cache_name} does not match "
                                                    "a plain forward of the prefix")
                        logits, cache = reference, None
                if self.mode == "cache":
                    if cache is None:
                        self._recompute_from_now_on("the model stopped returning its cache")
                    self._cache = cache
        self.state = RecurrentState(self.backend.family, {
            "position": self.state.tensors["position"] + ids.shape[1], "tokens": tokens})
        return logits
