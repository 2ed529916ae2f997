"""Associative recall against the number of facts (the OPRM paper's Figure, on our model).

Documents are held-out prose with N facts ``The code of KEY is VALUE.`` (N = 16 ... 1024,
about 28 tokens of document per fact, so the largest reach ~29K tokens). For each
document we ask about keys that are present (accuracy = the decoded answer equals the
code) and keys that are absent (the right answer is ``Error``). Compared:

* plain inference (``chunk_tokens=None``: the whole document in one state);
* OPRM at two chunk sizes (sentence-aligned chunks);
* OPRM at the larger chunk size without the IDK filter.

Chunk states are prepared once per document and configuration (the document cache);
each question then costs only its own tokens per chunk, which keeps the full run short.

    python -m benchmarks.associative_recall            # full (< 20 min on 2 cores)
    python -m benchmarks.associative_recall --quick    # < 2 min
"""

from __future__ import annotations

import random
import time

from benchmarks.common import parser, recall_document, setup, write

TOKENS_PER_FACT = 28


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--docs", type=int, default=None, help="documents per fact count")
    p.add_argument("--present", type=int, default=None, help="questions about present keys per document")
    p.add_argument("--absent", type=int, default=None, help="questions about absent keys per document")
    args = p.parse_args()
    lm = setup(args)

    from oprm_rag import OPRMSelector
    from oprm_rag.cache import DocumentStateCache
    from oprm_rag.demo.recall_task import IDK_WORD, question_for, random_key

    facts = [16, 128] if args.quick else [16, 32, 64, 128, 256, 512, 1024]
    n_docs = args.docs or (1 if args.quick else 2)
    n_present = args.present or (6 if args.quick else 24)
    n_absent = args.absent or (2 if args.quick else 8)
    train = lm.training_context_tokens or 512
    big = max(64, train - 64)
    small = big // 2
    configs = {
        "plain": dict(chunk_tokens=None),
        f"oprm_{small}": dict(chunk_tokens=small, boundary="sentence"),
        f"oprm_{big}": dict(chunk_tokens=big, boundary="sentence"),
        f"oprm_{big}_no_idk": dict(chunk_tokens=big, boundary="sentence", idk_filter=False),
    }
    rows = []
    t_start = time.perf_counter()
    for n in facts:
        stats = {name: {"right": 0, "asked": 0, "idk_right": 0, "idk_asked": 0} for name in configs}
        doc_tokens = []
        for d in range(n_docs):
            seed = 1000 * n + d
            doc = recall_document(lm, n, TOKENS_PER_FACT * n, seed)
            doc_tokens.append(lm.count_tokens(doc.text))
            rng = random.Random(seed + 1)
            present = rng.sample(doc.facts, min(n_present, len(doc.facts)))
            keys = {f.key for f in doc.facts}
            absent = []
            while len(absent) < n_absent:
                k = random_key(rng)
                if k not in keys:
                    absent.append(k)
            asks = [(f.key, f.value) for f in present] + [(k, IDK_WORD) for k in absent]
            # One cache for every configuration: its key holds the chunking, so configurations
            # that chunk alike (with and without the IDK filter) share the chunk states.
            cache = DocumentStateCache(max_bytes=4 * 2**30)
            for name, kw in configs.items():
                sel = OPRMSelector(lm, cache=cache, **kw)
                for key, want in asks:
                    got = sel.answer(question_for(key), doc.text, max_new_tokens=6).text.strip()
                    s = stats[name]
                    if want == IDK_WORD:
                        s["idk_asked"] += 1
                        s["idk_right"] += got == IDK_WORD
                    else:
                        s["asked"] += 1
                        s["right"] += got == want
        row = {"facts": n, "doc_tokens": round(sum(doc_tokens) / len(doc_tokens))}
        for name, s in stats.items():
            row[name] = s["right"] / max(1, s["asked"])
            row[f"{name}_idk"] = s["idk_right"] / max(1, s["idk_asked"])
        rows.append(row)
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)

    def plot(fig) -> None:
        ax = fig.add_subplot(111)
        styles = {"plain": ("#d62728", "o", "-"), f"oprm_{small}": ("#1f77b4", "s", "-"),
                  f"oprm_{big}": ("#2ca02c", "^", "-"), f"oprm_{big}_no_idk": ("#9467bd", "v", "--")}
        labels = {"plain": "plain inference", f"oprm_{small}": f"OPRM, chunks of {small}",
                  f"oprm_{big}": f"OPRM, chunks of {big}", f"oprm_{big}_no_idk": f"OPRM {big}, no IDK filter"}
        xs = [r["facts"] for r in rows]
        for name, (c, m, ls) in styles.items():
            ax.plot(xs, [r[name] for r in rows], color=c, marker=m, ls=ls, label=labels[name])
        ax.axhspan(0.75, 0.85, color="#cccccc", alpha=0.4, label="paper: OPRM on Falcon-Mamba-7B")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("facts in the document")
        ax.set_ylabel("recall accuracy (present keys)")
        ax.set_title(f"Associative recall, {lm.name.split('/')[-1]} (trained on {train}-token contexts)", fontsize=10)
        ax.legend(fontsize=8, loc="lower left")

    write("associative_recall", args.out, {
        "model": lm.name, "train_context_tokens": train, "tokens_per_fact": TOKENS_PER_FACT,
        "docs_per_point": n_docs, "present_questions_per_doc": n_present, "absent_questions_per_doc": n_absent,
        "configs": {k: {kk: vv for kk, vv in v.items()} for k, v in configs.items()},
        "rows": rows, "wall_seconds": round(time.perf_counter() - t_start, 1),
    }, plot, quick=args.quick)


if __name__ == "__main__":
    main()
