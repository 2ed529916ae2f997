"""``RecurrentLM``: one loaded model and tokenizer, shared by everything.

The selector, the document cache and the LangChain / LlamaIndex wrappers all hold the
same ``RecurrentLM``. It owns the backend that runs the model from explicit states,
the memo of instruction-prefix states, the state handoff registry, and the decoding
loop. Loading happens once, here, never in a framework constructor.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import torch

from .backends import backend_for
from .backends.base import Backend, DecodeSession, ForwardOutput
from .generation import Generation, GenerationConfig, TextAssembler, choose_next
from .handoff import StateHandoff
from .prompts import PromptTemplate
from .state import RecurrentState

if TYPE_CHECKING:  # pragma: no cover
    from .mitigation import CollapseMitigation

__all__ = ["RecurrentLM", "TokenStream", "PromptStart"]

logger = logging.getLogger("oprm_rag")
_ENCODED_MAX_BYTES = 128 * 2**20  # recent tokenisations kept for follow-up questions (each <= 1/8)

#: Tokens per forward call when prefilling one long sequence; bounds activation memory.
PREFILL_SLICE = 4096


def _resolve_dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    try:
        value = getattr(torch, str(dtype).replace("torch.", ""))
    except AttributeError:
        value = None
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    return value


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
        handoff_bytes: int = 256 * 2**20,
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
                "%s (%s): its cache cannot be continued exactly from a stored state; OPRM falls back "
                "to a full prefill of [P, C_i, Q] per chunk.", self.name, type(model).__name__)
        self.prompt = prompt or PromptTemplate.for_model(self.model_dir, tokenizer)
        self.handoff = StateHandoff(max_bytes=handoff_bytes)
        self._prefix_states: "OrderedDict[tuple[int, ...], ForwardOutput]" = OrderedDict()
        self._lock = threading.RLock()
        self._identity: str | None = None
        self._cache: Any = None
        self.counters = {"prefill_tokens": 0, "decode_tokens": 0, "forward_calls": 0}
        # Recent documents' tokenisations: a follow-up question about the same text needs its
        # token ids again (for the cache key and the chunks), and re-tokenising a long
        # document would cost more than the follow-up itself. Bounded by bytes.
        self._encoded: "OrderedDict[tuple[int, str], tuple[Any, Any]]" = OrderedDict()
        self._encoded_bytes = 0

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
        prompt: PromptTemplate | None = None,
        **hf_kwargs: Any,
    ) -> "RecurrentLM":
        """Load a model and its tokenizer through transformers.

        ``device_map``, ``torch_dtype`` / ``dtype`` and ``quantization_config`` pass
        through. ``trust_remote_code`` stays off unless you set it.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = str(name_or_path)
        if "torch_dtype" in hf_kwargs and dtype is None:
            dtype = hf_kwargs.pop("torch_dtype")
        resolved = _resolve_dtype(dtype)
        model_kwargs = dict(hf_kwargs)
        model_kwargs["trust_remote_code"] = trust_remote_code
        if resolved is not None:
            model_kwargs["dtype"] = resolved
        tok_kwargs = {k: model_kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only",
                                                   "gguf_file") if k in model_kwargs}
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **tok_kwargs)
            model = AutoModelForCausalLM.from_pretrained(path, **model_kwargs)
        except OSError as exc:
            raise OSError(
                f"Could not load a model from {path!r}: {exc}\nGive a local folder with config.json, "
                "weights and tokenizer files, or a hub name on a machine that can download it."
            ) from exc
        if device is not None and "device_map" not in model_kwargs:
            model = model.to(device)
        return cls(model, tokenizer, name=path, kernels=kernels, collapse_mitigation=collapse_mitigation,
                   prompt=prompt)

    def document_cache(self, max_bytes: int | None = None, directory: str | Path | None = None) -> Any:
        """The document state cache shared by every selector on this model (made on first use).

        Passing ``max_bytes`` or ``directory`` replaces it with one so configured.
        """
        from .cache import DocumentStateCache

        with self._lock:
            if self._cache is None or max_bytes is not None or directory is not None:
                kwargs: dict[str, Any] = {"directory": directory}
                if max_bytes is not None:
                    kwargs["max_bytes"] = max_bytes
                self._cache = DocumentStateCache(**kwargs)
            return self._cache

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
        """What to tell frameworks: the training context, else a large bound (recurrent)."""
        return self.training_context_tokens or 1 << 20

    @property
    def identity(self) -> str:
        """A hash of the model's name, class, config, dtype, weight fingerprint and mitigation.

        Cache keys include it, so states of one model are never served to another.
        """
        if self._identity is None:
            h = hashlib.sha256()
            h.update(f"{self.name}|{type(self.model).__name__}|{self.dtype}|{self.mitigation!r}".encode())
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
        against tokenising the text around it, and moved if the two disagree.
        """
        from .tokenize import encode_with_offsets

        key = (len(text), hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest())
        with self._lock:
            hit = self._encoded.get(key)
            if hit is not None:
                self._encoded.move_to_end(key)
                return hit[0].copy(), hit[1].copy()  # callers own their arrays
        ids, offsets = encode_with_offsets(self.tokenizer, text)
        size = ids.nbytes + offsets.nbytes
        if size <= _ENCODED_MAX_BYTES // 8:  # a huge document is not kept: memory stays bounded
            with self._lock:
                if key not in self._encoded:
                    self._encoded[key] = (ids.copy(), offsets.copy())
                    self._encoded_bytes += size
                while self._encoded_bytes > _ENCODED_MAX_BYTES:
                    _, (old_ids, old_offsets) = self._encoded.popitem(last=False)
                    self._encoded_bytes -= old_ids.nbytes + old_offsets.nbytes
        return ids, offsets

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
        for start in range(0, len(ids), PREFILL_SLICE):
            piece = torch.tensor([list(ids[start:start + PREFILL_SLICE])], dtype=torch.long)
            out = self.forward(piece, state)
            state = out.state
        assert out is not None
        return out

    def has_prefix_state(self, ids: Sequence[int]) -> bool:
        with self._lock:
            return tuple(int(i) for i in ids) in self._prefix_states

    def prefix_state(self, ids: Sequence[int]) -> ForwardOutput:
        """The (memoised) state after the instruction prefix: computed once per prefix."""
        key = tuple(int(i) for i in ids)
        with self._lock:
            hit = self._prefix_states.get(key)
            if hit is not None:
                self._prefix_states.move_to_end(key)
                return hit
        if key:
            out = self.prefill(key)
        else:
            empty = self.backend.empty_state(1)
            out = ForwardOutput(torch.zeros(1, 1), empty)
        with self._lock:
            self._prefix_states[key] = out
            while len(self._prefix_states) > 8:
                self._prefix_states.popitem(last=False)
        return out

    # ------------------------------------------------------------------ decoding
    def stream_from(self, state: RecurrentState, logits: torch.Tensor, config: GenerationConfig | None = None,
                    prompt_tokens: int = 0) -> "TokenStream":
        """Decode one answer from a batch-1 state whose next-token logits are ``logits``."""
        return TokenStream(self, state, logits, config or GenerationConfig(), prompt_tokens)

    def generate_from(self, state: RecurrentState, logits: torch.Tensor,
                      config: GenerationConfig | None = None, prompt_tokens: int = 0) -> Generation:
        stream = self.stream_from(state, logits, config, prompt_tokens)
        for _ in stream:
            pass
        return stream.result

    def generate_batch_from(self, state: RecurrentState, logits: torch.Tensor,
                            config: GenerationConfig | None = None,
                            prompt_tokens: Sequence[int] | None = None) -> list[Generation]:
        """Decode ``b`` answers at once from a batch of states (rows stop independently)."""
        cfg = config or GenerationConfig()
        b = state.batch_size
        gen = cfg.generator(self.device)
        asms = [TextAssembler(self.tokenizer, cfg.stop) for _ in range(b)]
        results = [Generation("", [], "length", (prompt_tokens or [0] * b)[i]) for i in range(b)]
        done = [cfg.max_new_tokens == 0] * b
        session = self.backend.session(state)
        eos = self.eos_token_ids if cfg.stop_at_eos else set()
        for step in range(cfg.max_new_tokens):
            nxt = choose_next(logits, cfg, gen)
            for i, tid in enumerate(nxt.tolist()):
                if done[i]:
                    continue
                if tid in eos:
                    results[i].finish_reason, done[i] = "eos", True
                    continue
                results[i].token_ids.append(tid)
                asms[i].add(tid)
                if asms[i].stopped:
                    results[i].finish_reason, done[i] = "stop", True
            if all(done) or step + 1 == cfg.max_new_tokens:
                break
            with self._lock:
                self.counters["decode_tokens"] += b
                logits = session.step(nxt[:, None])
        for i in range(b):
            asms[i].finish()
            results[i].text = asms[i].text
        return results

    def prompt_ids(self, prompt: str | Sequence[int], *, add_special_tokens: bool = True) -> list[int]:
        """Token ids for a prompt; a prompt that starts with a handed-off text reuses its exact ids."""
        if not isinstance(prompt, str):
            return [int(i) for i in prompt]
        entry = self.handoff.lookup_text(prompt)
        if entry is not None:
            rest = prompt[len(entry.text or ""):]
            return list(entry.ids) + (self.encode(rest) if rest else [])
        return self.encode(prompt, add_special_tokens=add_special_tokens)

    def start(self, prompt: str | Sequence[int], *, add_special_tokens: bool = True) -> "PromptStart":
        """Run ``prompt`` to its last token, resuming from a handed-off state when it begins
        with one the selector just scored (then only the rest is prefilled)."""
        ids = self.prompt_ids(prompt, add_special_tokens=add_special_tokens)
        if not ids:
            raise ValueError("the prompt is empty: the model needs at least one token to continue from")
        entry = self.handoff.lookup(ids)
        if entry is None:
            out = self.prefill(ids)
            return PromptStart(out.state, out.logits.reshape(1, -1), ids, 0)
        rest = ids[entry.num_tokens:]
        if rest:
            out = self.prefill(rest, entry.state)
            return PromptStart(out.state, out.logits.reshape(1, -1), ids, entry.num_tokens)
        return PromptStart(entry.state, entry.logits.reshape(1, -1), ids, entry.num_tokens)

    def complete(self, prompt: str | Sequence[int], config: GenerationConfig | None = None, *,
                 add_special_tokens: bool = True) -> "TokenStream":
        """Stream a completion of ``prompt``, resuming from a handed-off state if one matches.

        A prompt that begins with exactly the tokens of a state the selector just scored
        continues from that state: the chunk is not prefilled again.
        """
        started = self.start(prompt, add_special_tokens=add_special_tokens)
        stream = self.stream_from(started.state, started.logits, config, prompt_tokens=len(started.ids))
        stream.handoff_hit = started.handoff_hit
        return stream

    def __repr__(self) -> str:
        return f"RecurrentLM({self.name!r}, family={self.family!r}, device={self.device}, dtype={self.dtype})"


@dataclass
class PromptStart:
    """A prompt run up to its last token: the state, the next-token logits [1, v], its ids,
    and how many of those tokens were resumed from a handed-off state (0: none)."""

    state: RecurrentState
    logits: torch.Tensor
    ids: list[int]
    reused_tokens: int

    @property
    def handoff_hit(self) -> bool:
        return self.reused_tokens > 0


class TokenStream:
    """Iterate to get text pieces as they are decoded; ``result`` holds the whole answer."""

    def __init__(self, lm: RecurrentLM, state: RecurrentState, logits: torch.Tensor,
                 config: GenerationConfig, prompt_tokens: int) -> None:
        if state.batch_size != 1:
            raise ValueError("TokenStream decodes one sequence; use generate_batch_from for batches")
        self.lm = lm
        self.config = config
        self.result = Generation("", [], "length", prompt_tokens)
        self.handoff_hit = False
        self._state = state
        self._logits = logits.reshape(1, -1)
        self._iter: Iterator[str] | None = None

    def __iter__(self) -> Iterator[str]:
        if self._iter is None:
            self._iter = self._run()
        return self._iter

    def _run(self) -> Iterator[str]:
        lm, cfg = self.lm, self.config
        asm = TextAssembler(lm.tokenizer, cfg.stop)
        gen = cfg.generator(lm.device)
        eos = lm.eos_token_ids if cfg.stop_at_eos else set()
        session: DecodeSession = lm.backend.session(self._state)
        logits = self._logits
        for step in range(cfg.max_new_tokens):
            nxt = choose_next(logits, cfg, gen)
            tid = int(nxt[0])
            if tid in eos:
                self.result.finish_reason = "eos"
                break
            self.result.token_ids.append(tid)
            piece = asm.add(tid)
            self.result.text = asm.text
            if piece:
                yield piece
            if asm.stopped:
                self.result.finish_reason = "stop"
                break
            if step + 1 < cfg.max_new_tokens:
                with lm._lock:
                    lm.counters["decode_tokens"] += 1
                    logits = session.step(nxt[:, None])
        tail = asm.finish()
        self.result.text = asm.text
        if tail:
            yield tail

    def text(self) -> str:
        """Run to the end and return the whole answer."""
        for _ in self:
            pass
        return self.result.text
