"""OPRM against peers on the same work: model time per question and top-1 chunk hit rate.

One document, one chunking (OPRM's own chunks, sentence-aligned), many questions, the
same shipped model for everyone:

* **LlamaIndex ``LLMRerank``**: the LLM reads batches of chunks with the question and
  writes which ones to consult (through ``llama_index.llms.oprm.RecurrentLLM``);
* **question perplexity** (LongLLMLingua-style): rank chunks by log p(question | chunk),
  each question from scratch;
* **OPRM, cold**: every question pays the full speculative prefill (no cache);
* **OPRM**: the default, with the document state cache (the first question fills it).

A hit is a top-1 chunk that holds the fact the question asks about.

    python -m benchmarks.peers
    python -m benchmarks.peers --quick
"""

from __future__ import annotations

import random
import time

import torch

from benchmarks.common import parser, recall_document, setup, write
from oprm_rag import resolve


def _question_logprob_ranking(lm, chunks, q_ids: list[int], batch_tokens: int = 8192) -> int:
    """Index of the chunk under which the question is most likely (plain forwards, no reuse)."""
    seqs = [c.ids + q_ids for c in chunks]
    scores = []
    with torch.no_grad():
        for i in range(len(seqs)):
            ids = torch.tensor([seqs[i]])
            logp = torch.log_softmax(lm.model(input_ids=ids, use_cache=False).logits[0].float(), -1)
            n = len(seqs[i]) - len(q_ids)
            scores.append(sum(float(logp[n - 1 + j, q_ids[j]]) for j in range(len(q_ids))))
    return max(range(len(scores)), key=scores.__getitem__)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--questions", type=int, default=None)
    args = p.parse_args()
    lm = setup(args)
    from llama_index.core.postprocessor import LLMRerank
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
    from llama_index.llms.oprm import RecurrentLLM

    from oprm_rag import OPRMSelector
    from oprm_rag.storage.cache import DocumentStateCache
    from oprm_rag.demo.recall_task import question_for

    train = lm.training_context_tokens or 512
    chunk = max(64, train - 64)
    doc_tokens = 1024 if args.quick else 4096
    n_q = args.questions or (2 if args.quick else 20)
    doc = recall_document(lm, doc_tokens // 28, doc_tokens, seed=21)
    rng = random.Random(22)
    facts = rng.sample(list(zip(doc.facts, doc.fact_spans)), n_q)

    cached = OPRMSelector(lm, chunk_tokens=chunk, boundary="sentence", cache=DocumentStateCache())
    cold = OPRMSelector(lm, chunk_tokens=chunk, boundary="sentence", cache=False)
    probe = cold.select(question_for(facts[0][0].key), doc.text)
    chunks = probe.chunks
    from oprm_rag.chunking import DocumentTokens, chunk_document

    ids, offs = lm.encode_with_offsets(doc.text)
    raw_chunks = chunk_document(DocumentTokens(doc.text, ids, offs), 0, chunk, boundary="sentence")

    def gold(span) -> int:
        return next(i for i, c in enumerate(chunks) if c.char_start <= span[0] and span[1] <= c.char_end)

    llm = RecurrentLLM(model=lm, max_new_tokens=24)
    rerank = LLMRerank(llm=llm, choice_batch_size=5, top_n=1)
    methods = {"llm_rerank": [], "question_perplexity": [], "oprm_cold": [], "oprm": []}
    hits = {k: 0 for k in methods}
    failures = {k: 0 for k in methods}
    resolve(lm).forget()
    for fact, span in facts:
        q = question_for(fact.key)
        want = gold(span)
        nodes = [NodeWithScore(node=TextNode(text=c.text, id_=f"c{i}"), score=0.0) for i, c in enumerate(chunks)]
        t0 = time.perf_counter()
        try:
            out = rerank.postprocess_nodes(nodes, QueryBundle(q))
            got = int(out[0].node.id_[1:]) if out else -1
        except Exception:  # the model's reply could not be parsed into choices
            got, failures["llm_rerank"] = -1, failures["llm_rerank"] + 1
        methods["llm_rerank"].append(time.perf_counter() - t0)
        hits["llm_rerank"] += got == want

        q_ids = cold._question_ids(q)
        t0 = time.perf_counter()
        got = _question_logprob_ranking(lm, raw_chunks, q_ids)
        methods["question_perplexity"].append(time.perf_counter() - t0)
        hits["question_perplexity"] += got == want

        for name, sel in (("oprm_cold", cold), ("oprm", cached)):
            t0 = time.perf_counter()
            res = sel.select(q, doc.text)
            methods[name].append(time.perf_counter() - t0)
            best = res.best
            hits[name] += best is not None and best.index == want
            failures[name] += best is None
    rows = {k: {"seconds_per_question": sum(v) / len(v), "hit_rate": hits[k] / n_q, "failures": failures[k]}
            for k, v in methods.items()}
    for k in rows:
        rows[k]["time_vs_oprm"] = rows[k]["seconds_per_question"] / rows["oprm"]["seconds_per_question"]
    print(rows)

    def plot(fig) -> None:
        ax = fig.add_subplot(121)
        names = list(rows)
        ax.bar(names, [rows[n]["seconds_per_question"] for n in names], color=["#7f7f7f", "#bcbd22", "#17becf", "#2ca02c"])
        ax.set_yscale("log")
        ax.set_ylabel("model seconds per question (log)")
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
        ax2 = fig.add_subplot(122)
        ax2.bar(names, [rows[n]["hit_rate"] for n in names], color=["#7f7f7f", "#bcbd22", "#17becf", "#2ca02c"])
        ax2.set_ylim(0, 1.05)
        ax2.set_ylabel("top-1 chunk hit rate")
        ax2.tick_params(axis="x", labelrotation=30, labelsize=7)
        fig.suptitle(f"{n_q} questions over one {lm.count_tokens(doc.text)}-token document, "
                     f"{len(chunks)} chunks", fontsize=9)

    write("peers", args.out, {"model": lm.name, "doc_tokens": lm.count_tokens(doc.text), "chunks": len(chunks),
                              "questions": n_q, "results": rows, "target": "OPRM >= 10x less model time, "
                              "hit rate >= the peers'"}, plot, quick=args.quick)


if __name__ == "__main__":
    main()
