"""Incremental detokenisation equals re-decoding the whole answer, token by token.

The reference is :class:`TextAssembler`, which decodes every prefix in full: the
incremental assembler must give the same text after every token, the same pieces, and
the same stop-string behaviour, on byte-level BPE, SentencePiece-style (Metaspace with
byte fallback) and WordPiece tokenizers, over random token sequences (partial UTF-8,
special tokens, word pieces in any order) and real multilingual text.
"""

from __future__ import annotations

import random

import pytest

from oprm_rag.decoding.text import IncrementalTextAssembler
from oprm_rag.decoding.text import TextAssembler

TEXT = ("The code of beacux is 4362. Ünïcödé: naïve café, 中文字符, emoji 🙂🚀, Ελληνικά, русский. "
        "Don't stop -- 12,345.67 tokens? Yes! (maybe) [x] {y} \"quoted\" 'single' tab\tnew\nline. ") * 3


def _byte_level():
    from oprm_rag.testing import tiny_tokenizer

    return tiny_tokenizer()


def _metaspace():
    """Llama-like: Metaspace pre-tokenizer, BPE with byte fallback, the matching decoder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator([TEXT.replace("🙂", "").replace("🚀", "")] * 5, trainer=trainer)
    tok.add_tokens([f"<0x{i:02X}>" for i in range(256)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _wordpiece():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]", "[CLS]", "[SEP]", "[PAD]"],
                                        show_progress=False)
    tok.train_from_iterator([TEXT] * 5, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   clean_up_tokenization_spaces=False)


def _wordpiece_cleanup():
    """transformers' string-wide clean-up on (" ' " -> "'", " n't" -> "n't" across tokens)."""
    tok = _wordpiece()
    tok.clean_up_tokenization_spaces = True
    return tok


TOKENIZERS = {"byte_level_bpe": _byte_level, "metaspace_byte_fallback": _metaspace, "wordpiece": _wordpiece,
              "wordpiece_cleanup": _wordpiece_cleanup}


@pytest.fixture(scope="module", params=sorted(TOKENIZERS))
def tokenizer(request):
    return TOKENIZERS[request.param]()


def _run(asm, ids):
    pieces, texts = [], []
    for tid in ids:
        pieces.append(asm.add(tid))
        texts.append(asm.text)
        if asm.stopped:
            break
    pieces.append(asm.finish())
    return pieces, texts, asm.text, asm.stopped


def _sequences(tokenizer, count=40, length=48, seed=0):
    rng = random.Random(seed)
    vocab = len(tokenizer)
    real = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    seqs = [real[:120], real[37:90]]
    for _ in range(count):  # random ids: partial UTF-8, specials, pieces in any order
        seqs.append([rng.randrange(vocab) for _ in range(rng.randrange(1, length))])
    for _ in range(count // 2):  # stretches of real text with random tokens spliced in
        start = rng.randrange(len(real) - 30)
        seq = real[start:start + 30]
        for _ in range(3):
            seq.insert(rng.randrange(len(seq)), rng.randrange(vocab))
        seqs.append(seq)
    return seqs


@pytest.mark.parametrize("commit_every", [1, 4])
def test_incremental_text_equals_full_decoding_after_every_token(tokenizer, commit_every):
    for ids in _sequences(tokenizer):
        ref = _run(TextAssembler(tokenizer), ids)
        got = _run(IncrementalTextAssembler(tokenizer, commit_every=commit_every), ids)
        assert got == ref, ids
        # The pieces add up to the text wherever full re-decoding manages it (not always:
        # a shown " '" that string-wide clean-up later joins, or a byte-fallback run that
        # later turns out invalid, cannot be taken back by either assembler).
        if "".join(ref[0]) == ref[2]:
            assert "".join(got[0]) == got[2]


def test_stop_strings_behave_as_with_full_decoding(tokenizer):
    real = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    decoded = tokenizer.decode(real, skip_special_tokens=True)
    for stop in (("4362",), ("café", "zzz"), ("\n",), ("ing.", "never there"), (decoded[40:52],)):
        ref = _run(TextAssembler(tokenizer, stop), real)
        got = _run(IncrementalTextAssembler(tokenizer, stop), real)
        assert got == ref, stop
    for ids in _sequences(tokenizer, count=10, seed=3):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if len(text) > 6:
            stop = (text[len(text) // 2:len(text) // 2 + 3],)
            assert _run(IncrementalTextAssembler(tokenizer, stop), ids) == _run(TextAssembler(tokenizer, stop), ids)


def test_long_byte_fallback_runs_that_turn_invalid(tokenizer):
    """A run of byte tokens decodes as a whole: valid bytes shown as text turn into U+FFFD
    once an invalid byte joins the run. The window must notice, however long the run."""
    vocab = tokenizer.get_vocab()
    if "<0x41>" not in vocab:
        pytest.skip("no byte-fallback tokens in this tokenizer")
    run = [vocab[f"<0x{0x41 + i:02X}>"] for i in range(14)]
    word = tokenizer("code", add_special_tokens=False)["input_ids"]
    for ids in (run + [vocab["<0xE4>"]] + word, word + run + [vocab["<0xE4>"], vocab["<0xB8>"], vocab["<0xAD>"]] + word,
                run + word + run[:3] + [vocab["<0xFF>"]]):
        assert _run(IncrementalTextAssembler(tokenizer), ids)[1:] == _run(TextAssembler(tokenizer), ids)[1:]


def test_work_per_token_stays_bounded(tokenizer):
    """Each add decodes a window, not the answer: the ids it decodes stay short."""
    decoded_lengths = []

    class Counting:
        def __init__(self, inner):
            self.inner = inner

        def decode(self, ids, **kwargs):
            decoded_lengths.append(len(ids))
            return self.inner.decode(ids, **kwargs)

    real = tokenizer(TEXT, add_special_tokens=False)["input_ids"][:200]
    asm = IncrementalTextAssembler(Counting(tokenizer), commit_every=4)
    for tid in real:
        asm.add(tid)
    assert asm.text == tokenizer.decode(real, skip_special_tokens=True)
    if getattr(tokenizer, "clean_up_tokenization_spaces", False):
        # string-wide clean-up (" ' " -> "'") now and then rewrites the window's context: a
        # full decoding then, rarely
        assert asm.full_decodes <= len(real) // 20
        return
    assert asm.full_decodes == 0
    assert max(decoded_lengths) <= 16  # context and new tokens, plus a few bytes of an unfinished character


def test_a_context_that_decodes_differently_falls_back_to_a_full_decoding():
    """A decoder whose output for earlier tokens depends on later ones is caught."""

    class Reversing:  # decodes to the reversed concatenation: nothing is local
        def decode(self, ids, **kwargs):
            return "".join(chr(97 + i % 26) for i in ids)[::-1]

    ids = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7]
    asm = IncrementalTextAssembler(Reversing(), commit_every=2, context_tokens=2)
    for k, tid in enumerate(ids, 1):
        asm.add(tid)
        assert asm.text == Reversing().decode(ids[:k])
    assert asm.full_decodes > 0


def test_commit_every_must_be_positive():
    with pytest.raises(ValueError):
        IncrementalTextAssembler(_byte_level(), commit_every=0)
    with pytest.raises(ValueError):
        IncrementalTextAssembler(_byte_level(), context_tokens=0)


def test_the_shipped_tokenizer_streams_a_long_answer_exactly(demo_lm):
    ids = demo_lm.encode(TEXT * 4)[:1500]
    assert _run(IncrementalTextAssembler(demo_lm.tokenizer), ids) == _run(TextAssembler(demo_lm.tokenizer), ids)
