"""OPRMSelector as a runnable: the documents it returns, batching, callbacks, async, config."""

from __future__ import annotations

import json
import time
from typing import Any
from uuid import UUID

import pytest
from oprm_rag.selector import OPRMSelector as CoreSelector
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.runnables import ConfigurableField
from lc_oprm_support import DOC, OTHER_DOC, QUESTION, LoopTicks, same_documents

from langchain_oprm import OPRMSelector
from oprm_rag import resolve

SETTINGS: dict[str, Any] = {"chunk_tokens": 24, "idk_filter": False}  # the demo model may say IDK everywhere


class Recorder(BaseCallbackHandler):
    """Keeps the retriever events a callback handler sees."""

    def __init__(self) -> None:
        self.starts: list[tuple[str, str | None, UUID | None]] = []
        self.ends: list[list[Document]] = []
        self.errors: list[BaseException] = []

    def on_retriever_start(self, serialized: Any, query: str, *, run_id: UUID,
                           parent_run_id: UUID | None = None, **kwargs: Any) -> None:
        self.starts.append((query, kwargs.get("name"), parent_run_id))

    def on_retriever_end(self, documents: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self.ends.append(list(documents))

    def on_retriever_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self.errors.append(error)


def test_selected_documents_are_chunks_of_their_sources(primary_path: str, lm_for) -> None:
    from oprm_rag import OPRMSelector as EngineSelector

    sources = ["   ", Document(page_content=DOC, metadata={"src": "manual", "page": 3}), OTHER_DOC]
    sel = OPRMSelector(model=primary_path, top_k=3, **SETTINGS)
    docs = sel.invoke({"question": QUESTION, "documents": sources})
    assert len(docs) == 3
    assert [d.metadata["oprm_rank"] for d in docs] == [0, 1, 2]
    # Same choice, same scores as the engine run on the non-blank texts from scratch.
    fresh = EngineSelector(lm_for(primary_path), cache=False, top_k=3, **SETTINGS).select(QUESTION, [DOC, OTHER_DOC])
    for doc, score in zip(docs, fresh.selected):
        meta = doc.metadata
        assert meta["oprm_doc_index"] == score.doc_index + 1  # the blank first source is skipped
        text = sources[meta["oprm_doc_index"]]
        text = text.page_content if isinstance(text, Document) else text
        assert doc.page_content == text[meta["oprm_char_start"]:meta["oprm_char_end"]] == score.text
        assert meta["oprm_chunk_index"] == score.index
        assert meta["oprm_entropy"] == pytest.approx(score.entropy, abs=1e-4)
        assert meta["relevance_score"] == meta["oprm_relevance"] == pytest.approx(-meta["oprm_entropy"])
        if meta["oprm_doc_index"] == 1:
            assert meta["src"] == "manual" and meta["page"] == 3
    assert [d.metadata["relevance_score"] for d in docs] == sorted((d.metadata["relevance_score"] for d in docs),
                                                                     reverse=True)


def test_metadata_holds_plain_values_only(primary_path: str) -> None:
    """Model state never travels in metadata: it stays in the model's handoff registry."""
    docs = OPRMSelector(model=primary_path, top_k=2, **SETTINGS).invoke({"question": QUESTION, "documents": DOC})
    for doc in docs:
        assert all(isinstance(v, (str, int, float, bool)) for v in doc.metadata.values())
        json.dumps(doc.metadata)


def test_a_string_is_one_document(primary_path: str) -> None:
    sel = OPRMSelector(model=primary_path, **SETTINGS)
    assert same_documents(sel.invoke({"question": QUESTION, "documents": DOC}),
                          sel.invoke({"question": QUESTION, "documents": [Document(page_content=DOC)]}))


def test_every_chunk_dropped_gives_no_documents(primary_path: str) -> None:
    # Entropy is never negative, so this threshold drops every chunk (the all-IDK path).
    sel = OPRMSelector(model=primary_path, chunk_tokens=24, entropy_threshold=-1.0)
    assert sel.invoke({"question": QUESTION, "documents": DOC}) == []
    kept = OPRMSelector(model=primary_path, chunk_tokens=24, entropy_threshold=-1.0, fallback="min_entropy")
    assert len(kept.invoke({"question": QUESTION, "documents": DOC})) == 1


def test_bad_inputs_say_what_is_expected(primary_path: str) -> None:
    sel = OPRMSelector(model=primary_path, **SETTINGS)
    with pytest.raises(KeyError, match="needs 'question' and 'documents'"):
        sel.invoke({"question": QUESTION})
    with pytest.raises(TypeError, match="takes"):
        sel.invoke(QUESTION)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no document has any text"):
        sel.invoke({"question": QUESTION, "documents": ["", "  "]})
    with pytest.raises(ValueError, match="the question is empty"):
        sel.invoke({"question": " ", "documents": DOC})


def test_batch_shares_one_engine_call(primary_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    sel = OPRMSelector(model=primary_path, top_k=2, **SETTINGS)
    inputs = [{"question": QUESTION, "documents": [DOC, OTHER_DOC]},
              {"question": "What is the code of beta?", "documents": DOC},
              {"question": "What is the code of gamma?", "documents": OTHER_DOC}]
    one_by_one = [sel.invoke(x) for x in inputs]
    calls: list[int] = []
    real = CoreSelector.select_many

    def spy(self: Any, items: Any, **kwargs: Any) -> Any:
        calls.append(len(items))
        return real(self, items, **kwargs)

    monkeypatch.setattr(CoreSelector, "select_many", spy)
    recorder = Recorder()
    batched = sel.batch(inputs, config={"callbacks": [recorder]})
    assert calls == [3]
    assert all(same_documents(x, y) for x, y in zip(batched, one_by_one))
    assert [q for q, _, _ in recorder.starts] == [x["question"] for x in inputs]
    assert recorder.ends == batched and not recorder.errors


async def test_abatch_shares_one_engine_call_off_the_event_loop(primary_path: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    sel = OPRMSelector(model=primary_path, **SETTINGS)
    inputs = [{"question": QUESTION, "documents": DOC}, {"question": "What is the code of beta?", "documents": DOC}]
    expected = sel.batch(inputs)
    calls: list[int] = []
    real = CoreSelector.select_many

    def slow(self: Any, items: Any, **kwargs: Any) -> Any:
        calls.append(len(items))
        time.sleep(0.3)  # blocking work: it must happen off the event loop
        return real(self, items, **kwargs)

    monkeypatch.setattr(CoreSelector, "select_many", slow)
    async with LoopTicks() as loop:
        batched = await sel.abatch(inputs)
        single = await sel.ainvoke(inputs[0])
        assert all(same_documents(x, y) for x, y in zip(batched, expected))
        assert same_documents(single, expected[0])
    assert calls == [2, 1]
    assert loop.ticks >= 10, f"the event loop ran only {loop.ticks} times while the model worked"


def test_batch_reports_errors_per_input(primary_path: str) -> None:
    sel = OPRMSelector(model=primary_path, **SETTINGS)
    good = {"question": QUESTION, "documents": DOC}
    recorder = Recorder()
    out = sel.batch([good, {"question": "", "documents": DOC}, good], config={"callbacks": [recorder]},
                    return_exceptions=True)
    assert isinstance(out[1], ValueError) and same_documents(out[0], out[2])
    assert same_documents(out[0], sel.invoke(good))
    assert len(recorder.ends) == 2 and len(recorder.errors) == 1
    with pytest.raises(ValueError, match="the question is empty"):
        sel.batch([good, {"question": "", "documents": DOC}])


def test_a_question_too_long_for_a_chunk_fails_alone(primary_path: str) -> None:
    sel = OPRMSelector(model=primary_path, chunk_tokens=8, idk_filter=False)
    good = {"question": "code?", "documents": DOC}
    out = sel.batch([good, {"question": QUESTION * 4, "documents": DOC}], return_exceptions=True)
    assert isinstance(out[0], list) and len(out[0]) == 1
    assert isinstance(out[1], ValueError) and "shorten the question" in str(out[1])


async def test_runs_are_retriever_runs_in_event_streams(primary_path: str) -> None:
    sel = OPRMSelector(model=primary_path, **SETTINGS)
    events = [e async for e in sel.astream_events({"question": QUESTION, "documents": DOC}, version="v2")]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "on_retriever_start" and kinds[-1] == "on_retriever_end"
    assert same_documents(events[-1]["data"]["output"], await sel.ainvoke({"question": QUESTION, "documents": DOC}))
    assert events[0]["name"] == "OPRMSelector"


def test_settings_are_configurable_per_call(primary_path: str) -> None:
    sel = OPRMSelector(model=primary_path, **SETTINGS).configurable_fields(
        top_k=ConfigurableField(id="oprm_top_k"), chunk_tokens=ConfigurableField(id="oprm_chunk_tokens"))
    query = {"question": QUESTION, "documents": DOC}
    assert len(sel.invoke(query)) == 1
    assert len(sel.invoke(query, config={"configurable": {"oprm_top_k": 3}})) == 3
    whole = sel.invoke(query, config={"configurable": {"oprm_chunk_tokens": None}})
    assert len(whole) == 1 and whole[0].page_content == DOC


def test_core_selectors_share_the_model_and_its_cache(primary_path: str, lm_for) -> None:
    a = OPRMSelector(model=primary_path, top_k=2)
    c = OPRMSelector(model=primary_path, top_k=3)
    assert a.core_selector().options.top_k == 2 and c.core_selector().options.top_k == 3
    lm = lm_for(primary_path)
    assert a.core_selector().lm is lm and a.core_selector().cache is resolve(lm).document_cache()
    assert OPRMSelector(model=primary_path, cache=False).core_selector().cache is None
    # A loaded model works as well as its path: the same shared object and options.
    assert OPRMSelector(model=lm, top_k=2).core_selector().lm is a.core_selector().lm
    assert OPRMSelector(model=lm, top_k=2).core_options() == a.core_options()


def test_follow_up_questions_reuse_cached_chunk_states(primary_path: str, lm_for) -> None:
    text = DOC + " A new paragraph only this test uses."
    sel = OPRMSelector(model=primary_path, **SETTINGS)
    cache = resolve(lm_for(primary_path)).document_cache()
    before = cache.stats()["hits"]
    sel.invoke({"question": QUESTION, "documents": text})
    sel.invoke({"question": "What is the code of beta?", "documents": text})
    assert cache.stats()["hits"] == before + 1


def test_auto_chunk_size_comes_from_the_engine(primary_path: str, lm_for) -> None:
    from oprm_rag.capacity import auto_chunk_tokens

    sel = OPRMSelector(model=primary_path, chunk_tokens="auto")
    assert sel.core_selector().chunk_tokens == auto_chunk_tokens(lm_for(primary_path)).chunk_tokens
