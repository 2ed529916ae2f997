"""Follow-up questions at the cost of the question alone (the document state cache).

A document of D tokens, chunks of L tokens (N = D / L), a question of |Q| tokens. The
first question prefills every chunk; a follow-up reuses the cached chunk states and
prefills only Q per chunk, so the speed-up is bounded by about D / (N |Q|) (plus the
per-call overhead on both sides). Both sides answer with the same few decoded tokens.

    python -m benchmarks.follow_up          # 32K-token document, chunks of 1K
    python -m benchmarks.follow_up --quick
"""

from __future__ import annotations

from benchmarks.common import document_run, recall_document, timed, write


def main() -> None:
    args, lm, doc_tokens, chunk, repeat = document_run(__doc__)
    from oprm_rag import OPRMSelector
    from oprm_rag.cache import DocumentStateCache
    from oprm_rag.demo.recall_task import question_for

    doc = recall_document(lm, doc_tokens // 28, doc_tokens, seed=3)
    key = doc.facts[len(doc.facts) // 2]
    # about 30 tokens of question (the template adds its own words)
    question = question_for(key.key) + " Reply with the four digits of that code only, nothing else."

    def first():
        lm._prefix_states.clear()  # cold: nothing memoised, nothing cached
        sel = OPRMSelector(lm, chunk_tokens=chunk, cache=DocumentStateCache(max_bytes=8 * 2**30))
        return sel, sel.answer(question, doc.text, max_new_tokens=5)

    t_first, (sel, ans_first) = timed(first, repeat)
    t_follow, ans_follow = timed(lambda: sel.answer(question, doc.text, max_new_tokens=5), max(3, repeat))
    n_chunks = len(ans_first.chunks)
    q_tokens = len(sel._question_ids(question))
    d = lm.count_tokens(doc.text)
    result = {
        "model": lm.name, "doc_tokens": d, "chunk_tokens": chunk, "chunks": n_chunks, "question_tokens": q_tokens,
        "first_seconds": t_first, "follow_up_seconds": t_follow, "speedup": t_first / t_follow,
        "token_bound": d / (n_chunks * q_tokens),
        "first_prefill_tokens": ans_first.usage.input_tokens, "follow_up_prefill_tokens": ans_follow.usage.input_tokens,
        "same_answer": ans_first.text == ans_follow.text, "answer": ans_first.text,
        "cache": sel.cache.stats(), "target_speedup": 25,
    }
    print({k: result[k] for k in ("speedup", "token_bound", "first_seconds", "follow_up_seconds", "same_answer")})

    def plot(fig) -> None:
        ax = fig.add_subplot(111)
        ax.bar(["first question", "follow-up"], [t_first, t_follow], color=["#7f7f7f", "#2ca02c"])
        ax.set_ylabel("seconds (select + 5-token answer)")
        ax.set_title(f"Follow-up speed: {result['speedup']:.1f}x (token bound {result['token_bound']:.1f}x), "
                     f"{d} tokens, {n_chunks} chunks, |Q|={q_tokens}", fontsize=9)

    write("follow_up", args.out, result, plot, quick=args.quick)


if __name__ == "__main__":
    main()
