"""OPRMNodePostprocessor: the engine's scores and selection, as LlamaIndex nodes."""

from __future__ import annotations

import threading
from typing import Any, List

import pytest
from oprm_rag.errors import ModelLoadError
from llama_index.core.callbacks import CallbackManager, CBEventType, LlamaDebugHandler
from llama_index.core.instrumentation.events.rerank import ReRankEndEvent, ReRankStartEvent
from llama_index.core.schema import Document, MetadataMode, NodeRelationship, NodeWithScore, QueryBundle, TextNode

from llama_index.postprocessor.oprm import OPRM_METADATA_KEYS, OPRMNodePostprocessor, OPRMQueryEngine
from llama_index.llms.oprm import RecurrentLLM
from oprm_rag import OPRMSelector

CHUNK = 24


def as_nodes(texts: List[str], **meta: Any) -> List[NodeWithScore]:
    return [NodeWithScore(node=TextNode(text=t, metadata={"title": f"doc {i}", **meta})) for i, t in enumerate(texts)]


def test_constructors_do_not_load_weights(tmp_path):
    from oprm_rag.engine.resolve import loaded_models

    missing = str(tmp_path / "no-such-model")
    before = len(loaded_models())
    pp = OPRMNodePostprocessor(model=missing, top_n=1)
    llm = RecurrentLLM(model=missing)
    qe = OPRMQueryEngine.from_documents([Document(text="x")], model=missing)
    assert len(loaded_models()) == before
    assert pp.model == llm.model == qe.model == missing
    with pytest.raises(ModelLoadError, match="no such folder"):  # the path is only tried on first use
        _ = pp.lm


def test_scores_are_the_engines_and_higher_is_better(lm, docs, question):
    pp = OPRMNodePostprocessor(model=lm, top_n=4, chunk_tokens=CHUNK, idk_filter=False)
    out = pp.postprocess_nodes(as_nodes(docs), query_str=question)
    ref = OPRMSelector(lm, chunk_tokens=CHUNK, top_k=4, idk_filter=False, cache=False).select(question, docs)
    assert len(ref.chunks) > 4  # several chunks competed
    assert [n.score for n in out] == pytest.approx([-s.entropy for s in ref.selected], abs=1e-5)
    assert [n.node.metadata["oprm_char_start"] for n in out] == [s.char_start for s in ref.selected]
    scores = [n.score for n in out]
    assert scores == sorted(scores, reverse=True)  # best first, and best = highest
    assert out[0].score == pytest.approx(-min(c.entropy for c in ref.chunks), abs=1e-5)
    for n in out:
        meta = n.node.metadata
        assert n.score == pytest.approx(-meta["oprm_entropy"])
        assert meta["oprm_relevance"] == pytest.approx(-meta["oprm_entropy"]) == n.score
    assert [n.node.metadata["oprm_rank"] for n in out] == list(range(len(out)))


def test_question_likelihood_scores_are_log_probabilities(lm, docs, question):
    pp = OPRMNodePostprocessor(model=lm, top_n=3, chunk_tokens=CHUNK, criterion="question_likelihood")
    out = pp.postprocess_nodes(as_nodes(docs), query_str=question)
    ref = OPRMSelector(lm, chunk_tokens=CHUNK, top_k=3, criterion="question_likelihood",
                       cache=False).select(question, docs)
    assert [n.score for n in out] == pytest.approx([s.question_logprob for s in ref.selected], abs=1e-4)
    assert all(n.score < 0 for n in out)  # log-probabilities; the best (highest) first
    assert [n.score for n in out] == sorted([n.score for n in out], reverse=True)
    assert all(n.score == n.node.metadata["oprm_question_logprob"] for n in out)


@pytest.mark.parametrize("top_n", [1, 2, 3])
def test_top_n(lm, docs, question, top_n):
    pp = OPRMNodePostprocessor(model=lm, top_n=top_n, chunk_tokens=CHUNK, idk_filter=False)
    out = pp.postprocess_nodes(as_nodes(docs), query_str=question)
    wide = OPRMNodePostprocessor(model=lm, top_n=6, chunk_tokens=CHUNK, idk_filter=False)
    best = wide.postprocess_nodes(as_nodes(docs), query_str=question)
    assert len(out) == top_n
    assert [n.node.metadata["oprm_entropy"] for n in out] == [n.node.metadata["oprm_entropy"] for n in best[:top_n]]


def test_idk_chunks_are_dropped(lm, docs, question):
    base = OPRMSelector(lm, chunk_tokens=CHUNK, idk_filter=False, cache=False).select(question, docs)
    word = base.best.top_token.strip()
    if not word:
        pytest.skip("the best chunk's top token is whitespace; it cannot serve as an IDK word")
    ref = OPRMSelector(lm, chunk_tokens=CHUNK, idk_word=word, cache=False).select(question, docs)
    idk = [c for c in ref.chunks if c.is_idk]
    assert idk, "the chosen IDK word should mark at least the best chunk"
    n_all = len(ref.chunks)
    pp = OPRMNodePostprocessor(model=lm, top_n=n_all, chunk_tokens=CHUNK, idk_word=word)
    out = pp.postprocess_nodes(as_nodes(docs), query_str=question)
    assert len(out) == n_all - len(idk)
    assert not any(n.node.metadata["oprm_is_idk"] for n in out)
    if not out:  # every chunk said IDK: the fallback keeps the surest one
        fb = OPRMNodePostprocessor(model=lm, top_n=1, chunk_tokens=CHUNK, idk_word=word, fallback="min_entropy")
        kept = fb.postprocess_nodes(as_nodes(docs), query_str=question)
        assert len(kept) == 1 and kept[0].node.metadata["oprm_is_idk"]


def test_split_nodes_keep_source_id_span_and_document(lm, docs, question):
    doc = Document(text="\n\n".join(docs), metadata={"file_name": "facts.txt"})
    long_text = docs[0]
    start = doc.text.index(long_text)
    long_node = TextNode(text=long_text, metadata={"title": "long"}, start_char_idx=start,
                         end_char_idx=start + len(long_text),
                         relationships={NodeRelationship.SOURCE: doc.as_related_node_info()})
    short_node = TextNode(text=docs[2], metadata={"title": "short"})
    pp = OPRMNodePostprocessor(model=lm, top_n=20, chunk_tokens=CHUNK, idk_filter=False)
    out = pp.postprocess_nodes([NodeWithScore(node=long_node), NodeWithScore(node=short_node)], query_str=question)
    parts = [n.node for n in out if n.node.metadata["oprm_source_node_id"] == long_node.node_id]
    whole = [n.node for n in out if n.node.metadata["oprm_source_node_id"] == short_node.node_id]
    assert len(parts) > 1 and len(whole) == 1
    for part in parts:
        cs, ce = part.metadata["oprm_char_start"], part.metadata["oprm_char_end"]
        assert part.text == long_text[cs:ce]
        assert part.node_id != long_node.node_id
        assert part.relationships[NodeRelationship.PARENT].node_id == long_node.node_id
        assert part.ref_doc_id == doc.doc_id
        assert doc.text[part.start_char_idx:part.end_char_idx] == part.text
        assert part.metadata["title"] == "long"
    # the parts tile the node (no overlap by default)
    spans = sorted((p.metadata["oprm_char_start"], p.metadata["oprm_char_end"]) for p in parts)
    assert spans[0][0] == 0 and spans[-1][1] == len(long_text)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
    # a node scored whole keeps its id; the index's node itself is not modified
    assert whole[0].node_id == short_node.node_id and whole[0].text == short_node.text
    assert set(short_node.metadata) == {"title"} and not short_node.excluded_llm_metadata_keys


def test_oprm_metadata_is_excluded_from_llm_and_embed_content(lm, docs, question):
    pp = OPRMNodePostprocessor(model=lm, top_n=5, chunk_tokens=CHUNK, idk_filter=False)
    out = pp.postprocess_nodes(as_nodes(docs, topic="codes"), query_str=question)
    assert out
    for n in out:
        assert set(OPRM_METADATA_KEYS) <= set(n.node.excluded_llm_metadata_keys)
        assert set(OPRM_METADATA_KEYS) <= set(n.node.excluded_embed_metadata_keys)
        assert "oprm_entropy" in n.node.metadata
        for mode in (MetadataMode.LLM, MetadataMode.EMBED):
            content = n.node.get_content(metadata_mode=mode)
            assert "topic: codes" in content  # the user's metadata still shows
            assert "oprm_" not in content
        assert "oprm_entropy" in n.node.get_content(metadata_mode=MetadataMode.ALL)


def test_events_and_callbacks(lm, docs, question, events):
    debug = LlamaDebugHandler()
    pp = OPRMNodePostprocessor(model=lm, top_n=2, chunk_tokens=CHUNK, idk_filter=False,
                               callback_manager=CallbackManager([debug]))
    nodes = as_nodes(docs)
    out = pp.postprocess_nodes(nodes, query_bundle=QueryBundle(question))
    starts = [e for e in events if isinstance(e, ReRankStartEvent)]
    ends = [e for e in events if isinstance(e, ReRankEndEvent)]
    assert len(starts) == 1 and len(ends) == 1
    assert starts[0].top_n == 2 and starts[0].model_name == lm.name and len(starts[0].nodes) == len(nodes)
    assert events.index(starts[0]) < events.index(ends[0])
    assert [n.node.node_id for n in ends[0].nodes] == [n.node.node_id for n in out]
    pairs = debug.get_event_pairs(CBEventType.RERANKING)
    assert len(pairs) == 1
    assert [n.node.node_id for n in pairs[0][1].payload["nodes"]] == [n.node.node_id for n in out]


def test_show_progress(lm, docs, question, capsys):
    OPRMNodePostprocessor(model=lm, chunk_tokens=CHUNK, show_progress=True, cache=False).postprocess_nodes(
        as_nodes(docs), query_str=question)
    assert "OPRM scoring" in capsys.readouterr().err
    OPRMNodePostprocessor(model=lm, chunk_tokens=CHUNK, cache=False).postprocess_nodes(
        as_nodes(docs), query_str=question)
    assert "OPRM scoring" not in capsys.readouterr().err


@pytest.mark.asyncio
async def test_async_path_scores_in_a_worker_thread(lm, docs, question, monkeypatch):
    threads: List[int] = []
    forward = lm.forward

    def recording_forward(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.get_ident())
        return forward(*args, **kwargs)

    pp = OPRMNodePostprocessor(model=lm, top_n=2, chunk_tokens=CHUNK, cache=False, idk_filter=False)
    sync = pp.postprocess_nodes(as_nodes(docs), query_str=question)
    monkeypatch.setattr(lm, "forward", recording_forward)
    out = await pp.apostprocess_nodes(as_nodes(docs), query_str=question)
    assert threads and threading.get_ident() not in threads
    assert [(n.node.metadata["oprm_char_start"], n.score) for n in out] == \
        [(n.node.metadata["oprm_char_start"], n.score) for n in sync]


def test_edge_cases(lm, question):
    pp = OPRMNodePostprocessor(model=lm, chunk_tokens=CHUNK)
    assert pp.postprocess_nodes([], query_str=question) == []
    assert pp.postprocess_nodes(as_nodes(["   "]), query_str=question) == []
    with pytest.raises(ValueError):
        pp.postprocess_nodes(as_nodes(["some text"]))


def test_options_are_the_cores_and_misspellings_are_refused(tmp_path):
    from pydantic import ValidationError

    from oprm_rag.options import SelectorOptions

    pp = OPRMNodePostprocessor(model=str(tmp_path / "m"), top_n=2, idk_threshold=0.4)
    assert pp.core_options() == SelectorOptions(top_k=2, idk_threshold=0.4)
    assert OPRMNodePostprocessor(model=str(tmp_path / "m")).core_options() == SelectorOptions()
    with pytest.raises(ValidationError, match="did you mean 'cache'"):
        OPRMNodePostprocessor(model=str(tmp_path / "m"), use_cache=False)
