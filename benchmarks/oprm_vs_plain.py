"""OPRM's selection time against one plain prefill of the whole document.

OPRM prefills every chunk from the shared-prefix state (computed once, then expanded)
and then the question from each chunk's state: D + N |Q| tokens, in batches. Plain
inference prefills P + D + Q once. The ratio says what chunk-level selection costs.

    python -m benchmarks.oprm_vs_plain          # 32K tokens, chunks of 1K
    python -m benchmarks.oprm_vs_plain --quick
"""

from __future__ import annotations

from benchmarks.common import document_run, recall_document, timed, write
from oprm_rag import resolve


def main() -> None:
    args, lm, doc_tokens, chunk, repeat = document_run(__doc__)
    from oprm_rag import OPRMSelector
    from oprm_rag.demo.recall_task import question_for

    doc = recall_document(lm, doc_tokens // 28, doc_tokens, seed=4)
    question = question_for(doc.facts[3].key)
    sel = OPRMSelector(lm, chunk_tokens=chunk, cache=False)
    prefix, q_ids = sel._prefix_ids(), sel._question_ids(question)
    doc_ids = lm.encode(doc.text)
    resolve(lm).start(prefix)  # the shared prefix: computed once, kept

    t_plain, _ = timed(lambda: lm.prefill(prefix + doc_ids + q_ids), repeat)
    t_oprm, res = timed(lambda: sel.select(question, doc.text), repeat)
    result = {
        "model": lm.name, "doc_tokens": len(doc_ids), "chunk_tokens": chunk, "chunks": len(res.chunks),
        "question_tokens": len(q_ids), "plain_prefill_seconds": t_plain, "oprm_select_seconds": t_oprm,
        "ratio": t_oprm / t_plain, "extra_tokens_fraction": len(res.chunks) * len(q_ids) / len(doc_ids),
        "max_batch_tokens": sel.options.max_batch_tokens, "target_ratio": 1.05,
    }
    print({k: result[k] for k in ("ratio", "plain_prefill_seconds", "oprm_select_seconds")})

    def plot(fig) -> None:
        ax = fig.add_subplot(111)
        ax.bar(["plain prefill", "OPRM selection"], [t_plain, t_oprm], color=["#7f7f7f", "#1f77b4"])
        ax.set_ylabel("seconds")
        ax.set_title(f"OPRM / plain = {result['ratio']:.2f}x on {len(doc_ids)} tokens "
                     f"({len(res.chunks)} chunks of {chunk})", fontsize=9)

    write("oprm_vs_plain", args.out, result, plot, quick=args.quick)


if __name__ == "__main__":
    main()
