"""``RecurrentLM``: one loaded model and its tokenizer, shared by everything.

A ``RecurrentLM`` is a loader and a backend: it loads a model (once, here, never in a
framework constructor), tokenises, runs forward passes from explicit states (through
its backend) and says what the model is (identity, limits, training length). It keeps
nothing *about* the model's use: the prefix and tokenisation memos, the document cache
and the handoff live in its in-process engine (``oprm_rag.resolve(lm)``), which owns it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from .backends import backend_for
from .backends.base import Backend, DecodeSession, ForwardOutput
from .prompts import PromptTemplate
from .state import RecurrentState

if TYPE_CHECKING:  # pragma: no cover
    from .mitigation import CollapseMitigation

__all__ = ["RecurrentLM", "load_demo_lm"]

logger = logging.getLogger("oprm_rag")

#: Tokens per forward call when prefilling one long sequence; bounds activation memory.
PREFILL_SLICE = 4096
#: The context length reported for a recurrent model (no hard limit).
UNBOUNDED_CONTEXT = 1 << 20


class RecurrentLM:
    """A causal LM (recurrent or not) with its tokenizer, run from explicit states.

    ``RecurrentLM(model, tokenizer)`` wraps objects you already hold;
    :meth:`from_pretrained` loads them. ``kernels`` picks the scan ("auto": the fused
    CUDA kernels when on CUDA and installed). ``collapse_mitigation`` applies a
    Stuffed-Mamba mitigation to Mamba-2 models (see :mod:`oprm_rag.mitigation`).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        name: str | None = None,
        prompt: PromptTemplate | None = None,
        kernels: str = "auto",
        collapse_mitigation: "CollapseMitigation | str | None" = None,
    ) -> None:
        if model is None or tokenizer is None:
            raise ValueError("RecurrentLM needs a model and a tokenizer; use RecurrentLM.from_pretrained(path)")
        model.eval()
        self.model = model
        self.tokenizer = tokenizer
        self.name = name or getattr(model.config, "_name_or_path", None) or type(model).__name__
        self.model_dir = Path(self.name) if Path(str(self.name)).is_dir() else None
        self.mitigation = None
        if collapse_mitigation is not None:
            from .mitigation import CollapseMitigation

            self.mitigation = CollapseMitigation.parse(collapse_mitigation)
        self.backend: Backend = backend_for(model, kernels=kernels, mitigation=self.mitigation)
        if not self.backend.exact_continuation:
            logger.warning(
                "%s (%s): its cache cannot be continued exactly from a stored state (%s); OPRM falls back "
                "to a full prefill of [P, C_i, Q] per chunk.", self.name, type(model).__name__,
                getattr(self.backend, "reason", "no backend runs it from states"))
        self.prompt = prompt or PromptTemplate.for_model(self.model_dir, tokenizer)
        self._lock = threading.RLock()
        self._identity: str | None = None
        self.counters = {"prefill_tokens": 0, "decode_tokens": 0, "forward_calls": 0}
        self.prefill_slice = PREFILL_SLICE

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        device: str | torch.device | None = None,
        dtype: Any = None,
        *,
        kernels: str = "auto",
        collapse_mitigation: "CollapseMitigation | str | None" = None,
        trust_remote_code: bool = False,
        allow_missing_weights: bool = False,
        prompt: PromptTemplate | None = None,
        matmul_dtype: Any = None,
        **hf_kwargs: Any,
    ) -> "RecurrentLM":
        """Load a model and its tokenizer through transformers, checked.

        ``device_map``, ``torch_dtype`` / ``dtype`` and ``quantization_config`` pass
        through. ``trust_remote_code`` stays off unless you set it. Weights that do not
        match the architecture (missing, unexpected, wrongly shaped), a truncated
        weights file or a broken config raise :class:`~oprm_rag.errors.ModelLoadError`
        naming them, instead of loading a partly random model; ``allow_missing_weights``
        opts in to that on purpose (see :mod:`oprm_rag.loading`). ``matmul_dtype``
        ("bfloat16", "auto" or None) runs the Mamba projections in bf16 on CPU, the
        recurrence staying float32 (see :mod:`oprm_rag.kernels.precision`).
        """
        from .loading import load_model_and_tokenizer

        path = str(name_or_path)
        model, tokenizer = load_model_and_tokenizer(path, dtype=dtype, device=device,
                                                    trust_remote_code=trust_remote_code,
                                                    allow_missing_weights=allow_missing_weights, **hf_kwargs)
        lm = cls(model, tokenizer, name=path, kernels=kernels, collapse_mitigation=collapse_mitigation,
                 prompt=prompt)
        if matmul_dtype is not None:
            if not hasattr(lm.backend, "set_matmul_dtype"):
                raise ValueError(f"matmul_dtype is for the Mamba backends; {lm.family!r} runs in its loaded dtype")
            lm.backend.set_matmul_dtype(matmul_dtype)
        return lm

    # ------------------------------------------------------------------ facts
    @property
    def family(self) -> str:
        return self.backend.family

    @property
    def device(self) -> torch.device:
        return self.backend.device

    @property
    def dtype(self) -> torch.dtype:
        return self.backend.dtype

    @property
    def state_nbytes(self) -> int:
        """Bytes of one sequence's state (0 for the token-replay fallback)."""
        return self.backend.state_nbytes()

    @property
    def eos_token_ids(self) -> set[int]:
        ids: set[int] = set()
        for src in (self.tokenizer.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None)
                    if getattr(self.model, "generation_config", None) is not None else None):
            if isinstance(src, int):
                ids.add(src)
            elif isinstance(src, (list, tuple)):
                ids.update(int(i) for i in src)
        return ids

    @property
    def training_context_tokens(self) -> int | None:
        """The context length the model was trained on, where the folder or config says."""
        if self.model_dir is not None:
            log = self.model_dir / "training_log.json"
            if log.is_file():
                try:
                    return int(json.loads(log.read_text())["train_context_tokens"])
                except (KeyError, ValueError, TypeError):
                    pass
        for attr in ("max_position_embeddings", "n_positions", "max_seq_len", "context_length"):
            value = getattr(self.model.config, attr, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    @property
    def context_window(self) -> int:
        """The most tokens one call can take: what to tell frameworks that pack prompts.

        A model with absolute positions (the token-replay fallback: a transformer) has
        a hard limit. A recurrent model has none (its state is fixed-size; it reads any
        length) and reports a large bound. Its training length is a *quality* limit,
        which OPRM enforces by chunking (``chunk_tokens="auto"``); used as a packing
        budget it would break frameworks' synthesizers, which reserve room for previous
        answers on top of prompt and output.
        """
        return self.position_limit or UNBOUNDED_CONTEXT

    @property
    def position_limit(self) -> int | None:
        """A hard limit on one sequence's tokens: only for models with absolute positions
        (attention layers, exact or on the token replay); recurrent models read any length."""
        if self.backend.exact_continuation and not self.backend.positional:
            return None
        value = getattr(self.model.config, "max_position_embeddings", None)
        return int(value) if isinstance(value, int) and value > 0 else None

    @property
    def vocab_size(self) -> int:
        head = self.model.get_output_embeddings()
        return int(head.weight.shape[0]) if head is not None else int(self.model.config.vocab_size)

    @property
    def identity(self) -> str:
        """A hash of the model's name, class, config, dtype, weight fingerprint and mitigation.

        Cache keys include it, so states of one model are never served to another.
        """
        if self._identity is None:
            h = hashlib.sha256()
            h.update(f"{self.name}|{type(self.model).__name__}|{self.dtype}|{self.mitigation!r}".encode())
            precision = getattr(self.backend, "precision", None)
            if precision is not None and not precision.exact:  # bf16 products give other states: other keys
                h.update(precision.label().encode())
            h.update(json.dumps(self.model.config.to_dict(), sort_keys=True, default=str).encode())
            for i, (pname, p) in enumerate(self.model.named_parameters()):
                if i >= 16:
                    break
                flat = p.detach().reshape(-1)[:2048].float().cpu()
                h.update(pname.encode())
                h.update(flat.numpy().tobytes())
            self._identity = h.hexdigest()[:32]
        return self._identity

    # ------------------------------------------------------------------ tokens
    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"expected text (str), got {type(text).__name__}")
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def encode_with_offsets(self, text: str) -> tuple["np.ndarray", "np.ndarray"]:
        """Token ids [n] and char offsets [n, 2] as int64 arrays (compact on any length).

        Long texts are tokenised in slices cut before a space that starts a word, a
        pre-token boundary for byte-level and metaspace tokenisers; each cut is checked
        against tokenising the text around it, and moved if the two disagree. (The
        model's engine memoises this for follow-up questions.)
        """
        from .tokenize import encode_with_offsets

        return encode_with_offsets(self.tokenizer, text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a chat through the tokenizer's chat template (generation prompt added)."""
        if not getattr(self.tokenizer, "chat_template", None):
            text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"
            return self.encode(text, add_special_tokens=True)
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.encode(text)

    # ------------------------------------------------------------------ running
    def forward(self, input_ids: torch.Tensor, state: RecurrentState | None = None, *,
                all_logits: bool = False, pad_left: torch.Tensor | None = None) -> ForwardOutput:
        """One backend call (a batch of rows from a batch of states)."""
        with self._lock:
            self.counters["forward_calls"] += 1
            real = input_ids.numel() - (int(pad_left.sum()) if pad_left is not None else 0)
            self.counters["prefill_tokens"] += real
            return self.backend.forward(input_ids.to(self.device), state, all_logits=all_logits, pad_left=pad_left)

    def prefill(self, ids: Sequence[int], state: RecurrentState | None = None) -> ForwardOutput:
        """Run one sequence from ``state`` in slices (bounded memory on any length)."""
        if len(ids) == 0:
            raise ValueError("prefill needs at least one token")
        out: ForwardOutput | None = None
        for start in range(0, len(ids), self.prefill_slice):
            piece = torch.tensor([list(ids[start:start + self.prefill_slice])], dtype=torch.long)
            out = self.forward(piece, state)
            state = out.state
        assert out is not None
        return out

    def decode_step(self, session: DecodeSession, input_ids: torch.Tensor, active: int | None = None) -> torch.Tensor:
        """One decoding step through ``session`` (counted; serialised with other calls)."""
        with self._lock:
            self.counters["decode_tokens"] += int(input_ids.shape[0] if active is None else active)
            return session.step(input_ids)

    def __repr__(self) -> str:
        return f"RecurrentLM({self.name!r}, family={self.family!r}, device={self.device}, dtype={self.dtype})"


def load_demo_lm(device: str | torch.device | None = None, **kwargs: Any) -> RecurrentLM:
    """Load the shipped demo model (offline, a few MB)."""
    from ._about import DEMO_MODEL
    from .errors import ModelLoadError

    if not (Path(DEMO_MODEL) / "config.json").is_file():
        raise ModelLoadError(f"the demo model is missing from {DEMO_MODEL}; reinstall oprm-rag "
                             "or run `make train-demo-model-v2` (a fine-tune of training/checkpoints/demo-v1)")
    return RecurrentLM.from_pretrained(DEMO_MODEL, device=device, **kwargs)
