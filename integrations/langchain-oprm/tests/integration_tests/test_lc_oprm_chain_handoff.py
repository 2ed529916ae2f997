"""The QA chain resumes from the selector's state (the handoff) and answers exactly as
a fresh run over the same prompt tokens would. Both prompt modes: chat template and raw."""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.messages import AIMessage
from lc_oprm_support import DOC, OTHER_DOC, QUESTION

from langchain_oprm import ChatRecurrent, OPRMSelector, RecurrentLLM, create_oprm_qa_chain, oprm_prompt_messages
from oprm_rag import resolve

SETTINGS: dict[str, Any] = {"chunk_tokens": 24, "idk_filter": False}


def _fresh(lm: Any, ids: list[int], n: int) -> Any:
    """Decode ``ids`` from scratch: empty handoff registry, full prefill."""
    from oprm_rag import GenerationConfig

    resolve(lm).handoff.clear()
    stream = resolve(lm).complete(ids, GenerationConfig(max_new_tokens=n))
    stream.text()
    assert stream.handoff_hit is False
    return stream.result


def test_chain_hits_the_handoff_and_matches_a_fresh_run(mode_path: str, lm_for) -> None:
    lm = lm_for(mode_path)
    chain = create_oprm_qa_chain(mode_path, max_tokens=8, **SETTINGS)
    inputs = {"question": QUESTION, "documents": [DOC, OTHER_DOC]}
    hits = resolve(lm).handoff.hits
    answer = chain.invoke(inputs)
    assert isinstance(answer, AIMessage)
    assert resolve(lm).handoff.hits == hits + 1
    assert answer.response_metadata["oprm_handoff_hit"] is True

    # The prompt the chat model got is the selector's exact [P, C, Q] text for its best chunk.
    selector = OPRMSelector(model=mode_path, **SETTINGS)
    best = selector.invoke(inputs)[0]
    text = selector.core_selector().prompt_text(QUESTION, best.page_content)
    chat = ChatRecurrent(model=mode_path)
    assert chat.render(oprm_prompt_messages(selector, QUESTION, [best]))[0] == text
    ids = resolve(lm).prompt_ids(text)  # the exact ids the selector scored
    assert answer.usage_metadata["input_tokens"] == len(ids)
    assert answer.usage_metadata["input_token_details"]["cache_read"] == len(ids)

    # The engine's own stream on that text resumes too (TokenStream.handoff_hit).
    from oprm_rag import GenerationConfig

    stream = resolve(lm).complete(text, GenerationConfig(max_new_tokens=8), add_special_tokens=not lm.prompt.use_chat_template)
    assert stream.text() == answer.content and stream.handoff_hit is True

    # And from scratch (no stored state), the same ids give the same answer.
    fresh = _fresh(lm, ids, 8)
    assert fresh.text == answer.content
    assert answer.usage_metadata["output_tokens"] == len(fresh.token_ids)


async def test_async_chain_hits_too(mode_path: str, lm_for) -> None:
    lm = lm_for(mode_path)
    chain = create_oprm_qa_chain(mode_path, max_tokens=6, **SETTINGS)
    inputs = {"question": "What is the code of beta?", "documents": DOC}
    expected = chain.invoke(inputs).content
    hits = resolve(lm).handoff.hits
    answer = await chain.ainvoke(inputs)
    assert answer.content == expected and answer.response_metadata["oprm_handoff_hit"] is True
    assert resolve(lm).handoff.hits == hits + 1
    streamed = "".join([c.content async for c in chain.astream(inputs)])
    assert streamed == expected


def test_llm_resumes_from_the_selector_state_too(mode_path: str, lm_for) -> None:
    lm = lm_for(mode_path)
    selector = OPRMSelector(model=mode_path, **SETTINGS)
    best = selector.invoke({"question": QUESTION, "documents": DOC})[0]
    text = selector.core_selector().prompt_text(QUESTION, best.page_content)
    ids = resolve(lm).prompt_ids(text)
    llm = RecurrentLLM(model=mode_path, max_tokens=6)
    hits = resolve(lm).handoff.hits
    result = llm.generate([text, "Hello"])
    assert resolve(lm).handoff.hits == hits + 1
    info = result.generations[0][0].generation_info
    assert info["oprm_handoff_hit"] is True and info["usage"]["input_token_details"]["cache_read"] == len(ids)
    assert result.generations[1][0].generation_info["oprm_handoff_hit"] is False
    assert result.generations[0][0].text == _fresh(lm, ids, 6).text


def test_several_chunks_are_answered_from_their_joined_text(mode_path: str, lm_for) -> None:
    lm = lm_for(mode_path)
    chain = create_oprm_qa_chain(mode_path, max_tokens=6, top_k=2, **SETTINGS)
    inputs = {"question": QUESTION, "documents": DOC}
    answer = chain.invoke(inputs)
    selector = OPRMSelector(model=mode_path, top_k=2, **SETTINGS)
    chat = ChatRecurrent(model=mode_path)
    text, special = chat.render(oprm_prompt_messages(selector, QUESTION, selector.invoke(inputs)))
    assert answer.content == _fresh(lm, lm.encode(text, add_special_tokens=special), 6).text


def test_all_idk_answers_the_idk_word_without_decoding(mode_path: str, lm_for) -> None:
    lm = lm_for(mode_path)
    chain = create_oprm_qa_chain(mode_path, chunk_tokens=24, entropy_threshold=-1.0)
    decoded = lm.counters["decode_tokens"]
    answer = chain.invoke({"question": QUESTION, "documents": DOC})
    assert answer.content == lm.prompt.idk_word and answer.response_metadata["oprm_all_idk"] is True
    assert lm.counters["decode_tokens"] == decoded


def test_chain_with_a_chat_model_on_another_model_misses_but_answers(chat_path: str, tiny_raw: str) -> None:
    other = ChatRecurrent(model=tiny_raw, max_tokens=4)
    answer = create_oprm_qa_chain(chat_path, chat_model=other, **SETTINGS).invoke(
        {"question": QUESTION, "documents": DOC})
    assert answer.response_metadata["oprm_handoff_hit"] is False
    assert answer.response_metadata["model_name"] == tiny_raw


@pytest.mark.parametrize("bad", [{"question": QUESTION}, {"documents": DOC}])
def test_chain_input_errors(chat_path: str, bad: dict) -> None:
    with pytest.raises(KeyError):
        create_oprm_qa_chain(chat_path, **SETTINGS).invoke(bad)
