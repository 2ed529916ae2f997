"""The served engine's failure modes and protocol dialects, against a fake server on 127.0.0.1.

Each failure must raise its own ``ServerError`` subclass with a message that says what
to do, and must never leave a partial selection behind.
"""

from __future__ import annotations

import math
import socket

import numpy as np
import pytest

import oprm_rag
from oprm_rag import OPRMSelector
from oprm_rag.errors import OptionError, ServerError
from oprm_rag.served import OpenAICompatibleLM
from oprm_rag.served.client import ServedClient
from oprm_rag.served.errors import (
    ContextOverflowError,
    ModelNotFoundError,
    NoLogprobsError,
    ServerResponseError,
    ServerTimeoutError,
    ServerUnavailableError,
    TokenIdsRejectedError,
)

from .fake_server import Behaviour, FakeServer, distribution

DOC = " ".join(f"The code of key{i} is {1000 + i}. Some filler words follow here." for i in range(12))


def _engine(server: FakeServer, **kw) -> OpenAICompatibleLM:
    kw.setdefault("tokenizer", oprm_rag.DEMO_MODEL)
    kw.setdefault("max_retries", 0)
    return OpenAICompatibleLM(server.base_url, kw.pop("model", "fake"), **kw)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_connection_refused_is_specific() -> None:
    lm = OpenAICompatibleLM(f"http://127.0.0.1:{_closed_port()}/v1", "m", tokenizer=oprm_rag.DEMO_MODEL,
                            max_retries=0, timeout=5)
    with pytest.raises(ServerUnavailableError, match="cannot reach .*is the server running"):
        OPRMSelector(lm, chunk_tokens=64).select("What is the code of key3?", DOC)
    assert issubclass(ServerUnavailableError, ServerError)


def test_wrong_model_name_lists_the_served_ones() -> None:
    with FakeServer(Behaviour(models=("alpha", "beta"))) as srv:
        lm = _engine(srv, model="gamma")
        with pytest.raises(ModelNotFoundError, match=r"does not serve model 'gamma'.*\['alpha', 'beta'\]"):
            OPRMSelector(lm, chunk_tokens=64).select("What is the code of key3?", DOC)
        assert srv.requests == []  # refused before any scoring request
        # with no name, the only served model is taken; with two, the user must choose
        with pytest.raises(ModelNotFoundError, match="pass model="):
            ServedClient(srv.base_url, None, max_retries=0).check_model()
    with FakeServer(Behaviour(models=("only",))) as srv:
        assert ServedClient(srv.base_url, None, max_retries=0).check_model() == "only"


def test_no_logprobs_is_refused_not_guessed() -> None:
    with FakeServer(Behaviour(logprobs=False)) as srv:
        with pytest.raises(NoLogprobsError, match="no log-probabilities.*--max-logprobs"):
            OPRMSelector(_engine(srv), chunk_tokens=64).select("What is the code of key3?", DOC)


def test_token_ids_rejected_fails_clearly_or_falls_back_to_text() -> None:
    with FakeServer(Behaviour(accept_ids=False)) as srv:
        with pytest.raises(TokenIdsRejectedError, match="refuses prompts given as token ids.*prompt_format='auto'"):
            OPRMSelector(_engine(srv, prompt_format="ids"), chunk_tokens=64).select("What is the code of key3?", DOC)
    with FakeServer(Behaviour(accept_ids=False)) as srv:
        lm = _engine(srv, prompt_format="auto")
        res = OPRMSelector(lm, chunk_tokens=64).select("What is the code of key3?", DOC)
        assert res.usage.token_counting == "approximate"  # the result says its boundaries are approximate
        sent = [r["prompt"] for r in srv.requests]
        assert isinstance(sent[0], list) and all(isinstance(p, str) for p in sent[1:])
        assert all("Question: What is the code of key3?" in p for p in sent[1:])
        assert len(res.chunks) > 1 and res.best is not None


def test_context_overflow_names_the_fix() -> None:
    with FakeServer(Behaviour(context=100)) as srv:
        with pytest.raises(ContextOverflowError, match="smaller chunk_tokens"):
            OPRMSelector(_engine(srv), chunk_tokens=90).select("What is the code of key3?", DOC)


def test_timeout_mid_batch_abandons_the_whole_selection() -> None:
    with FakeServer(Behaviour(slow_requests={3}, hang_seconds=3.0)) as srv:
        lm = _engine(srv, timeout=0.5, max_concurrency=2)
        sel = OPRMSelector(lm, chunk_tokens=48)
        with pytest.raises(ServerTimeoutError, match=r"within 0.5 s.*of \d+ scoring requests had finished.*nothing "
                                                      r"was selected"):
            sel.select("What is the code of key3?", DOC)


def test_rate_limits_are_retried_with_backoff() -> None:
    with FakeServer(Behaviour(rate_limited=2)) as srv:
        lm = _engine(srv, max_retries=3, max_concurrency=1)
        ft = lm.first_tokens(lm.extend(lm.start([5, 6]).states, [[7, 8]]), frozenset())
        assert len(srv.requests) == 3  # two 429s, then the answer
        p = distribution([5, 6, 7, 8], 3072)
        assert ft.top_id == [int(np.argmax(p))]
    with FakeServer(Behaviour(rate_limited=10)) as srv:
        lm = _engine(srv, max_retries=1)
        with pytest.raises(ServerResponseError, match="HTTP 429"):
            lm.extend(lm.start([5]).states, [[7]])
        assert len(srv.requests) == 2


def test_whole_vocabulary_gives_exact_entropy() -> None:
    with FakeServer() as srv:
        lm = _engine(srv)
        ext = lm.extend(lm.start([1, 2, 3]).states, [[4, 5], [6]])
        ft = lm.first_tokens(ext, frozenset({9}))
        assert ft.exact and ft.entropy_bounds is None
        for row, prompt in enumerate(([1, 2, 3, 4, 5], [1, 2, 3, 6])):
            p = distribution(prompt, 3072)
            assert ft.entropy[row] == pytest.approx(float(-(p * np.log(p)).sum()), abs=1e-6)
            assert ft.top_id[row] == int(np.argmax(p))
            assert ft.idk_prob[row] == pytest.approx(float(p[9]), rel=1e-6)
        assert srv.requests[0]["n_probs"] == 3072 and srv.requests[0]["max_tokens"] == 1


def test_vllm_dialect_and_its_logprob_limit() -> None:
    """vLLM: ``logprobs=k`` capped by --max-logprobs (learnt from the refusal), keys ``token_id:N``."""
    with FakeServer(Behaviour(dialect="vllm", max_logprobs=20)) as srv:
        lm = _engine(srv, top_logprobs=1000)
        ft = lm.first_tokens(lm.extend(lm.start([1, 2]).states, [[3], [4]]), frozenset())
        assert lm.client.max_top_logprobs == 20
        assert not ft.exact and ft.entropy_bounds is not None
        for row, prompt in enumerate(([1, 2, 3], [1, 2, 4])):
            p = distribution(prompt, 3072)
            true = float(-(p * np.log(p)).sum())
            low, high = ft.row_bounds(row)
            assert low <= true <= high
            assert ft.top_id[row] == int(np.argmax(p))
        res = OPRMSelector(lm, chunk_tokens=64).select("What is the code of key3?", DOC)
        assert res.usage.entropy_exact is False
        assert all(c.entropy_bounds is not None for c in res.chunks)


def test_concurrency_is_bounded() -> None:
    with FakeServer(Behaviour(delay=0.05)) as srv:
        lm = _engine(srv, max_concurrency=3)
        lm.extend(lm.start([1]).states, [[i + 2] for i in range(12)])
        assert srv.max_in_flight == 3


async def test_async_scoring_is_bounded_and_matches() -> None:
    with FakeServer(Behaviour(delay=0.05)) as srv:
        client = ServedClient(srv.base_url, "fake", max_retries=0, max_concurrency=2)
        prompts = [[1, i] for i in range(6)]
        out = await client.ascore_many(prompts, 5)
        assert srv.max_in_flight <= 2
        for prompt, s in zip(prompts, out):
            p = distribution(prompt, 3072)
            assert s.top.ids[0] == int(np.argmax(p))
            assert s.top.logprobs[0] == pytest.approx(math.log(p.max()), abs=1e-9)
        pieces = [x async for x in client.astream([1, 2], oprm_rag.decoding.config.GenerationConfig(max_new_tokens=3))]
        assert "".join(pieces) == "w0 w1 w2 "


def test_streamed_answer_and_summary_over_a_server() -> None:
    with FakeServer() as srv:
        lm = _engine(srv)
        sel = OPRMSelector(lm, chunk_tokens=64)
        ans = sel.answer("What is the code of key3?", DOC, max_new_tokens=4)
        assert ans.text == "w0 w1 w2 w3 " and ans.usage.output_tokens == 4
        last = srv.requests[-1]
        assert last["stream"] is True and isinstance(last["prompt"], list)
        question_ids = sel._question_ids("What is the code of key3?")
        assert last["prompt"] == sel._prefix_ids() + ans.chunk.chunk.ids + question_ids
        summary = sel.summarize(DOC, max_new_tokens=2)
        assert summary.parts and all(p == "ok ok" for p in summary.parts)


def test_no_tokenizer_and_no_tokenize_endpoint_counts_approximately() -> None:
    with FakeServer(Behaviour(tokenize=False)) as srv:
        lm = OpenAICompatibleLM(srv.base_url, "fake", max_retries=0)
        res = OPRMSelector(lm, chunk_tokens=32).select("What is the code of key3?", DOC)
        assert lm.token_counting == "approximate" and res.usage.token_counting == "approximate"
        assert all(isinstance(r["prompt"], str) for r in srv.requests)  # tiktoken ids mean nothing to the model
        assert "".join(c.text for c in sorted(res.chunks, key=lambda c: c.token_start)) == DOC
        assert res.best is not None and res.best.top_token  # top tokens named by the server's text


def test_server_tokenize_is_used_without_a_local_tokenizer() -> None:
    with FakeServer() as srv:
        lm = OpenAICompatibleLM(srv.base_url, "fake", max_retries=0)
        ids, offsets = lm.encode_with_offsets("héllo")
        assert lm.token_counting == "server"
        assert ids.tolist() == [ord(c) % 3072 for c in "héllo"]
        assert offsets.tolist() == [[0, 1], [1, 2], [2, 3], [3, 4], [4, 5]]


def test_question_likelihood_and_prepare_say_what_a_server_cannot_do() -> None:
    with FakeServer() as srv:
        lm = _engine(srv)
        with pytest.raises(OptionError, match="needs every position's full logits"):
            lm.extend(lm.start([1]).states, [[2]], logits="all")
        with pytest.raises(OptionError, match="keeps no reusable states"):
            OPRMSelector(lm, chunk_tokens=64).prepare(DOC)
        with pytest.raises(OptionError):
            OpenAICompatibleLM(srv.base_url, "fake", top_logprobs=0)
        with pytest.raises(OptionError, match="http"):
            OpenAICompatibleLM("127.0.0.1:8000", "fake")
