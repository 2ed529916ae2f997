"""The RWKV "world" tokenizer: greedy longest match over bytes, as BlinkDL's ``TRIE_TOKENIZER``.

The vocabulary file (``rwkv_vocab_v20230424.txt``, shipped with every RWKV world model
and with the ``rwkv`` package) lists ``id repr(token) byte_length`` per line; id 0 is the
end-of-text token and is not in the file. Text is encoded as UTF-8 and cut, from the
left, into the longest vocabulary entry that matches at each point: the same ids as the
reference tokenizer (tested against it). Lines are parsed with ``ast.literal_eval``,
never ``eval``.

Hugging Face RWKV folders declare added tokens (``<|rwkv_tokenizer_end_of_text|>`` as
id 0, ``"\\n\\n"`` as the end-of-answer token): as transformers does, text is split at
those first, and the pieces are matched greedily. The class offers the part of the
transformers tokenizer interface the library uses (``__call__`` with
``return_offsets_mapping``, ``decode``, ``apply_chat_template``, the special-token ids),
so a native RWKV model needs no ``trust_remote_code`` for its tokenizer either.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import ModelLoadError

__all__ = ["RwkvWorldTokenizer", "read_world_vocab", "WORLD_CHAT_TEMPLATE"]

#: RWKV world models' chat format ("User: ...\n\nAssistant:"), for .pth files without a template.
WORLD_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}System: {{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n\n"
    "{% else %}Assistant: {{ m['content'] }}\n\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
_END_OF_TEXT = "<|rwkv_tokenizer_end_of_text|>"


def read_world_vocab(path: str | Path) -> dict[int, bytes]:
    """``{id: token bytes}`` of a world vocabulary file; ModelLoadError on a bad line."""
    out: dict[int, bytes] = {}
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path}: cannot be read ({exc})") from exc
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            idx = int(line[:line.index(" ")])
            lit = line[line.index(" "):line.rindex(" ")].strip()
            if len(lit) >= 2 and lit[0] == lit[-1] in "'\"" and "\\" not in lit and lit[0] not in lit[1:-1]:
                token = lit[1:-1]  # a plain quoted string (most lines): no need to parse it
            else:
                token = ast.literal_eval(lit)
            token = token.encode("utf-8") if isinstance(token, str) else token
            if not isinstance(token, bytes) or len(token) != int(line[line.rindex(" "):]):
                raise ValueError("length does not match")
        except (ValueError, SyntaxError) as exc:
            raise ModelLoadError(f"{path}, line {number}: not a world-vocabulary line ({exc})") from exc
        out[idx] = token
    if not out:
        raise ModelLoadError(f"{path}: the vocabulary is empty")
    return out


class _Encoding(dict):
    """What ``tokenizer(text)`` returns: a dict with ``input_ids`` (and offsets if asked)."""

    @property
    def input_ids(self) -> Any:
        return self["input_ids"]


class RwkvWorldTokenizer:
    """Byte-level greedy longest-match tokenizer over an RWKV world vocabulary."""

    def __init__(self, vocab: dict[int, bytes], *, added_tokens: dict[str, int] | None = None,
                 eos_token: str | None = None, bos_token: str | None = None, pad_token: str | None = None,
                 chat_template: str | None = None, name_or_path: str = "", split_special: bool = True) -> None:
        self._id_to_bytes = dict(vocab)
        self._bytes_to_id = {v: k for k, v in vocab.items()}
        # every proper prefix of a token: the greedy walk stops where no token continues
        self._prefixes = {tok[:i] for tok in self._bytes_to_id for i in range(1, len(tok))}
        self._max_len = max(len(t) for t in self._bytes_to_id)
        added = {_END_OF_TEXT: 0, **(added_tokens or {})}
        special = dict(added)  # special tokens: added ones and vocabulary texts named eos/bos/pad
        for text in (eos_token, bos_token, pad_token):
            if text and text not in special and text.encode("utf-8") in self._bytes_to_id:
                special[text] = self._bytes_to_id[text.encode("utf-8")]
        # transformers splits text at every special token before the vocabulary sees it (RWKV's HF
        # folders: "\n\n" is one token wherever it occurs); BlinkDL's tokenizer only at added ones
        split = special if split_special else added
        self.added_tokens = special
        self._added_by_id = {v: k for k, v in special.items()}
        self._split_tokens = set(split)
        self._split = re.compile("(" + "|".join(re.escape(t) for t in sorted(split, key=len, reverse=True)) + ")")
        self.eos_token = eos_token if eos_token in special else _END_OF_TEXT
        self.bos_token = bos_token if bos_token in special else _END_OF_TEXT
        self.pad_token = pad_token if pad_token in special else _END_OF_TEXT
        self.chat_template = chat_template
        self.name_or_path = name_or_path
        self.vocab_size = max(max(vocab), max(added.values())) + 1
        # ids that decode(skip_special_tokens=True) drops: added tokens that are not vocabulary text
        self._special_ids = {tid for text, tid in added.items() if tid not in vocab}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_folder(cls, folder: str | Path, vocab_file: str | Path | None = None) -> "RwkvWorldTokenizer":
        """From a model folder (its vocabulary file and, if any, tokenizer_config.json,
        special_tokens_map.json and added_tokens.json, as RWKV's HF releases ship them)."""
        folder = Path(folder)
        vocab_path = Path(vocab_file) if vocab_file else next(iter(sorted(folder.glob("rwkv_vocab_*.txt"))), None)
        if vocab_path is None:
            raise ModelLoadError(f"{folder}: no RWKV world vocabulary (rwkv_vocab_*.txt)")
        meta: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            f = folder / name
            if f.is_file() and f.parent == vocab_path.parent:
                try:
                    loaded = json.loads(f.read_text(encoding="utf-8"))
                except ValueError as exc:
                    raise ModelLoadError(f"{f} is not valid JSON ({exc})") from exc
                meta.update({k: v for k, v in loaded.items() if v is not None})
        added: dict[str, int] = {}
        f = folder / "added_tokens.json"
        if f.is_file():
            added.update({str(k): int(v) for k, v in json.loads(f.read_text(encoding="utf-8")).items()})
        for tid, spec in (meta.get("added_tokens_decoder") or {}).items():
            if isinstance(spec, dict) and "content" in spec:
                added[str(spec["content"])] = int(tid)
        vocab = read_world_vocab(vocab_path)
        from_pth = not (folder / "config.json").is_file()

        def token(key: str, default: str | None) -> str | None:
            value = meta.get(key, default)
            return value.get("content") if isinstance(value, dict) else value

        eos_default = "\n\n" if b"\n\n" in vocab.values() else _END_OF_TEXT
        return cls(vocab, added_tokens=added, eos_token=token("eos_token", eos_default),
                   bos_token=token("bos_token", _END_OF_TEXT), pad_token=token("pad_token", _END_OF_TEXT),
                   chat_template=meta.get("chat_template") or (WORLD_CHAT_TEMPLATE if from_pth else None),
                   name_or_path=str(folder), split_special=not from_pth)

    # ------------------------------------------------------------------ ids
    @property
    def eos_token_id(self) -> int:
        return self.added_tokens[self.eos_token]

    @property
    def bos_token_id(self) -> int:
        return self.added_tokens[self.bos_token]

    @property
    def pad_token_id(self) -> int:
        return self.added_tokens[self.pad_token]

    @property
    def all_special_ids(self) -> list[int]:
        return sorted(set(self.added_tokens.values()))

    def __len__(self) -> int:
        return self.vocab_size

    def get_vocab(self) -> dict[str, int]:
        out = {tok.decode("utf-8", errors="backslashreplace"): i for i, tok in self._id_to_bytes.items()}
        out.update(self.added_tokens)
        return out

    # ------------------------------------------------------------------ encoding
    def _encode_bytes(self, data: bytes, base: int, ids: list[int], spans: list[tuple[int, int]]) -> None:
        """Greedy longest match of ``data``; byte spans offset by ``base``."""
        i, n = 0, len(data)
        lookup, prefixes, limit = self._bytes_to_id, self._prefixes, self._max_len
        while i < n:
            best, j = 0, i + 1
            top = min(n, i + limit)
            while j <= top:
                piece = data[i:j]
                if piece in lookup:
                    best = j
                if piece not in prefixes:
                    break
                j += 1
            if best == 0:
                raise ValueError(f"byte {data[i]!r} is not in the RWKV vocabulary")
            ids.append(lookup[data[i:best]])
            spans.append((base + i, base + best))
            i = best

    def _encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and char offsets of ``text``."""
        ids: list[int] = []
        char_spans: list[tuple[int, int]] = []
        pos = 0
        for piece in self._split.split(text):
            if not piece:
                continue
            if piece in self._split_tokens:
                ids.append(self.added_tokens[piece])
                char_spans.append((pos, pos + len(piece)))
            else:
                data = piece.encode("utf-8")
                spans: list[tuple[int, int]] = []
                self._encode_bytes(data, 0, ids, spans)
                char_spans += _byte_to_char_spans(piece, data, spans, pos)
            pos += len(piece)
        return ids, char_spans

    def encode(self, text: str, add_special_tokens: bool = False, **_: Any) -> list[int]:
        return self._encode(text)[0]

    def __call__(self, text: str | Sequence[str], add_special_tokens: bool = False,
                 return_offsets_mapping: bool = False, **_: Any) -> _Encoding:
        if isinstance(text, str):
            ids, offsets = self._encode(text)
            out = _Encoding(input_ids=ids, attention_mask=[1] * len(ids))
            if return_offsets_mapping:
                out["offset_mapping"] = offsets
            return out
        rows = [self(t, return_offsets_mapping=return_offsets_mapping) for t in text]
        return _Encoding({k: [r[k] for r in rows] for k in rows[0]} if rows else {"input_ids": []})

    # ------------------------------------------------------------------ decoding
    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> Any:
        def one(i: int) -> str:
            if i in self._added_by_id and i not in self._id_to_bytes:
                return self._added_by_id[i]
            return self._id_to_bytes.get(i, b"").decode("utf-8", errors="backslashreplace")

        return one(int(ids)) if isinstance(ids, int) else [one(int(i)) for i in ids]

    def decode(self, ids: Iterable[int] | int, skip_special_tokens: bool = False, **_: Any) -> str:
        if isinstance(ids, int):
            ids = [ids]
        parts: list[bytes] = []
        for i in ids:
            i = int(getattr(i, "item", lambda: i)())
            if i in self._id_to_bytes:
                parts.append(self._id_to_bytes[i])
            elif not skip_special_tokens and i in self._added_by_id:
                parts.append(self._added_by_id[i].encode("utf-8"))
        return b"".join(parts).decode("utf-8", errors="replace")

    def batch_decode(self, rows: Iterable[Iterable[int]], skip_special_tokens: bool = False, **_: Any) -> list[str]:
        return [self.decode(r, skip_special_tokens=skip_special_tokens) for r in rows]

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool = True,
                            add_generation_prompt: bool = False, **kwargs: Any) -> Any:
        if not self.chat_template:
            raise ValueError(f"{self.name_or_path or 'this tokenizer'} has no chat template")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
        text = env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, eos_token=self.eos_token,
            bos_token=self.bos_token, **kwargs)
        return self.encode(text) if tokenize else text

    def save_pretrained(self, folder: str | Path) -> None:
        """The vocabulary file and a tokenizer_config.json that :meth:`from_folder` reads."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for i, tok in sorted(self._id_to_bytes.items()):
            try:
                lit = repr(tok.decode("utf-8"))
            except UnicodeDecodeError:
                lit = repr(tok)
            lines.append(f"{i} {lit} {len(tok)}")
        (folder / "rwkv_vocab_v20230424.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        config = {"tokenizer_class": "RwkvTokenizer", "eos_token": self.eos_token, "bos_token": self.bos_token,
                  "pad_token": self.pad_token, "chat_template": self.chat_template,
                  "added_tokens_decoder": {str(v): {"content": k, "special": True}
                                           for k, v in self.added_tokens.items()}}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")

    def __repr__(self) -> str:
        return f"RwkvWorldTokenizer({self.name_or_path!r}, vocab={self.vocab_size}, eos={self.eos_token!r})"


def _byte_to_char_spans(text: str, data: bytes, spans: list[tuple[int, int]], base: int) -> list[tuple[int, int]]:
    """Byte spans of ``data`` (``text`` as UTF-8) as char spans (a token that cuts a
    multi-byte character covers that whole character)."""
    if len(data) == len(text):  # ASCII: bytes are chars
        return [(base + a, base + b) for a, b in spans]
    char_of = []
    for ci, ch in enumerate(text):
        char_of += [ci] * len(ch.encode("utf-8"))
    return [(base + char_of[a], base + char_of[b - 1] + 1) for a, b in spans]
