"""Exact stored states for the models transformers runs on its own ``Cache`` objects.

transformers (>= 5.2x) keeps every model's inference state in one ``DynamicCache`` of
per-layer objects: attention layers hold keys and values (``DynamicLayer``), Mamba /
linear-attention / short-conv layers hold conv windows and recurrent states
(``LinearAttentionLayer``), Zamba2 and Falcon-H1 layers hold both, MLP-only layers hold
nothing (``DummyLayer``). That covers the hybrids people deploy (Granite-4.0-H, Nemotron-H,
Bamba, Zamba2, Falcon-H1, Jamba, Qwen3-Next, LFM2) and every plain transformer (Llama,
Qwen, SmolLM2...). xLSTM has its own ``xLSTMCache`` (``backends/xlstm.py`` adapts it).

So one backend serves them all: it copies a :class:`~oprm_rag.state.RecurrentState` into
a fresh cache, runs the model's own forward from it, and copies the cache back out. The
state after ``[P, C_i]`` is the recurrent and conv states plus the attention layers' keys
and values over ``[P, C_i]``: bounded by the chunk, so OPRM's per-chunk states can be
cached, and a follow-up question runs only its own tokens.

Exactness, and what it needs:

* **Positions are passed explicitly** (``position_ids`` from each row's ``position``).
  Bamba's model defaults them to ``arange(t)`` whatever the cache holds, so its own cache
  continuation is off (4e-3 measured on a tiny model); with explicit positions it is exact.
* **Rows of different lengths** (cached chunk states next to fresh ones, chunks of other
  lengths) keep their keys left-padded to one width (``RecurrentState.cat``); the pads are
  masked out by a 2D ``attention_mask``, and the new tokens continue from each row's true
  position. Keys are stored already rotated at their true positions, so padding them is
  exact. New tokens are never padded (``supports_left_padding`` is False: pads before a
  chunk would change an SSM state), so recurrent layers see only real tokens.
* **The stored state is never modified**: recurrent and conv tensors are cloned into the
  cache (transformers updates them in place); keys and values are only ever replaced by
  concatenation there, so they are shared, not copied.
* **A self-check before use**: the first time a model is seen, a continuation from a
  stored state and a batch of left-padded states are compared with plain forwards of the
  same tokens. A model that fails (a cache the generic path does not understand) keeps
  the token-replay backend, with the measured difference in one log line.

Sliding-window attention layers (Mistral, Gemma 2/3, Qwen2 with a window) keep only their
last keys, in a layout this path does not rebuild: those models stay on token replay.
On transformers releases before the unified cache (no ``cache`` argument, no
``LinearAttentionLayer``) every model stays on token replay too, with the same answers.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch

from ..state import KV_PREFIX, RecurrentState
from ..threads import intra_op_threads
from .base import Backend, DecodeSession, ForwardOutput, call_threads, logits_close
from .cache_layout import CacheLayout

__all__ = ["CacheBackend", "CacheSession", "CacheLayout", "DynamicCacheLayout", "layout_for", "cache_argument",
           "why_not_exact"]

logger = logging.getLogger("oprm_rag")

#: Model types other backends run (they come first in ``backend_classes``; never claimed here).
_OWN_BACKENDS = frozenset({"mamba", "falcon_mamba", "mamba2", "rwkv", "recurrent_gemma"})


def cache_argument(model: Any) -> str | None:
    """The name under which ``model.forward`` takes its cache: ``cache`` (transformers >= 5.2x).

    Older releases call it ``past_key_values`` / ``cache_params`` with other cache classes;
    this path does not build those (None: the model stays on token replay).
    """
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    return "cache" if "cache" in params else None


class DynamicCacheLayout(CacheLayout):
    """transformers' ``DynamicCache(config=...)``: one layer object per decoder layer.

    State names: ``conv.{layer}.{i}`` and ``ssm.{layer}.{i}`` (the layer's i-th conv and
    recurrent state), ``kv.{layer}.k`` / ``kv.{layer}.v`` (keys, values).
    """

    def __init__(self, config: Any) -> None:
        from transformers.cache_utils import DynamicLayer, LinearAttentionCacheLayerMixin

        self.config = config
        self._linear = LinearAttentionCacheLayerMixin
        self._attention = DynamicLayer
        probe = self.new_cache()
        self.has_kv = any(isinstance(layer, DynamicLayer) for layer in probe.layers)

    def new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.config)

    def build(self, state: RecurrentState, fresh: bool) -> Any:
        cache = self.new_cache()
        if fresh:
            return cache
        layers = cache.layers
        for name, t in state.tensors.items():
            kind, _, rest = name.partition(".")
            if kind not in ("conv", "ssm", "kv"):
                continue
            index, _, sub = rest.partition(".")
            layer = layers[int(index)]
            if kind == "kv":  # replaced by concatenation in update(): shared, never written
                layer.keys = t if sub == "k" else layer.keys
                layer.values = t if sub == "v" else layer.values
                layer.device, layer.is_initialized = t.device, True
                continue
            s = int(sub)
            layer.device, layer.dtype = t.device, t.dtype
            layer.has_previous_state[s] = True
            if kind == "conv":  # updated in place: a copy
                layer.conv_states[s] = t.clone()
                layer.conv_kernel_size[s] = int(t.shape[-1])
                layer.is_conv_states_initialized[s] = True
            else:
                layer.recurrent_states[s] = t.clone()
                layer.is_recurrent_states_initialized[s] = True
        return cache

    def extract(self, cache: Any) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(cache.layers):
            if isinstance(layer, self._linear):
                for s in range(layer.number_of_states):
                    if layer.is_conv_states_initialized[s]:
                        out[f"conv.{i}.{s}"] = layer.conv_states[s]
                    if layer.is_recurrent_states_initialized[s]:
                        out[f"ssm.{i}.{s}"] = layer.recurrent_states[s]
            if isinstance(layer, self._attention) and layer.is_initialized and layer.keys is not None:
                out[f"{KV_PREFIX}{i}.k"] = layer.keys
                out[f"{KV_PREFIX}{i}.v"] = layer.values
        return out


def _unsupported_layers(config: Any) -> str | None:
    """Why a ``DynamicCache`` of this config cannot be rebuilt here (None: it can)."""
    from transformers import DynamicCache
    from transformers.cache_utils import (DummyLayer, DynamicLayer, LinearAttentionAndFullAttentionLayer,
                                          LinearAttentionLayer)

    exact = {DynamicLayer, LinearAttentionLayer, LinearAttentionAndFullAttentionLayer, DummyLayer}
    cache = DynamicCache(config=config)
    if not cache.layers:
        return "its cache has no per-layer structure to rebuild"
    other = sorted({type(layer).__name__ for layer in cache.layers if type(layer) not in exact})
    if other:
        return f"its cache has {', '.join(other)} layers (sliding-window or other keys this path does not rebuild)"
    return None


def layout_for(model: Any) -> tuple[CacheLayout | None, str]:
    """The cache layout ``model`` runs on, or (None, why not)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if config is None or model_type in _OWN_BACKENDS or getattr(config, "is_encoder_decoder", False):
        return None, "another backend or no decoder-only config"
    if model.get_output_embeddings() is None if hasattr(model, "get_output_embeddings") else True:
        return None, "no language-model head"
    if cache_argument(model) is None:
        return None, "its forward takes no `cache` argument (transformers before the unified cache)"
    try:
        if model_type == "xlstm":
            from .xlstm import XlstmLayout

            return XlstmLayout(config, next(model.parameters()).dtype), ""
        from transformers.cache_utils import LinearAttentionCacheLayerMixin  # noqa: F401 (5.2x and later)

        why = _unsupported_layers(config)
        if why is not None:
            return None, why
        return DynamicCacheLayout(config), ""
    except Exception as exc:  # noqa: BLE001 - an unknown config or an older transformers: replay
        return None, f"its cache cannot be built ({exc.__class__.__name__}: {exc})"


def why_not_exact(model: Any) -> str:
    """Why ``model`` does not run on the cache backend (what the replay fallback logs)."""
    why = getattr(model, "_oprm_cache_why", None)
    return why if why else layout_for(model)[1] or "no backend runs it from states"


class CacheBackend(Backend):
    """Any transformers model whose ``Cache`` this module can rebuild; see the module docstring.

    ``family`` is the model's ``model_type`` (``"zamba2"``, ``"llama"``...), so a state is
    never fed to a model of another kind.
    """

    family = "hf_cache"
    supports_left_padding = False

    def __init__(self, model: Any, kernels: str = "auto") -> None:
        super().__init__(model, kernels)
        layout, why = layout_for(model)
        if layout is None:
            raise TypeError(f"{type(model).__name__} cannot run on the cache backend: {why}")
        self.layout = layout
        self.family = str(model.config.model_type)  # type: ignore[misc]
        #: Absolute positions matter (attention layers): the engine reports a position limit.
        self.positional = layout.has_kv
        self.cache_arg = cache_argument(model) or "cache"
        params = set(inspect.signature(model.forward).parameters)
        self._takes = {name: name in params for name in ("position_ids", "attention_mask", "logits_to_keep")}
        self._shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None

    # ------------------------------------------------------------------ identity
    @classmethod
    def handles(cls, model: Any) -> bool:
        """A model whose cache this path rebuilds and which passes the self-check."""
        verdict = getattr(model, "_oprm_cache_verdict", None)
        if verdict is None:
            layout, why = layout_for(model)
            if layout is not None:
                why = _self_check(cls(model)) or ""
                if why:
                    logger.warning("%s: not run from stored states (%s); it keeps the token-replay backend",
                                   type(model).__name__, why)
            verdict = not why
            try:
                model._oprm_cache_verdict, model._oprm_cache_why = verdict, why
            except AttributeError:  # pragma: no cover - a model that refuses attributes
                pass
        return bool(verdict)

    def _require_cuda_kernels(self) -> None:
        """transformers' own modules pick mamba-ssm / causal-conv1d / fla kernels where installed."""

    # ------------------------------------------------------------------ states
    def _layout_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Per-row shape and dtype of every state tensor, from one token run (``kv.*``: per token)."""
        if self._shapes is None:
            probe = torch.zeros(1, 1, dtype=torch.long, device=self.device)
            start = RecurrentState(self.family, {"position": torch.zeros(1, dtype=torch.long, device=self.device)})
            cache = self.layout.build(start, fresh=True)
            with torch.no_grad():
                self.model(input_ids=probe, **{self.cache_arg: cache}, use_cache=True)
            self._shapes = {k: (tuple(v.shape[1:]), v.dtype) for k, v in self.layout.extract(cache).items()}
        return self._shapes

    def empty_state(self, batch_size: int = 1) -> RecurrentState:
        dev = self.device
        tensors = {"position": torch.zeros(batch_size, dtype=torch.long, device=dev)}
        for name, (shape, dtype) in self._layout_shapes().items():
            if name.startswith(KV_PREFIX):
                shape = (*shape[:-2], 0, shape[-1])  # no tokens yet
            tensors[name] = torch.zeros((batch_size, *shape), dtype=dtype, device=dev)
        return RecurrentState(self.family, tensors)

    def kv_bytes_per_token(self) -> int:
        """Bytes the attention layers' keys and values add per token of one sequence."""
        return sum(_numel(shape) // shape[-2] * torch.empty(0, dtype=dtype).element_size()
                   for name, (shape, dtype) in self._layout_shapes().items() if name.startswith(KV_PREFIX))

    def state_nbytes(self, tokens: int = 0) -> int:
        """Bytes of one sequence's state after ``tokens`` tokens: the fixed recurrent and conv
        states plus ``tokens`` x :meth:`kv_bytes_per_token` (attention layers grow with the text)."""
        fixed = 8 + sum(_numel(shape) * torch.empty(0, dtype=dtype).element_size()
                        for name, (shape, dtype) in self._layout_shapes().items() if not name.startswith(KV_PREFIX))
        return fixed + int(tokens) * self.kv_bytes_per_token()

    # ------------------------------------------------------------------ running
    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, state: RecurrentState | None = None, *,
                all_logits: bool = False, pad_left: torch.Tensor | None = None) -> ForwardOutput:
        self.use_cuda_kernels()  # kernels="cuda" off CUDA raises; transformers picks its kernels itself
        with intra_op_threads(call_threads(self, input_ids.numel())):  # short calls: one thread
            step = self._begin(input_ids, state, pad_left)
            position = step.state.tensors["position"]
            fresh = not bool((position > 0).any())
            cache = self.layout.build(step.state, fresh)
            mask = None if fresh else _padding_mask(step.state)
            logits = self._run(step.ids, cache, position, mask, all_logits)
            new = RecurrentState(self.family, {"position": step.position_after(), **self.layout.extract(cache)})
            return ForwardOutput(logits, new)

    def _run(self, ids: torch.Tensor, cache: Any, position: torch.Tensor, mask: torch.Tensor | None,
             all_logits: bool) -> torch.Tensor:
        """One model call from ``cache``: the logits ([b, v] last, or [b, t, v]) as float32."""
        b, t = ids.shape
        kwargs: dict[str, Any] = {self.cache_arg: cache, "use_cache": True}
        if self.positional and self._takes["position_ids"]:
            kwargs["position_ids"] = position[:, None] + torch.arange(t, device=ids.device)
        if mask is not None:
            kwargs["attention_mask"] = torch.cat([mask, mask.new_ones(b, t)], dim=1).long()
        if not all_logits and self._takes["logits_to_keep"]:
            kwargs["logits_to_keep"] = 1
        out = self.model(input_ids=ids, **kwargs)
        logits = out.logits if hasattr(out, "logits") else out[0]
        return (logits[:, -t:] if all_logits else logits[:, -1]).float()

    def session(self, state: RecurrentState) -> DecodeSession:
        return CacheSession(self, state)


class CacheSession(DecodeSession):
    """Token-by-token decoding on one live transformers cache, built once from the state.

    Each step feeds the model its own cache (no copy of the keys per token); the state given
    is never modified (the cache holds copies of what the model updates in place), and
    ``state`` is a snapshot.
    """

    def __init__(self, backend: CacheBackend, state: RecurrentState) -> None:  # noqa: D107
        self.backend = backend
        self._load(state)

    def _load(self, state: RecurrentState) -> None:
        backend: CacheBackend = self.backend  # type: ignore[assignment]
        state = backend.check_state(state, state.batch_size)
        self._position = state.tensors["position"].clone()
        fresh = not bool((self._position > 0).any())
        self._cache = backend.layout.build(state, fresh)
        self._mask = None if fresh else _padding_mask(state)
        self._threads = call_threads(backend, state.batch_size)

    @property
    def state(self) -> RecurrentState:  # type: ignore[override]
        backend: CacheBackend = self.backend  # type: ignore[assignment]
        tensors = {k: v.clone() for k, v in backend.layout.extract(self._cache).items()}
        return RecurrentState(backend.family, {"position": self._position.clone(), **tensors})

    @state.setter
    def state(self, state: RecurrentState) -> None:
        self._load(state)

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        backend: CacheBackend = self.backend  # type: ignore[assignment]
        ids = input_ids.to(backend.device)
        if ids.shape[0] != self._position.shape[0]:
            out = backend.forward(ids, self.state)
            self._load(out.state)
            return out.logits
        with intra_op_threads(self._threads):
            logits = backend._run(ids, self._cache, self._position, self._mask, all_logits=False)
        if self._mask is not None:
            self._mask = torch.cat([self._mask, self._mask.new_ones(ids.shape)], dim=1)
        self._position = self._position + ids.shape[1]
        return logits


def _padding_mask(state: RecurrentState) -> torch.Tensor | None:
    """[b, T] of the stored keys' real slots, or None where no row is padded."""
    valid = state.kv_valid()
    if valid is None or bool(valid.all()):
        return None
    return valid


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _self_check(backend: CacheBackend) -> str | None:
    """Why continuing from this backend's states is not exact here (None: it is).

    Two rows of 7 tokens: plain forwards, against (a) the state after 4 tokens continued by
    3, and (b) states after 4 and after 2 tokens, batched (the shorter left-padded), each
    continued by the same 3 tokens as its own plain forward of 7 and 5 tokens.
    """

    model = backend.model
    vocab = int(model.get_output_embeddings().weight.shape[0])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(min(3, vocab - 1), vocab, (2, 7), generator=g).to(backend.device)
    try:
        with torch.no_grad():
            plain = model(input_ids=ids, use_cache=False).logits.float()
            short = model(input_ids=torch.cat([ids[1:, :2], ids[1:, 4:]], 1), use_cache=False).logits.float()
        first = backend.forward(ids[:, :4])
        rest = backend.forward(ids[:, 4:], first.state, all_logits=True)
        if not logits_close(rest.logits, plain[:, 4:], backend.dtype):
            return f"continuing from a stored state is off by {_gap(rest.logits, plain[:, 4:]):.2g}"
        mixed = RecurrentState.cat([first.state.select(0), backend.forward(ids[1:, :2]).state])
        both = backend.forward(ids[:, 4:], mixed, all_logits=True)
        if not (logits_close(both.logits[0], plain[0, 4:], backend.dtype)
                and logits_close(both.logits[1], short[0, 2:], backend.dtype)):
            want = torch.stack([plain[0, 4:], short[0, 2:]])
            return f"rows of different lengths in one batch are off by {_gap(both.logits, want):.2g}"
    except Exception as exc:  # noqa: BLE001 - a cache this path does not understand
        return f"running from a rebuilt cache failed ({exc.__class__.__name__}: {exc})"
    return None


def _gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())
