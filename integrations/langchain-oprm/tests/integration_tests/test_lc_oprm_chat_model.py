"""ChatRecurrent beyond the standard suite: exactness, stop strings, sampling, streaming,
async that leaves the event loop free, token counting and per-call overrides."""

from __future__ import annotations

import time
from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from lc_oprm_support import LoopTicks, Tokens, tiny_chat_path

from oprm_rag.engine.local import InProcessEngine
from langchain_oprm import ChatRecurrent
from oprm_rag import resolve

MESSAGES = [SystemMessage("You answer briefly."), HumanMessage("The code of alpha is 1234. What is the code?")]


def _reference(lm: Any, text: str, special: bool, n: int, **kw: Any) -> Any:
    """Decode the same prompt with the engine directly, with nothing handed off."""
    from oprm_rag import GenerationConfig

    resolve(lm).handoff.clear()
    stream = resolve(lm).complete(text, GenerationConfig(max_new_tokens=n, **kw), add_special_tokens=special)
    stream.text()
    return stream


def test_invoke_returns_the_engine_decoding_of_the_rendered_prompt(mode_path: str, lm_for) -> None:
    chat = ChatRecurrent(model=mode_path, max_tokens=6)
    msg = chat.invoke(MESSAGES)
    text, special = chat.render(MESSAGES)
    ref = _reference(lm_for(mode_path), text, special, 6)
    assert msg.content == ref.result.text
    assert msg.usage_metadata == {"input_tokens": ref.result.prompt_tokens, "output_tokens": len(ref.result.token_ids),
                                  "total_tokens": ref.result.prompt_tokens + len(ref.result.token_ids)}
    assert msg.response_metadata["model_name"] == mode_path
    assert msg.response_metadata["finish_reason"] == ref.result.finish_reason
    assert msg.response_metadata["oprm_handoff_hit"] is False


def test_multi_token_stop_string_cuts_the_answer(primary_path: str, lm_for) -> None:
    chat = ChatRecurrent(model=primary_path, max_tokens=12)
    full = chat.invoke(MESSAGES)
    ids = full.usage_metadata["output_tokens"]
    assert ids >= 4, "the model must produce a few tokens for this test"
    lm = lm_for(primary_path)
    out_ids = lm.encode(full.content)
    # A stop string made of two whole tokens from the middle of the answer.
    stop = lm.decode(out_ids[2:4])
    assert stop and stop in full.content
    cut = chat.invoke(MESSAGES, stop=[stop, "never-appears"])
    assert cut.content == full.content[:full.content.index(stop)]
    assert cut.response_metadata["finish_reason"] == "stop"
    assert ChatRecurrent(model=primary_path, max_tokens=12, stop=[stop]).invoke(MESSAGES).content == cut.content
    assert chat.invoke(MESSAGES, stop=stop).content == cut.content  # a bare string is one stop string


def test_per_call_generation_arguments(primary_path: str) -> None:
    chat = ChatRecurrent(model=primary_path, max_tokens=8)
    assert chat.invoke(MESSAGES, max_tokens=3).usage_metadata["output_tokens"] <= 3
    assert chat.invoke(MESSAGES, max_tokens=0).content == ""
    a = chat.invoke(MESSAGES, temperature=1.5, seed=7)
    b = chat.invoke(MESSAGES, temperature=1.5, seed=7)
    assert a.content == b.content
    samples = {chat.invoke(MESSAGES, temperature=5.0, top_p=1.0, seed=s).content for s in range(6)}
    assert len(samples) > 1, "different seeds at a high temperature should not all agree"


def test_stream_pieces_add_up_to_invoke(primary_path: str) -> None:
    chat = ChatRecurrent(model=primary_path, max_tokens=8)
    handler = Tokens()
    chunks = list(chat.stream(MESSAGES, config={"callbacks": [handler]}))
    assert "".join(c.content for c in chunks) == chat.invoke(MESSAGES).content
    assert "".join(handler.tokens) == chat.invoke(MESSAGES).content
    assert chunks[-1].chunk_position == "last" and chunks[-1].usage_metadata["output_tokens"] > 0
    assert sum(1 for c in chunks if c.usage_metadata) == 1


def test_streaming_flag_streams_on_invoke(primary_path: str) -> None:
    handler = Tokens()
    msg = ChatRecurrent(model=primary_path, max_tokens=5, streaming=True).invoke(
        MESSAGES, config={"callbacks": [handler]})
    assert len(handler.tokens) >= 2 and "".join(handler.tokens) == msg.content


async def test_async_paths_match_and_leave_the_loop_free(primary_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    chat = ChatRecurrent(model=primary_path, max_tokens=6)
    expected = chat.invoke(MESSAGES).content
    real_start = InProcessEngine.start_prompt

    def slow_start(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.3)  # stands for a long prefill: it must not run on the event loop
        return real_start(*args, **kwargs)

    monkeypatch.setattr(InProcessEngine, "start_prompt", slow_start)
    handler = Tokens()
    async with LoopTicks() as loop:
        assert (await chat.ainvoke(MESSAGES)).content == expected
        pieces = [c.content async for c in chat.astream(MESSAGES, config={"callbacks": [handler]})]
    assert "".join(pieces) == expected == "".join(handler.tokens)
    assert loop.ticks >= 20, f"the event loop ran only {loop.ticks} times during two slow prefills"


async def test_leaving_astream_early_stops_decoding(lm_for) -> None:
    # A random tiny model: it talks on (the shipped model answers in 5 tokens and stops).
    path = tiny_chat_path()
    lm = lm_for(path)
    chat = ChatRecurrent(model=path, max_tokens=200)
    full = await chat.ainvoke(MESSAGES)
    if full.usage_metadata["output_tokens"] < 100:
        pytest.skip("the model ends its answer early; nothing to cut short")
    before = lm.counters["decode_tokens"]
    stream = chat.astream(MESSAGES)
    first = await stream.__anext__()
    await stream.aclose()
    assert first.content
    assert lm.counters["decode_tokens"] - before < 50, "decoding went on after the consumer left"


def test_token_counts_use_the_model_tokenizer(mode_path: str, lm_for) -> None:
    lm = lm_for(mode_path)
    chat = ChatRecurrent(model=mode_path)
    assert chat.get_token_ids("The code of alpha") == lm.encode("The code of alpha")
    assert chat.get_num_tokens("The code of alpha") == len(lm.encode("The code of alpha"))
    text, special = chat.render(MESSAGES)
    assert chat.get_num_tokens_from_messages(MESSAGES) == len(lm.encode(text, add_special_tokens=special))
    assert chat.get_num_tokens_from_messages(MESSAGES) == chat.invoke(MESSAGES, max_tokens=1).usage_metadata[
        "input_tokens"]


def test_model_override_per_call(primary_path: str, tiny_raw: str, chat_path: str) -> None:
    other = tiny_raw if primary_path != tiny_raw else chat_path
    chat = ChatRecurrent(model=primary_path, max_tokens=4)
    msg = chat.invoke("Hello", model=other)
    assert msg.response_metadata["model_name"] == other
    assert msg.content == ChatRecurrent(model=other, max_tokens=4).invoke("Hello").content


def test_a_loaded_model_is_used_as_is(primary_path: str, lm_for) -> None:
    lm = lm_for(primary_path)
    by_object = ChatRecurrent(model=lm, max_tokens=4)
    assert by_object.get_lm() is lm
    by_path = ChatRecurrent(model=primary_path, max_tokens=4)
    assert by_object.invoke(MESSAGES).content == by_path.invoke(MESSAGES).content


def test_conversation_with_an_ai_turn(primary_path: str) -> None:
    msgs = [HumanMessage("hello"), AIMessage("hello"), HumanMessage("how are you")]
    out = ChatRecurrent(model=primary_path, max_tokens=4).invoke(msgs)
    assert isinstance(out, AIMessage) and out.usage_metadata["input_tokens"] > 0
