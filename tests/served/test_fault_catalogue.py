"""The fault catalogue: fake servers on 127.0.0.1 that misbehave in the ways real servers,
proxies and networks do. The served engine must never pass a broken answer off as a good
one: each case ends in a specific ``ServerError`` (or, where a case is benign, in the right
answer), never in a selection built on impossible numbers, a hang, or a bare traceback.

Cases are grouped by the class of fault, not by example: impossible log-probabilities,
choices that are not the one asked for, time, truncation, concurrency, messages, options.
"""

from __future__ import annotations

import json
import math
import threading
from typing import Any

import pytest

import oprm_rag
from oprm_rag import OPRMSelector
from oprm_rag.decoding.config import GenerationConfig
from oprm_rag.errors import InputError, OptionError, ServerError
from oprm_rag.served import OpenAICompatibleLM
from oprm_rag.served.client import ServedClient
from oprm_rag.served.errors import (
    ContextOverflowError,
    ImpossibleLogprobsError,
    IncompleteAnswerError,
    ServerResponseError,
    ServerTimeoutError,
)

from .fake_server import Behaviour, FakeServer

DOC = " ".join(f"The code of key{i} is {1000 + i}. Some filler words follow here." for i in range(12))
Q = "What is the code of key3?"


def _engine(server: FakeServer, **kw: Any) -> OpenAICompatibleLM:
    kw.setdefault("tokenizer", oprm_rag.DEMO_MODEL)
    kw.setdefault("max_retries", 0)
    return OpenAICompatibleLM(server.base_url, kw.pop("model", "fake"), **kw)


def _select(srv: FakeServer, **kw: Any) -> Any:
    return OPRMSelector(_engine(srv, **kw), chunk_tokens=64).select(Q, DOC)


# ---------------------------------------------------------------------- impossible log-probabilities
def _top(answer: dict[str, Any]) -> list[dict[str, Any]]:
    return answer["choices"][0]["logprobs"]["content"][0]["top_logprobs"]


def _positive(body: dict, answer: dict) -> dict:
    _top(answer)[0]["logprob"] = 0.7  # p = 2.0
    return answer


def _excess_mass(body: dict, answer: dict) -> dict:
    for t in _top(answer):  # every value still negative, but they sum to 1.5
        t["logprob"] += math.log(1.5)
    return answer


def _duplicate_id(body: dict, answer: dict) -> dict:
    top = _top(answer)
    top[5] = dict(top[0], logprob=top[5]["logprob"])  # the top token again, lower down
    return answer


def _id_out_of_vocab(body: dict, answer: dict) -> dict:
    _top(answer)[3]["id"] = 3072  # the vocabulary is 0..3071
    return answer


def _negative_id(body: dict, answer: dict) -> dict:
    _top(answer)[0]["id"] = -7
    return answer


def _nan(body: dict, answer: dict) -> str:
    _top(answer)[2]["logprob"] = float("nan")
    return json.dumps(answer)  # Python's json writes NaN, as some servers do


def _not_a_number(body: dict, answer: dict) -> dict:
    _top(answer)[1]["logprob"] = "-0.5"
    return answer


@pytest.mark.parametrize("rewrite, words", [
    (_positive, "log-probability of \\+0.7"),
    (_excess_mass, "sum to 1.5"),
    (_duplicate_id, "twice in one top list"),
    (_id_out_of_vocab, "outside the 3072-token vocabulary"),
    (_negative_id, "negative token id"),
    (_nan, "log-probability of nan"),
], ids=["positive", "mass-above-1", "duplicate-id", "id-out-of-vocab", "negative-id", "nan"])
def test_impossible_logprobs_are_refused_not_selected(rewrite: Any, words: str) -> None:
    with FakeServer(Behaviour(rewrite=rewrite)) as srv:
        with pytest.raises(ImpossibleLogprobsError, match=f"{srv.base_url}.*impossible log-probabilities.*{words}"):
            _select(srv)


def test_one_bad_row_of_many_refuses_the_selection() -> None:
    """Only the third chunk's answer is broken (it would have won: p = 1 on its top token);
    the selection is refused as a whole, naming the server, and nothing is selected."""
    with FakeServer(Behaviour(rewrite=_positive, rewrite_requests={3})) as srv:
        with pytest.raises(ImpossibleLogprobsError, match="impossible log-probabilities.*nothing was selected"):
            _select(srv, max_concurrency=1)
        assert len(srv.requests) >= 3


def test_unreadable_logprob_is_a_server_error() -> None:
    with FakeServer(Behaviour(rewrite=_not_a_number)) as srv:
        with pytest.raises(ServerResponseError, match="unreadable log-probabilities"):
            _select(srv)


def test_duplicate_keys_in_a_vllm_top_list_are_seen() -> None:
    """JSON objects with a key twice parse silently to the last value; the client sees them."""
    def dup(body: dict, answer: dict) -> str:
        text = json.dumps(answer)
        first = next(iter(answer["choices"][0]["logprobs"]["top_logprobs"][0]))
        return text.replace(f'"{first}": ', f'"{first}": -0.01, "{first}": ', 1)

    with FakeServer(Behaviour(dialect="vllm", rewrite=dup)) as srv:
        with pytest.raises(ImpossibleLogprobsError, match="twice in one JSON object"):
            _select(srv)


def test_a_key_twice_inside_an_entry_is_seen() -> None:
    def dup(body: dict, answer: dict) -> str:
        return json.dumps(answer).replace('{"id": ', '{"id": 7, "id": ', 3)

    with FakeServer(Behaviour(rewrite=dup)) as srv:
        with pytest.raises(ImpossibleLogprobsError, match="'id' twice in one JSON object"):
            _select(srv)


def _entry_without_logprob(body: dict, answer: dict) -> dict:
    del _top(answer)[4]["logprob"]
    return answer


def _some_ids_missing(body: dict, answer: dict) -> dict:
    del _top(answer)[4]["id"]
    return answer


@pytest.mark.parametrize("rewrite", [_entry_without_logprob, _some_ids_missing], ids=["no-logprob", "mixed-ids"])
def test_a_malformed_entry_is_not_dropped_silently(rewrite: Any) -> None:
    with FakeServer(Behaviour(rewrite=rewrite)) as srv:
        with pytest.raises(ServerResponseError, match="unreadable log-probabilities"):
            _select(srv)


def test_text_keys_the_local_tokenizer_cannot_map_are_refused() -> None:
    """A server keyed by token text ("tok17"...) whose texts are not single tokens of the
    tokenizer= the user gave: its tokens are not the model's, so no id is made up."""
    with FakeServer(Behaviour(dialect="vllm", text_keys=True)) as srv:
        with pytest.raises(ImpossibleLogprobsError, match="local tokenizer.*not one"):
            _select(srv)


# ---------------------------------------------------------------------- choices
def _choices(*indexes: int) -> Any:
    def rewrite(body: dict, answer: dict) -> dict:
        only = answer["choices"][0]
        answer["choices"] = [dict(only, index=i) for i in indexes]
        return answer
    return rewrite


@pytest.mark.parametrize("indexes", [(1,), (1, 0), (0, 0), (0, 1)], ids=["other", "reordered", "twice", "extra"])
def test_choices_must_be_exactly_the_one_asked_for(indexes: tuple[int, ...]) -> None:
    with FakeServer(Behaviour(rewrite=_choices(*indexes))) as srv:
        with pytest.raises(ServerResponseError, match="exactly one choice, index 0"):
            _select(srv)
        # summaries read completions the same way
        with pytest.raises(ServerResponseError, match="exactly one choice, index 0"):
            _engine(srv).client.complete([1, 2], GenerationConfig(max_new_tokens=2))


def test_a_choice_without_an_index_is_refused() -> None:
    def no_index(body: dict, answer: dict) -> dict:
        del answer["choices"][0]["index"]
        return answer

    with FakeServer(Behaviour(rewrite=no_index)) as srv:
        with pytest.raises(ServerResponseError, match="index"):
            _select(srv)


# ---------------------------------------------------------------------- time
def test_a_trickled_body_ends_in_a_timeout() -> None:
    """One byte every 0.4 s never trips a per-read timeout; the whole request's does."""
    with FakeServer(Behaviour(trickle=0.4)) as srv:
        with pytest.raises(ServerTimeoutError, match="within 1 s.*whole request"):
            _select(srv, timeout=1.0)


def test_trickled_headers_end_in_a_timeout() -> None:
    """The status line and then a header that never ends, a byte at a time."""
    with FakeServer(Behaviour(trickle=0.3, trickle_headers=True)) as srv:
        with pytest.raises(ServerTimeoutError, match="within 1.5 s"):
            _select(srv, timeout=1.5)


def test_a_stream_for_another_choice_is_refused() -> None:
    with FakeServer(Behaviour(stream_mode="other_index")) as srv:
        with pytest.raises(ServerResponseError, match="choice 1"):
            OPRMSelector(_engine(srv), chunk_tokens=64).answer(Q, DOC, max_new_tokens=3)


def test_a_trickled_server_list_ends_in_a_timeout() -> None:
    with FakeServer(Behaviour(trickle=0.4)) as srv:
        client = ServedClient(srv.base_url, "fake", timeout=3.0, max_retries=0)
        client.info()  # GET /v1/models is not trickled
        with pytest.raises(ServerTimeoutError):
            client.score([1, 2, 3], 5)


@pytest.mark.parametrize("mode", ["comments", "stall"])
def test_a_stream_that_never_finishes_ends_in_a_timeout(mode: str) -> None:
    """SSE comments forever, or two pieces and then silence: a ``ServerTimeoutError``
    within ``timeout`` (not a ``ServerResponseError(ReadTimeout)``, not a hang)."""
    with FakeServer(Behaviour(stream_mode=mode)) as srv:
        sel = OPRMSelector(_engine(srv, timeout=1.5), chunk_tokens=64)
        with pytest.raises(ServerTimeoutError, match="streamed completion within 1.5 s"):
            sel.answer(Q, DOC, max_new_tokens=8)


async def test_async_stream_is_bounded_too() -> None:
    with FakeServer(Behaviour(stream_mode="comments")) as srv:
        client = ServedClient(srv.base_url, "fake", timeout=1.0, max_retries=0)
        with pytest.raises(ServerTimeoutError):
            async for _ in client.astream([1, 2], GenerationConfig(max_new_tokens=3)):
                pass


def test_timeout_includes_the_retries() -> None:
    """Rate-limited forever, with retries allowed: the request still ends by its deadline."""
    with FakeServer(Behaviour(rate_limited=10_000)) as srv:
        client = ServedClient(srv.base_url, "fake", timeout=0.4, max_retries=1000)
        with pytest.raises((ServerResponseError, ServerTimeoutError), match="HTTP 429|within 0.4 s"):
            client.score([1, 2], 5)
        assert 2 <= len(srv.requests) < 1000


# ---------------------------------------------------------------------- truncation
@pytest.mark.parametrize("mode", ["cut", "done_only"])
def test_a_stream_without_a_finish_reason_is_not_an_answer(mode: str) -> None:
    with FakeServer(Behaviour(stream_mode=mode)) as srv:
        sel = OPRMSelector(_engine(srv), chunk_tokens=64)
        with pytest.raises(IncompleteAnswerError, match="without a finish reason.*cut off") as info:
            sel.answer(Q, DOC, max_new_tokens=4)
        assert info.value.partial_text == "w0 w1 w2 w3 "
        stream = sel.stream(Q, DOC, max_new_tokens=4)
        with pytest.raises(IncompleteAnswerError):
            list(stream)


def test_a_stream_with_a_finish_reason_but_no_done_is_complete() -> None:
    """[DONE] is a terminator, not the verdict: the finish reason says the answer is whole."""
    with FakeServer(Behaviour(stream_mode="no_done")) as srv:
        ans = OPRMSelector(_engine(srv), chunk_tokens=64).answer(Q, DOC, max_new_tokens=3)
        assert ans.text == "w0 w1 w2 " and ans.finish_reason == "length"


def test_a_completion_without_a_finish_reason_is_not_an_answer() -> None:
    def no_reason(body: dict, answer: dict) -> dict:
        answer["choices"][0]["finish_reason"] = None
        return answer

    with FakeServer(Behaviour(rewrite=no_reason)) as srv:
        client = _engine(srv).client
        with pytest.raises(IncompleteAnswerError, match="without a finish reason"):
            client.complete([1, 2], GenerationConfig(max_new_tokens=2))


# ---------------------------------------------------------------------- concurrency
def test_max_concurrency_holds_for_concurrent_first_questions() -> None:
    """Six first questions at once on a fresh engine bounded to 2: the first-use probes,
    the scoring batches and the streamed answers all share the same two slots."""
    with FakeServer(Behaviour(delay=0.05)) as srv:
        lm = _engine(srv, max_concurrency=2)
        sel = OPRMSelector(lm, chunk_tokens=64)
        errors: list[BaseException] = []

        def ask(i: int) -> None:
            try:
                sel.answer(f"What is the code of key{i}?", DOC, max_new_tokens=2)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert len(srv.requests) > 6 * 2
        assert srv.max_in_flight <= 2


async def test_async_and_sync_callers_share_the_bound() -> None:
    with FakeServer(Behaviour(delay=0.05)) as srv:
        client = ServedClient(srv.base_url, "fake", max_retries=0, max_concurrency=2)
        import asyncio

        await asyncio.gather(client.ascore_many([[1, i] for i in range(4)], 5),
                             client.ascore_many([[2, i] for i in range(4)], 5),
                             asyncio.to_thread(client.score_many, [[3, i] for i in range(4)], 5))
        assert srv.max_in_flight <= 2


# ---------------------------------------------------------------------- messages and retries
def test_a_huge_error_body_is_clipped_in_the_message() -> None:
    with FakeServer(Behaviour(error_body=1_000_000)) as srv:
        with pytest.raises(ServerResponseError) as info:
            _select(srv)
        assert len(str(info.value)) < 2_000 and "1,000,000 characters" in str(info.value)


@pytest.mark.parametrize("message", [
    "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 512. Given: 600 `inputs` tokens and 1 "
    "`max_new_tokens`",
    "Input validation error: `inputs` must have less than 512 tokens. Given: 600",
])
def test_tgi_context_wording_is_a_context_overflow(message: str) -> None:
    with FakeServer(Behaviour(error=(422, message))) as srv:
        with pytest.raises(ContextOverflowError, match="smaller chunk_tokens"):
            _select(srv)


def test_the_model_list_is_retried() -> None:
    """A server still loading answers 503 to GET /v1/models; with retries the list comes."""
    with FakeServer(Behaviour(models_failures=2)) as srv:
        assert ServedClient(srv.base_url, None, max_retries=2).check_model() == "fake"
        assert srv.model_requests == 3
    with FakeServer(Behaviour(models_failures=5)) as srv:
        with pytest.raises(ServerResponseError, match="HTTP 503"):
            ServedClient(srv.base_url, None, max_retries=1).check_model()


# ---------------------------------------------------------------------- options
@pytest.mark.parametrize("kw", [{"timeout": 0}, {"timeout": -1}, {"timeout": float("nan")}, {"timeout": "5"},
                                {"max_retries": -1}, {"max_retries": 1.5}, {"max_concurrency": 0}])
def test_bad_options_fail_at_construction(kw: dict[str, Any]) -> None:
    with FakeServer() as srv:
        with pytest.raises(OptionError, match=next(iter(kw))):
            OpenAICompatibleLM(srv.base_url, "fake", **kw)
        assert srv.requests == [] and srv.model_requests == 0


def test_a_missing_tokenizer_folder_fails_at_construction(tmp_path: Any) -> None:
    with FakeServer() as srv:
        with pytest.raises(InputError, match="not a folder"):
            OpenAICompatibleLM(srv.base_url, "fake", tokenizer=str(tmp_path / "nowhere"))
        assert srv.model_requests == 0


