"""The standard LlamaIndex wiring: SummaryIndex -> OPRMNodePostprocessor -> RecurrentLLM."""

from __future__ import annotations

from typing import Any, List, Tuple

import pytest
from llama_index.core import SummaryIndex
from llama_index.core.base.response.schema import AsyncStreamingResponse, StreamingResponse
from llama_index.core.instrumentation.events.llm import LLMChatStartEvent, LLMCompletionStartEvent
from llama_index.core.llms import MockLLM
from llama_index.core.schema import TextNode

from llama_index.llms.oprm import RecurrentLLM
from llama_index.postprocessor.oprm import OPRMNodePostprocessor
from oprm_rag import OPRMSelector
from oprm_rag import resolve

CHUNK = 24
N = 8


def nodes(texts: List[str]) -> List[TextNode]:
    return [TextNode(text=t, id_=f"n{i}", metadata={"title": f"doc {i}"}) for i, t in enumerate(texts)]


def wiring(lm: Any, texts: List[str], **kwargs: Any) -> Tuple[Any, RecurrentLLM, OPRMNodePostprocessor]:
    llm = RecurrentLLM(model=lm, max_new_tokens=N)
    pp = OPRMNodePostprocessor(model=lm, top_n=1, chunk_tokens=CHUNK, idk_filter=False)
    qe = SummaryIndex(nodes(texts)).as_query_engine(llm=llm, node_postprocessors=[pp], **kwargs)
    return qe, llm, pp


def llm_inputs(events: List[Any]) -> List[Any]:
    """What reached the LLM: prompt texts or chat message lists, in order."""
    out: List[Any] = []
    for e in events:
        if isinstance(e, LLMCompletionStartEvent):
            out.append(e.prompt)
        elif isinstance(e, LLMChatStartEvent):
            out.append(e.messages)
    return out


def replay(llm: RecurrentLLM, sent: Any) -> str:
    """Ask the LLM directly what the query engine asked it."""
    if isinstance(sent, str):
        return llm.complete(sent, formatted=True).text
    return llm.chat(sent).message.content or ""


def test_sync(lm, docs, question, events):
    qe, llm, _ = wiring(lm, docs)
    resp = qe.query(question)
    best = OPRMSelector(lm, chunk_tokens=CHUNK, idk_filter=False).select(question, docs).best
    [src] = resp.source_nodes
    assert src.node.get_content() == best.text and src.score == pytest.approx(-best.entropy, abs=1e-5)
    [sent] = llm_inputs(events)
    text = sent if isinstance(sent, str) else "\n".join(m.content for m in sent)
    assert best.text.strip() in text
    assert resp.response == replay(llm, sent)


@pytest.mark.asyncio
async def test_async(lm, docs, question):
    qe, _, _ = wiring(lm, docs)
    expected = qe.query(question)
    resp = await qe.aquery(question)
    assert resp.response == expected.response
    assert [s.node.node_id for s in resp.source_nodes] == [s.node.node_id for s in expected.source_nodes]


def test_streaming(lm, docs, question):
    expected = wiring(lm, docs)[0].query(question)
    resp = wiring(lm, docs, streaming=True)[0].query(question)
    assert isinstance(resp, StreamingResponse)
    pieces = list(resp.response_gen)
    assert "".join(pieces) == expected.response
    assert [s.node.node_id for s in resp.source_nodes] == [s.node.node_id for s in expected.source_nodes]


@pytest.mark.asyncio
async def test_async_streaming(lm, docs, question):
    expected = wiring(lm, docs)[0].query(question)
    resp = await wiring(lm, docs, streaming=True)[0].aquery(question)
    assert isinstance(resp, AsyncStreamingResponse)
    assert "".join([p async for p in resp.async_response_gen()]) == expected.response


def test_rendered_prompt_has_no_oprm_metadata(lm, docs, question, events):
    """MockLLM answers with the prompt it got, so the response is the final prompt."""
    pp = OPRMNodePostprocessor(model=lm, top_n=2, chunk_tokens=CHUNK, idk_filter=False)
    echoed = SummaryIndex(nodes(docs)).as_query_engine(llm=MockLLM(), node_postprocessors=[pp]).query(question)
    prompt = echoed.response
    assert "title: doc" in prompt and question in prompt  # metadata and query do reach it
    assert all(s.node.get_content().strip() in prompt for s in echoed.source_nodes)
    assert "oprm_" not in prompt
    # and through RecurrentLLM, as the instrumentation saw the prompt
    qe, _, _ = wiring(lm, docs)
    qe.query(question)
    [sent] = llm_inputs(events)[-1:]
    text = sent if isinstance(sent, str) else "\n".join(m.content for m in sent)
    assert "title: doc" in text and "oprm_" not in text


def test_qa_prompt_hands_the_scored_state_to_the_llm(any_lm, question):
    """With the OPRM prompt, the answer resumes from the state the postprocessor scored."""
    lm = any_lm
    text = "The code of alpha is 1234. Mamba models keep a fixed size state."  # one chunk, no edge space
    others = ["The code of beta is 5678.", "Long documents overflow that state."]
    llm = RecurrentLLM(model=lm, max_new_tokens=N)
    pp = OPRMNodePostprocessor(model=lm, top_n=1, chunk_tokens=64, idk_filter=False)
    index = SummaryIndex([TextNode(text=t, id_=f"p{i}") for i, t in enumerate([text, *others])])
    qe = index.as_query_engine(llm=llm, node_postprocessors=[pp], text_qa_template=pp.qa_prompt())
    hits = resolve(lm).handoff.hits
    resp = qe.query(question)
    [src] = resp.source_nodes
    assert resolve(lm).handoff.hits == hits + 1
    sel = OPRMSelector(lm, chunk_tokens=64, idk_filter=False)
    result = sel.select(question, [text, *others])
    assert src.node.get_content() == result.best.text
    assert resp.response == sel.answer_from(result, max_new_tokens=N).text
