"""Issue 16 (engine side): no silent wrong answer from non-finite logits, IDK words that
work on any tokenizer, options checked at construction, honest usage on the replay path."""

from __future__ import annotations

import logging

import pytest
import torch

from oprm_rag import OPRMSelector, PromptTemplate, RecurrentLM, SelectorOptions
from oprm_rag.decoding.loop import Decoder
from oprm_rag.errors import InputError, NonFiniteScoresError, OptionError
from oprm_rag.decoding.config import GenerationConfig
from oprm_rag.scoring import first_token_stats, idk_token_ids
from oprm_rag import resolve

QUESTION = "What is the code of alpha?"
CLEAN = "The code of alpha is 1234. Mamba models keep a fixed size state. " * 3
POISON = "Summarize the text above. " * 4


def _poisoned(model_dir) -> RecurrentLM:
    """A fresh tiny Mamba-2 whose hidden state turns NaN at the tokens only ``POISON`` uses:
    a chunk that holds them overflows, as a float16 model does on a bad input. (A hook on
    the embedding's output, not the weights: the output head is tied to them.)"""
    lm = RecurrentLM.from_pretrained(model_dir("mamba2"), dtype=torch.float32)
    elsewhere = set(lm.encode(CLEAN + CLEAN.replace("1234", "5678")))
    elsewhere |= set(lm.encode(OPRMSelector(lm).prompt_text(QUESTION, "")))
    own = torch.tensor(sorted(set(lm.encode(POISON)) - elsewhere))
    assert len(own), "the poison text needs tokens of its own"

    def overflow(module, inputs, output):
        return output.masked_fill(torch.isin(inputs[0], own)[..., None], float("nan"))

    lm.model.get_input_embeddings().register_forward_hook(overflow)
    return lm


def test_first_token_stats_flags_non_finite_rows() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0], [float("nan")] * 3, [float("inf"), 0.0, 0.0],
                           [float("-inf")] * 3, [0.0, float("-inf"), 1.0]])
    stats = first_token_stats(logits, idk_ids=[2])
    assert stats.finite == [True, False, False, False, True]
    assert stats.top_id[1] == stats.top_id[2] == stats.top_id[3] == -1
    assert all(e != e for e in stats.entropy[1:4])  # NaN, never a winning -0.0
    assert stats.entropy[4] > 0 and stats.idk_prob[4] == pytest.approx(torch.softmax(logits[4], -1)[2].item())


def test_a_non_finite_chunk_never_wins(model_dir, caplog) -> None:
    lm = _poisoned(model_dir)
    docs = [CLEAN, POISON, CLEAN.replace("1234", "5678")]
    sel = OPRMSelector(lm, chunk_tokens=40, idk_filter=False, cache=False)
    with caplog.at_level(logging.WARNING, logger="oprm_rag"):
        res = sel.select(QUESTION, docs)
    bad = [c for c in res.chunks if not c.finite]
    assert bad and all(c.doc_index == 1 and c.dropped_by == "nonfinite" and not c.selected for c in bad)
    assert res.best is not None and res.best.finite and res.best.doc_index != 1
    assert "NaN or infinite" in caplog.text
    assert res.to_dict()["chunks"][bad[0].index + len([c for c in res.chunks if c.doc_index == 0])]["entropy"] \
        is None  # JSON-safe: NaN goes out as null


def test_every_chunk_non_finite_is_an_error_that_names_the_dtype(model_dir) -> None:
    lm = _poisoned(model_dir)
    sel = OPRMSelector(lm, chunk_tokens=None, cache=False, fallback="min_entropy")
    with pytest.raises(NonFiniteScoresError, match="float32 or bfloat16"):
        sel.select(QUESTION, POISON + CLEAN)


def test_decoding_stops_when_logits_turn_non_finite(load_lm) -> None:
    lm = load_lm("mamba2")
    out = lm.prefill(lm.encode("The code of alpha is"))
    bad = torch.full_like(out.logits, float("nan"))
    with pytest.raises(NonFiniteScoresError, match="decoding step 0"):
        Decoder(lm, out.state, bad, GenerationConfig(max_new_tokens=4)).run()


def test_idk_word_with_a_partial_utf8_first_token(load_lm) -> None:
    tok = load_lm("mamba2").tokenizer  # byte-level BPE trained on English: Chinese is raw bytes
    word = "错误"
    ids = idk_token_ids(tok, word)
    first = tok(word, add_special_tokens=False)["input_ids"][0]
    assert tok.decode([first]).strip() == "\ufffd" and first in ids


def test_idk_word_on_an_uncased_tokenizer() -> None:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    raw.normalizer = normalizers.Lowercase()
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(["error code text answer the of is"] * 5,
                            trainers.WordPieceTrainer(vocab_size=60, special_tokens=["[UNK]"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")
    ids = idk_token_ids(tok, "Error")
    assert tok.convert_ids_to_tokens(sorted(ids)) == ["error"]


def test_custom_idk_word_must_agree_with_the_prompt(load_lm) -> None:
    lm = load_lm("mamba2")
    literal = PromptTemplate(instruction="Answer from the text, or say Error.\n", question_template="\nQ: {question}",
                             idk_word="Error")
    with pytest.raises(OptionError, match="no \\{idk\\} field"):
        OPRMSelector(lm, prompt=literal, idk_word="Unknown", chunk_tokens=32)
    with_field = PromptTemplate(instruction="Answer, or say {idk}.\n", question_template="\nQ: {question}")
    sel = OPRMSelector(lm, prompt=with_field, idk_word="Unknown", chunk_tokens=32)
    assert "say Unknown." in sel.prompt_text(QUESTION, "text")


def test_a_threshold_that_removes_every_chunk_is_not_called_all_idk(load_lm) -> None:
    sel = OPRMSelector(load_lm("mamba2"), chunk_tokens=24, entropy_threshold=-1.0, cache=False)
    res = sel.select(QUESTION, "The code of alpha is 1234. Mamba models keep a fixed size state. " * 4)
    assert res.best is None and not res.all_idk and "entropy threshold" in res.no_answer_reason
    ans = sel.answer_from(res)
    assert ans.text == res.idk_word and ans.no_answer_reason == res.no_answer_reason and not ans.all_idk


def test_idk_threshold_drops_chunks_by_their_idk_probability(load_lm) -> None:
    lm = load_lm("mamba2")
    text = "The code of alpha is 1234. Mamba models keep a fixed size state. " * 4
    base = OPRMSelector(lm, chunk_tokens=24, idk_filter=False, cache=False).select(QUESTION, text)
    cut = sorted(c.idk_prob for c in base.chunks)[len(base.chunks) // 2]
    res = OPRMSelector(lm, chunk_tokens=24, idk_filter=False, idk_threshold=cut, cache=False).select(QUESTION, text)
    for c in res.chunks:
        assert (c.dropped_by == "idk_threshold") == (c.idk_prob > cut)


@pytest.mark.parametrize("kwargs, match", [
    ({"chunk_tokens": 32, "chunk_overlap": 32}, "smaller than chunk_tokens"),
    ({"chunk_overlap": 10_000}, "smaller than the chunk length"),  # "auto" resolves, then is checked
    ({"top_k": 2.5}, "top_k must be an int"),
    ({"top_k": 2.0}, "top_k must be an int"),
    ({"chunk_tokens": "512"}, "chunk_tokens must be an int"),
    ({"boundary": "page"}, "boundary must be one of"),
    ({"idk_threshold": 1.5}, "idk_threshold must be <= 1"),
    ({"entropy_threshold": float("nan")}, "must be finite"),
    ({"max_new_tokens": 5}, "generation option"),
    ({"chunk_tokns": 5}, "did you mean 'chunk_tokens'"),
])
def test_options_are_checked_at_construction(load_lm, kwargs, match) -> None:
    with pytest.raises(OptionError, match=match):
        OPRMSelector(load_lm("mamba2"), **kwargs)


def test_selection_and_sampling_top_k_never_share_a_path(load_lm) -> None:
    sel = OPRMSelector(load_lm("mamba2"), chunk_tokens=32, cache=False)
    with pytest.raises(OptionError, match="top_k selects chunks"):
        sel.answer(QUESTION, "The code of alpha is 1234.", top_k=3)
    with pytest.raises(OptionError, match="max_new_tokens must be a whole number"):
        sel.answer(QUESTION, "The code of alpha is 1234.", max_new_tokens="5")
    ans = sel.answer(QUESTION, "The code of alpha is 1234.", max_new_tokens=3, temperature=1.0, sample_top_k=2,
                     seed=1)
    assert ans.usage.output_tokens <= 3


@pytest.mark.parametrize("where", ["question", "document"])
def test_lone_surrogates_are_an_input_error(load_lm, where) -> None:
    sel = OPRMSelector(load_lm("mamba2"), chunk_tokens=32, cache=False)
    bad = "text \ud800 here"
    with pytest.raises(InputError, match="lone surrogate"):
        sel.select(bad if where == "question" else QUESTION, "fine text" if where == "question" else bad)


def test_replay_usage_counts_no_cached_chunks_on_a_first_call(load_lm) -> None:
    sel = OPRMSelector(load_lm("mistral_swa"), chunk_tokens=24)  # sliding-window attention: replay
    res = sel.select(QUESTION, "The code of alpha is 1234. Mamba models keep a fixed size state. " * 4)
    assert res.usage.chunks > 1 and res.usage.cached_chunks == 0
    assert res.usage.input_tokens == res.usage.nominal_input_tokens  # replay runs every [P, C, Q] in full


def test_resolved_chunk_size_and_reason_are_reported(load_lm) -> None:
    lm = load_lm("mamba2")
    res = OPRMSelector(lm).select(QUESTION, "The code of alpha is 1234.")
    assert res.usage.chunk_tokens == OPRMSelector(lm).chunk_tokens and res.usage.chunk_tokens_reason.startswith("auto")
    assert SelectorOptions().chunk_tokens == "auto"
    plain = OPRMSelector(lm, chunk_tokens=None).select(QUESTION, "The code of alpha is 1234.")
    assert plain.usage.chunk_tokens is None and "plain inference" in plain.usage.chunk_tokens_reason


def test_the_tokenisation_memo_returns_what_the_tokenizer_does_and_stays_bounded(load_lm, monkeypatch):
    """A follow-up reuses the document's tokenisation (kept compact, int32), returns int64
    copies equal to a fresh tokenisation, and a document over a quarter of the budget is
    tokenised each time instead of kept."""
    import numpy as np

    from oprm_rag.engine import local as ctx_mod

    lm = load_lm("mamba2")
    ctx = resolve(lm)
    ctx.forget()
    calls = []
    real = lm.encode_with_offsets
    monkeypatch.setattr(lm, "encode_with_offsets", lambda text: calls.append(len(text)) or real(text))
    text = "The code of abcd is 1234. " * 200
    fresh_ids, fresh_offsets = real(text)
    for _ in range(2):
        ids, offsets = ctx.encode_with_offsets(text)
        assert ids.dtype == np.int64 and offsets.dtype == np.int64
        assert np.array_equal(ids, fresh_ids) and np.array_equal(offsets, fresh_offsets)
        ids[:] = -1  # the caller's copy: the memo is unchanged
    assert len(calls) == 1
    (kept_ids, kept_offsets), = ctx._encoded.values()
    assert kept_ids.dtype == np.int32 and kept_offsets.dtype == np.int32  # 12 bytes a token, not 24
    assert ctx._encoded_bytes == 12 * fresh_ids.size
    monkeypatch.setattr(ctx_mod, "_ENCODED_MAX_BYTES", (fresh_ids.size + fresh_offsets.size) * 4 * 4 - 4)
    ctx.forget()
    calls.clear()
    ctx.encode_with_offsets(text)
    ctx.encode_with_offsets(text)
    assert len(calls) == 2  # too big for the memo: not kept
