"""RecurrentLLM: the engine's decoding, deltas, usage, chat template, async and handoff."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, List

import pytest
from llama_index.core.base.llms.types import ChatMessage, MessageRole
from llama_index.core.callbacks import CallbackManager, TokenCountingHandler

from llama_index.llms.oprm import RecurrentLLM
from llama_index.postprocessor.oprm import oprm_qa_prompt
from oprm_rag import GenerationConfig, OPRMSelector
from oprm_rag import resolve

PROMPT = "The code of alpha is 1234. The code of beta is 5678. What is the code of alpha?"
N = 8


def engine_pieces(lm: Any, prompt: Any, add_special_tokens: bool, **cfg: Any) -> tuple[List[str], Any]:
    stream = resolve(lm).complete(prompt, GenerationConfig.make(**{"max_new_tokens": N, **cfg}),
                         add_special_tokens=add_special_tokens)
    return list(stream), stream.result


def special(lm: Any) -> bool:
    return not lm.prompt.use_chat_template


def test_metadata_reports_the_model(lm):
    llm = RecurrentLLM(model=lm, max_new_tokens=N)
    meta = llm.metadata
    assert lm.backend.exact_continuation  # a recurrent model: no hard limit
    assert meta.context_window == 1 << 20 >= lm.context_window
    assert RecurrentLLM(model=lm, context_window=300).metadata.context_window == 300
    assert meta.model_name == lm.name
    assert meta.num_output == N
    assert meta.is_chat_model == lm.prompt.use_chat_template
    assert RecurrentLLM(model=lm, is_chat=not meta.is_chat_model).metadata.is_chat_model != meta.is_chat_model


def test_context_window_of_a_model_with_positions():
    from oprm_rag import RecurrentLM
    from oprm_rag.testing import tiny_model

    model, tok = tiny_model("llama")
    lm = RecurrentLM(model, tok, name="tiny-llama")
    assert RecurrentLLM(model=lm).metadata.context_window == model.config.max_position_embeddings


def test_complete_is_the_engines_completion_with_usage(any_lm):
    llm = RecurrentLLM(model=any_lm, max_new_tokens=N)
    resp = llm.complete(PROMPT, stop_at_eos=False)  # N tokens whatever the model says first
    pieces, gen = engine_pieces(any_lm, PROMPT, special(any_lm), stop_at_eos=False)
    assert resp.text == "".join(pieces) == gen.text
    usage = resp.raw["usage"]
    assert usage["prompt_tokens"] == len(any_lm.encode(PROMPT, add_special_tokens=special(any_lm)))
    assert usage["completion_tokens"] == gen.completion_tokens > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert resp.raw["finish_reason"] == gen.finish_reason


@pytest.mark.parametrize("which", ["main", "varied"])
def test_stream_complete_yields_true_deltas(lm, varied_lm, which):
    lm = lm if which == "main" else varied_lm
    llm = RecurrentLLM(model=lm, max_new_tokens=N)
    chunks = list(llm.stream_complete(PROMPT))
    pieces, gen = engine_pieces(lm, PROMPT, special(lm))
    if which == "varied":
        assert len(pieces) > 2  # several tokens, several deltas
    deltas = [c.delta for c in chunks]
    assert deltas[:-1] == pieces  # piece by piece as the decoder releases them
    assert deltas[-1] == "" and chunks[-1].raw["usage"]["completion_tokens"] == gen.completion_tokens
    running = ""
    for c in chunks:
        running += c.delta
        assert c.text == running
    assert running == llm.complete(PROMPT).text


def test_token_counting_handler_reads_the_usage(lm):
    counter = TokenCountingHandler()
    llm = RecurrentLLM(model=lm, max_new_tokens=N, callback_manager=CallbackManager([counter]))
    resp = llm.complete(PROMPT)
    assert counter.prompt_llm_token_count == resp.raw["usage"]["prompt_tokens"]
    assert counter.completion_llm_token_count == resp.raw["usage"]["completion_tokens"]


def test_multi_token_stop_string(varied_lm):
    llm = RecurrentLLM(model=varied_lm, max_new_tokens=16)
    free = resolve(varied_lm).complete(PROMPT, GenerationConfig(max_new_tokens=16, stop_at_eos=False))
    text = free.text()
    ids = free.result.token_ids
    # a stop string made of two consecutive generated tokens, printable, not at the start
    stop = None
    for i in range(1, len(ids) - 1):
        before = varied_lm.tokenizer.decode(ids[:i])
        pair = varied_lm.tokenizer.decode(ids[i:i + 2])
        if len(pair) >= 2 and pair.isprintable() and "\ufffd" not in pair and text.startswith(before + pair) \
                and text.find(pair) > 0:
            stop = pair
            break
    assert stop is not None, f"no usable two-token window in {text!r}"
    expected = text[:text.find(stop)]
    resp = llm.complete(PROMPT, stop=[stop], stop_at_eos=False)
    assert resp.text == expected and resp.raw["finish_reason"] == "stop"
    deltas = [c.delta for c in llm.stream_complete(PROMPT, stop=stop, stop_at_eos=False)]
    assert "".join(deltas) == expected
    assert all(stop not in d for d in deltas)


def test_chat_goes_through_the_chat_template(lm):
    llm = RecurrentLLM(model=lm, max_new_tokens=N)
    messages = [ChatMessage(role=MessageRole.SYSTEM, content="Answer briefly."),
                ChatMessage(role=MessageRole.USER, content=PROMPT)]
    resp = llm.chat(messages)
    turns = [{"role": m.role.value, "content": m.content} for m in messages]
    by_ids = resolve(lm).complete(lm.chat_ids(turns), GenerationConfig(max_new_tokens=N)).text()
    assert resp.message.role == MessageRole.ASSISTANT
    assert resp.message.content == by_ids
    assert resp.raw["usage"]["prompt_tokens"] == len(lm.chat_ids(turns))
    streamed = list(llm.stream_chat(messages))
    assert "".join(c.delta for c in streamed) == by_ids == streamed[-1].message.content


def test_unknown_options_are_rejected(lm):
    with pytest.raises(TypeError):
        RecurrentLLM(model=lm).complete(PROMPT, frequency_penalty=1.0)


def test_handoff_resumes_from_the_scored_state(any_lm, docs, question):
    lm = any_lm
    sel = OPRMSelector(lm, chunk_tokens=24, idk_filter=False)
    result = sel.select(question, docs, handoff=True)
    prompt = sel.prompt_text(question, result.best.text)
    llm = RecurrentLLM(model=lm, max_new_tokens=N)
    hits, prefilled = resolve(lm).handoff.hits, lm.counters["prefill_tokens"]
    cached = llm.complete(prompt)
    assert cached.raw["handoff_hit"] and resolve(lm).handoff.hits == hits + 1
    assert lm.counters["prefill_tokens"] == prefilled  # the chunk was not read again
    assert cached.text == sel.answer_from(result, max_new_tokens=N).text
    # the same prompt without the stored state: a full prefill, the same answer
    resolve(lm).handoff.clear()
    fresh = llm.complete(prompt)
    assert not fresh.raw["handoff_hit"] and resolve(lm).handoff.hits == hits + 1
    assert lm.counters["prefill_tokens"] > prefilled
    assert fresh.text == cached.text
    assert fresh.raw["usage"]["prompt_tokens"] == cached.raw["usage"]["prompt_tokens"]


def test_qa_prompt_renders_the_scored_text_and_hits(any_lm, docs, question):
    """The OPRM QA template, through the LLM's own path (chat or completion), hits the handoff."""
    lm = any_lm
    sel = OPRMSelector(lm, chunk_tokens=24, idk_filter=False)
    result = sel.select(question, docs, handoff=True)
    llm = RecurrentLLM(model=lm, max_new_tokens=N)
    qa = oprm_qa_prompt(sel.prompt)
    hits = resolve(lm).handoff.hits
    if llm.metadata.is_chat_model:
        messages = qa.format_messages(context_str=result.best.text, query_str=question)
        rendered = lm.tokenizer.apply_chat_template([{"role": m.role.value, "content": m.content} for m in messages],
                                                    tokenize=False, add_generation_prompt=True)
        resp = llm.chat(messages)
        text = resp.message.content
    else:
        rendered = qa.format(context_str=result.best.text, query_str=question)
        resp = llm.complete(rendered, formatted=True)
        text = resp.text
    assert rendered == sel.prompt_text(question, result.best.text)
    assert resp.raw["handoff_hit"] and resolve(lm).handoff.hits == hits + 1
    assert text == sel.answer_from(result, max_new_tokens=N).text


@pytest.mark.asyncio
async def test_async_methods_match_sync(lm):
    llm = RecurrentLLM(model=lm, max_new_tokens=N)
    messages = [ChatMessage(role=MessageRole.USER, content=PROMPT)]
    assert (await llm.acomplete(PROMPT)).text == llm.complete(PROMPT).text
    assert (await llm.achat(messages)).message.content == llm.chat(messages).message.content
    deltas = [c.delta async for c in await llm.astream_complete(PROMPT)]
    assert deltas == [c.delta for c in llm.stream_complete(PROMPT)]
    chat_deltas = [c.delta async for c in await llm.astream_chat(messages)]
    assert chat_deltas == [c.delta for c in llm.stream_chat(messages)]


@pytest.mark.asyncio
@pytest.mark.parametrize("method", ["acomplete", "astream_complete", "achat", "astream_chat"])
async def test_async_methods_leave_the_event_loop_free(lm, monkeypatch, method):
    """The model call waits until a coroutine on the loop opens a gate: that can only
    happen if the call runs in another thread while the loop keeps going."""
    gate = threading.Event()
    threads: List[int] = []
    complete = resolve(lm).complete

    def gated(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.get_ident())
        if not gate.wait(timeout=10):
            raise AssertionError("the event loop was blocked while the model ran")
        return complete(*args, **kwargs)

    monkeypatch.setattr(resolve(lm), "complete", gated)
    llm = RecurrentLLM(model=lm, max_new_tokens=N)
    arg: Any = [ChatMessage(role=MessageRole.USER, content=PROMPT)] if "chat" in method else PROMPT

    async def call() -> Any:
        out = await getattr(llm, method)(arg)
        if method.startswith("astream"):
            return [c async for c in out]
        return out

    task = asyncio.create_task(call())
    await asyncio.sleep(0.05)
    gate.set()
    result = await asyncio.wait_for(task, timeout=30)
    assert result
    assert threads and threading.get_ident() not in threads


@pytest.mark.asyncio
async def test_async_stream_can_stop_early(lm):
    llm = RecurrentLLM(model=lm, max_new_tokens=32)
    gen = await llm.astream_complete(PROMPT, stop_at_eos=False)
    first = await gen.__anext__()
    await gen.aclose()
    assert first.delta
    assert (await llm.acomplete(PROMPT)).text == llm.complete(PROMPT).text
