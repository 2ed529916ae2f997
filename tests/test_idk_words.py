"""A non-ASCII IDK word (``Erreur``, ``错误``) and questions in other languages, end to end:
the prompt says the word, and the filter drops exactly the chunks that answer it, also
when the word is several tokens whose first one starts ordinary answers too.

The model is scripted (an ``Engine`` over a real tokenizer whose next token is a rule:
the fact's value if the chunk holds the asked key, else the IDK word), because the
shipped model only ever learnt to say ``Error``; everything else (the prompt, chunking,
scoring, the filter, the answer) is the library's own path. IDK chunks are made
*surer* than the chunk with the answer, so a filter that misses them picks one.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pytest
import torch

import oprm_rag
from oprm_rag import OPRMSelector, PromptTemplate
from oprm_rag.decoding.config import Generation
from oprm_rag.decoding.stream import BaseTextStream
from oprm_rag.engine.base import ChunkSize, Engine, EngineInfo, Extension, StatefulEngine
from oprm_rag.scoring import IdkTokens, confirm_idk, first_token_stats, idk_token_ids


def _shipped_tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(oprm_rag.DEMO_MODEL)


def _tiny_tokenizer() -> Any:
    from oprm_rag.testing import tiny_tokenizer

    return tiny_tokenizer()


TOKENIZERS = {"shipped": _shipped_tokenizer, "tiny-bpe": _tiny_tokenizer}

_FACT = re.compile(r"The code of (\S+) is (.+?)\.")


class _Stream(BaseTextStream):
    def __init__(self, engine: "Scripted", history: tuple[int, ...], max_new: int) -> None:
        self.engine, self.history, self.max_new = engine, history, max_new
        self.result = Generation(text="")

    def _pieces(self) -> Iterator[str]:
        ids: list[int] = []
        state = [self.history]
        for _ in range(self.max_new):
            nxt = int(self.engine._logits(state)[0].argmax())
            if nxt == self.engine.eos:
                break
            ids.append(nxt)
            state = [state[0] + (nxt,)]
            self.result = Generation(text=self.engine.decode(ids), token_ids=list(ids))
            yield self.engine.decode([nxt])
        self.result = Generation(text=self.engine.decode(ids), token_ids=list(ids), finish_reason="eos")


class Scripted(Engine, StatefulEngine):
    """Answers "What is the code of KEY?" (or its translation) with the chunk's value for
    KEY, else with the IDK word; IDK answers are scored surer than real ones. Its states
    (the token histories) live in this process."""

    state_nbytes = 8

    def document_cache(self) -> Any:
        raise NotImplementedError("the tests run with cache=False")

    def remember(self, *args: Any, **kwargs: Any) -> None:
        return None

    def has_prefix(self, prefix_ids: Sequence[int]) -> bool:
        return False

    def __init__(self, tokenizer: Any, idk_word: str, question_marker: str = "Answer:") -> None:
        self.tok, self.idk_word, self.marker = tokenizer, idk_word, question_marker
        self.eos = int(tokenizer.eos_token_id)
        self.calls = 0

    def describe(self) -> EngineInfo:
        prompt = PromptTemplate(instruction="Text ({idk} if absent):\n", idk_word=self.idk_word,
                                question_template="\n\nQuestion: {question}\nAnswer:")
        return EngineInfo(name="scripted", identity="scripted", prompt=prompt, auto_chunk=ChunkSize(40, "test"),
                          vocab_size=len(self.tok), can_pad=True, family="scripted")

    def encode_with_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return np.asarray(enc["input_ids"], dtype=np.int64), np.asarray(enc["offset_mapping"], dtype=np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def _target(self, text: str) -> tuple[list[int], bool] | None:
        if self.marker not in text:
            return None
        before, answered = text.rsplit(self.marker, 1)
        question = before.rsplit("Question:", 1)[-1]
        facts = dict(_FACT.findall(before.rsplit("Question:", 1)[0]))
        key = next((k for k in facts if k in question), None)
        target = " " + (facts[key] if key else self.idk_word)
        return [int(i) for i in self.tok(target, add_special_tokens=False)["input_ids"]], key is None

    def _logits(self, histories: Sequence[tuple[int, ...]]) -> torch.Tensor:
        out = torch.zeros(len(histories), len(self.tok))
        for r, h in enumerate(histories):
            text = self.decode(h)
            found = self._target(text)
            if found is None:
                out[r, self.eos] = 1.0  # not asked yet: any next token
                continue
            target, idk = found
            n_answer = next(n for n in range(len(h)) if self.decode(h[:len(h) - n]).endswith(self.marker))
            nxt = target[n_answer] if n_answer < len(target) else self.eos
            out[r, nxt] = 20.0 if idk else 8.0
        return out

    def extend(self, states: Any, rows: Sequence[Sequence[int]], *, logits: str = "last") -> Extension:
        self.calls += 1
        base = [()] if states is None else list(states)
        if len(base) == 1 and len(rows) > 1:
            base = base * len(rows)
        hist = [tuple(b) + tuple(int(i) for i in r) for b, r in zip(base, rows)]
        return Extension(states=hist, logits=None if logits == "none" else self._logits(hist))

    def first_tokens(self, extension: Extension, idk_ids: frozenset[int]) -> Any:
        return first_token_stats(extension.logits, idk_ids)

    def select_states(self, states: Any, rows: Sequence[int] | int) -> Any:
        return [states[rows]] if isinstance(rows, int) else [states[r] for r in rows]

    def cat_states(self, states: Sequence[Any]) -> Any:
        return [h for batch in states for h in batch]

    def stream(self, state: Any, logits: Any, config: Any, *, prompt_tokens: int = 0) -> BaseTextStream:
        return _Stream(self, tuple(state[0]), config.max_new_tokens)


def _document(answer_key: str, value: str) -> str:
    filler = "The river runs past the old mill and the bridge. " * 3
    others = [f"The code of {k} is {v}." for k, v in (("alpha", "1111"), ("omega", "2222"), ("delta", "3333"))]
    return " ".join([filler, others[0], filler, others[1], filler, f"The code of {answer_key} is {value}.", filler,
                     others[2], filler])


CASES = [  # (IDK word, question, the key's value: starts like the IDK word in most tokenizers)
    ("Erreur", "What is the code of kappa?", "Eiffel"),
    ("错误", "kappa 的代码是什么？", "镇江"),        # 镇 and 错 share their first UTF-8 byte (0xE9)
    ("Ошибка", "Какой код у kappa?", "Омск"),       # О and О-words: the same first letter
    ("Error", "What is the code of kappa?", "Errand"),
]


@pytest.mark.parametrize("tokenizer", list(TOKENIZERS))
@pytest.mark.parametrize("idk_word, question, value", CASES)
def test_the_filter_drops_idk_chunks_and_keeps_the_answer(tokenizer, idk_word, question, value) -> None:
    tok = TOKENIZERS[tokenizer]()
    engine = Scripted(tok, idk_word)
    sel = OPRMSelector(engine, cache=False)
    assert idk_word in sel.prompt_text(question, "chunk")  # the prompt names the word
    doc = _document("kappa", value)
    res = sel.select(question, doc)
    assert len(res.chunks) >= 3
    holds = [c for c in res.chunks if f"kappa is {value}" in doc[c.char_start:c.char_end]]
    assert holds and all(not c.is_idk for c in holds)
    assert all(c.is_idk for c in res.chunks if "kappa" not in doc[c.char_start:c.char_end])
    assert res.best is not None and f"kappa is {value}" in doc[res.best.char_start:res.best.char_end]
    answer = sel.answer(question, doc, max_new_tokens=12)
    assert answer.text.strip() == value
    # a key no chunk holds: every chunk is IDK, and the answer is the IDK word itself
    absent = sel.answer(question.replace("kappa", "sigma"), doc, max_new_tokens=12)
    assert absent.text.strip() == idk_word and absent.no_answer_reason is not None


@pytest.mark.parametrize("tokenizer", list(TOKENIZERS))
def test_several_token_words_are_known_as_such(tokenizer) -> None:
    tok = TOKENIZERS[tokenizer]()
    for word in ("Erreur", "错误", "Ошибка"):
        ids = idk_token_ids(tok, word)
        assert isinstance(ids, IdkTokens) and ids.word == word
        n = len(tok(word, add_special_tokens=False)["input_ids"])
        assert ids.several_tokens == (n > 1 or len(tok(" " + word, add_special_tokens=False)["input_ids"]) > 1)
    one = idk_token_ids(_shipped_tokenizer(), "Error")  # the shipped word: one token, no extra model calls
    assert not one.several_tokens


def test_one_token_words_cost_no_model_call() -> None:
    tok = _shipped_tokenizer()
    engine = Scripted(tok, "Error")
    ids = idk_token_ids(tok, "Error")
    ext = engine.extend(None, [tok("x Answer:", add_special_tokens=False)["input_ids"]])
    engine.calls = 0
    first = engine.first_tokens(ext, ids)
    assert confirm_idk(engine, ext, first, ids) == [True] and engine.calls == 0


def test_an_idk_word_typed_in_nfd_or_with_spaces_matches_the_answers() -> None:
    import unicodedata

    word = "Désolé"
    engine = Scripted(_shipped_tokenizer(), word)  # a model answers in NFC, as decoders produce
    sel = OPRMSelector(engine, cache=False, idk_word=" " + unicodedata.normalize("NFD", word) + " ")
    assert sel.prompt.idk_word == word
    doc = _document("kappa", "4321")
    res = sel.select("What is the code of kappa?", doc)
    assert all(c.is_idk for c in res.chunks if "kappa" not in doc[c.char_start:c.char_end])
    assert res.best is not None and "kappa is 4321" in doc[res.best.char_start:res.best.char_end]
