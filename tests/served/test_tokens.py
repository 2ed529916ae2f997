"""Token sources of the served engine: local tokenizer, the server's pieces, tiktoken."""

from __future__ import annotations

import numpy as np
import pytest

import oprm_rag
from oprm_rag.errors import InputError
from oprm_rag.served.tokens import ApproximateTokens, LocalTokens, _offsets_from_pieces


def test_offsets_from_pieces_map_bytes_to_characters() -> None:
    text = "né 日本"
    raw = text.encode("utf-8")
    # a byte-level tokenizer may split a character's bytes over two tokens
    pieces = [raw[:1], raw[1:3], raw[3:4], raw[4:6], raw[6:7], raw[7:]]
    assert b"".join(pieces) == raw
    offs = _offsets_from_pieces(text, pieces).tolist()
    assert offs[0] == [0, 1] and offs[1] == [1, 2]  # "n", "é"
    assert offs[-1][1] == len(text)
    assert all(a <= b for a, b in offs) and [o[0] for o in offs] == sorted(o[0] for o in offs)


def test_offsets_from_pieces_that_do_not_spell_the_text_are_spread(caplog: pytest.LogCaptureFixture) -> None:
    offs = _offsets_from_pieces("abcdef", [b"ab", b"XX", b"ef"])
    assert offs.tolist() == [[0, 2], [2, 4], [4, 6]]
    assert "do not spell the text" in caplog.text


def test_local_tokens_equal_the_model_tokenizer(demo_lm) -> None:
    tok = LocalTokens(oprm_rag.DEMO_MODEL)
    text = "The code of zorvak is 4362.\n\nAnd then 2023 came."
    assert tok.encode(text) == demo_lm.encode(text)
    ids, offs = tok.encode_with_offsets(text)
    ref_ids, ref_offs = demo_lm.encode_with_offsets(text)
    assert np.array_equal(ids, ref_ids) and np.array_equal(offs, ref_offs)
    assert tok.counting == "exact" and tok.vocab_size == demo_lm.vocab_size
    assert LocalTokens(demo_lm.tokenizer).fingerprint == tok.fingerprint
    with pytest.raises(InputError, match="not a folder"):
        LocalTokens("/nonexistent/tokenizer")


def test_approximate_tokens_are_offline_and_cover_the_text() -> None:
    tok = ApproximateTokens()
    text = "Offline counting: naïve café, 日本語 and 12345 digits."
    ids, offs = tok.encode_with_offsets(text)
    assert tok.counting == "approximate" and not tok.model_ids
    assert tok.decode(ids.tolist()) == text
    assert offs[0, 0] == 0 and offs[-1, 1] == len(text)
    assert all(offs[i, 1] == offs[i + 1, 0] for i in range(len(offs) - 1))
