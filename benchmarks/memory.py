"""Peak memory while answering over ever longer documents: bounded, not growing.

Each size runs in a fresh process (peak RSS is per process). Scoring streams over chunk
batches and keeps only the states that can still win, so the peak should depend on
batch and state size, not on the document. The document cache is off here (it is
bounded by its own byte budget, reported separately in its stats).

    python -m benchmarks.memory           # 8K, 64K, 256K, 1M tokens
    python -m benchmarks.memory --quick   # 2K, 16K

Scoring memory is set by ``max_batch_tokens`` (rows x tokens per model call), not by
the document: the benchmark sets it to the smallest document's size, so every size
runs full batches and the ratio measures what grows with the document.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import parser, recall_document, setup, write
from oprm_rag.demo.recall_task import question_for

# The child only loads the model, reads the document text and answers: its peak RSS is
# the answering peak (the document itself is built by the parent and passed as a file).
# Peak RSS is read from /proc/self/status (VmHWM), not getrusage: Linux carries ru_maxrss
# across fork and exec, so a child would report the parent's (document-building) peak.
CHILD = r"""
import json, sys, time
from pathlib import Path
from oprm_rag import DEMO_MODEL, OPRMSelector
from oprm_rag.engine.resolve import load_model
path, question, model, chunk, batch_tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
lm = load_model(model or DEMO_MODEL)
def hwm_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
text = Path(path).read_text()
base = hwm_kib()
t0 = time.perf_counter()
ans = OPRMSelector(lm, chunk_tokens=chunk, max_batch_tokens=batch_tokens, cache=False).answer(question, text, max_new_tokens=5)
print(json.dumps({"chunks": len(ans.chunks), "seconds": time.perf_counter() - t0,
                  "peak_rss_mib": hwm_kib() / 1024,
                  "rss_before_answer_mib": base / 1024, "doc_chars": len(text), "answer": ans.text}))
"""


def main() -> None:
    p = parser(__doc__)
    args = p.parse_args()
    sizes = [2048, 16384] if args.quick else [8192, 65536, 262144, 1048576]
    chunk, batch_tokens = (256, 2048) if args.quick else (1024, 8192)
    lm = setup(args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            doc = recall_document(lm, max(1, n // 28), n, seed=5)
            f = Path(tmp) / f"doc_{n}.txt"
            f.write_text(doc.text)
            q = question_for(doc.facts[len(doc.facts) // 2].key)
            out = subprocess.run([sys.executable, "-c", CHILD, str(f), q, args.model or "", str(chunk), str(batch_tokens)], capture_output=True,
                                 text=True, check=True)
            rows.append({"tokens": lm.count_tokens(doc.text), **json.loads(out.stdout.strip().splitlines()[-1])})
            print(rows[-1], flush=True)
    base = rows[0]["peak_rss_mib"]
    for r in rows:
        r["ratio_to_smallest"] = r["peak_rss_mib"] / base

    def plot(fig) -> None:
        ax = fig.add_subplot(111)
        xs = [r["tokens"] for r in rows]
        ax.plot(xs, [r["peak_rss_mib"] for r in rows], "o-", label="peak RSS while answering")
        ax.plot(xs, [r["rss_before_answer_mib"] for r in rows], "s--", label="RSS with document loaded")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("document tokens")
        ax.set_ylabel("MiB")
        ax.set_ylim(0, max(r["peak_rss_mib"] for r in rows) * 1.3)
        ax.set_title(f"Memory: {rows[-1]['tokens']} tokens at {rows[-1]['ratio_to_smallest']:.2f}x "
                     f"the {rows[0]['tokens']}-token peak", fontsize=9)
        ax.legend(fontsize=8)

    write("memory", args.out, {"rows": rows, "chunk_tokens": chunk, "max_batch_tokens": batch_tokens, "cache": "off",
                               "target_ratio_largest_to_smallest": 1.1}, plot, quick=args.quick)


if __name__ == "__main__":
    main()
