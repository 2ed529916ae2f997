"""The state handoff: a chat model that receives the selector's prompt skips its prefill.

After the LangChain ``OPRMSelector`` scores the chunks, the state after ``[P, C, Q]`` of
the winner is registered on the shared model. ``ChatRecurrent`` receiving the messages
``create_oprm_qa_chain`` builds resumes from it. Here the same messages are answered
twice: with the handoff, and after clearing the registry (a full prefill). The answers
must be equal; the prefill-token counter and the time show the saving.

    python -m benchmarks.handoff
    python -m benchmarks.handoff --quick
"""

from __future__ import annotations

import time

from benchmarks.common import parser, recall_document, setup, write
from oprm_rag import resolve


def main() -> None:
    p = parser(__doc__)
    args = p.parse_args()
    lm = setup(args)
    from langchain_oprm import ChatRecurrent, OPRMSelector
    from langchain_oprm.chains import oprm_prompt_messages

    from oprm_rag.demo.recall_task import question_for

    train = lm.training_context_tokens or 512
    chunk = max(64, train - 64)
    doc = recall_document(lm, 48, 48 * 28, seed=31)
    keys = [f.key for f in doc.facts[:: max(1, len(doc.facts) // (3 if args.quick else 10))]]
    sel = OPRMSelector(model=lm, chunk_tokens=chunk, boundary="sentence")
    chat = ChatRecurrent(model=lm, max_tokens=8)
    rows = []
    for key in keys:
        q = question_for(key)
        picked = sel.invoke({"question": q, "documents": doc.text})
        messages = oprm_prompt_messages(sel, q, picked)
        p0, t0 = lm.counters["prefill_tokens"], time.perf_counter()
        hit = chat.invoke(messages)
        t_hit, p_hit = time.perf_counter() - t0, lm.counters["prefill_tokens"] - p0
        resolve(lm).handoff.clear()
        p0, t0 = lm.counters["prefill_tokens"], time.perf_counter()
        miss = chat.invoke(messages)
        t_miss, p_miss = time.perf_counter() - t0, lm.counters["prefill_tokens"] - p0
        rows.append({"question": q, "handoff_hit": bool(hit.response_metadata.get("oprm_handoff_hit")),
                     "same_answer": hit.content == miss.content, "prefill_tokens_with": p_hit,
                     "prefill_tokens_without": p_miss, "seconds_with": t_hit, "seconds_without": t_miss})
        print(rows[-1], flush=True)
    summary = {
        "hits": sum(r["handoff_hit"] for r in rows), "questions": len(rows),
        "all_same_answers": all(r["same_answer"] for r in rows),
        "prefill_tokens_with": sum(r["prefill_tokens_with"] for r in rows),
        "prefill_tokens_without": sum(r["prefill_tokens_without"] for r in rows),
        "time_ratio_without_over_with": sum(r["seconds_without"] for r in rows) / sum(r["seconds_with"] for r in rows),
    }
    print(summary)

    def plot(fig) -> None:
        ax = fig.add_subplot(111)
        ax.bar(["with handoff", "without"], [summary["prefill_tokens_with"], summary["prefill_tokens_without"]],
               color=["#2ca02c", "#7f7f7f"])
        ax.set_ylabel("prompt tokens prefilled by the chat model")
        ax.set_title(f"Handoff: {summary['hits']}/{summary['questions']} hits, same answers: "
                     f"{summary['all_same_answers']}, {summary['time_ratio_without_over_with']:.1f}x time", fontsize=9)

    write("handoff", args.out, {"model": lm.name, "chunk_tokens": chunk, "rows": rows, "summary": summary}, plot,
          quick=args.quick)


if __name__ == "__main__":
    main()
