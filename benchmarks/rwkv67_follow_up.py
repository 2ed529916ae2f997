"""Follow-up questions on native RWKV-6 and RWKV-7 (issue #21): cached chunk states.

For each version, a random BlinkDL-format ``.pth`` loaded through the public API
(``RecurrentLM.from_pretrained``), a document of D tokens in chunks of L:

* ``first``: the first question (every chunk prefilled from P's state, states cached);
* ``follow_up``: a second question about the same document (cached chunk states: only Q
  runs per chunk);
* ``uncached_follow_up``: the same question without the document cache (every chunk
  prefilled again from P's memoised state: at least what the token-replay fallback
  these models ran on before cost, which re-prefills [P, C_i, Q] in full).

It reports the speed-ups of the follow-up over both, the tokens the model embedded (a hook
on its embedding layer) against the document's, whether cached and uncached answers
agree, and the state bytes per chunk (fixed: an RWKV state does not grow with the chunk).
The models are small and random, so per-call overhead weighs more than on a real
checkpoint; the token counts do not depend on the size.

    python -m benchmarks.rwkv67_follow_up            # 4,096-token document, 512-token chunks
    python -m benchmarks.rwkv67_follow_up --quick    # 1,024 tokens, 128-token chunks
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from benchmarks.common import follow_up_plot, parser, time_follow_up, write


def _version(version: int, doc_tokens: int, chunk: int, repeat: int, size: dict, folder: Path) -> dict:
    from oprm_rag import OPRMSelector, RecurrentLM
    from oprm_rag.rwkv_testing import save_rwkv_pth

    path = save_rwkv_pth(folder / f"v{version}", version, **size)
    lm = RecurrentLM.from_pretrained(path, dtype="float32")
    sentence = "The code of alpha is 1234. The code of beta is 5678. "
    text = sentence * max(1, doc_tokens // max(1, lm.count_tokens(sentence)))
    d = lm.count_tokens(text)
    question, follow = "What is the code of alpha?", "What is the code of beta?"
    opts = dict(chunk_tokens=chunk, idk_filter=False)
    run = time_follow_up(lm, text, question, follow, repeat, **opts)
    sel, first, again = run.selector, run.first, run.again
    t_first, t_follow, embedded_follow = run.first_seconds, run.follow_up_seconds, run.embedded_follow_up
    plain = OPRMSelector(lm, cache=False, **opts)
    plain.answer(question, text, max_new_tokens=1)  # P's state memoised, as for the cached one
    t0 = time.perf_counter()
    uncached = plain.answer(follow, text, max_new_tokens=4)
    t_uncached = time.perf_counter() - t0
    params = sum(p.numel() for p in lm.model.parameters())
    return {
        "family": lm.family, "backend": type(lm.backend).__name__, "parameters": params, "doc_tokens": d,
        "chunk_tokens": sel.chunk_tokens, "chunks": len(first.chunks), "first_seconds": t_first,
        "follow_up_seconds": t_follow, "uncached_follow_up_seconds": t_uncached,
        "speedup_vs_first": t_first / t_follow, "speedup_vs_uncached": t_uncached / t_follow,
        "embedded_follow_up": embedded_follow, "follow_up_embedded_fraction_of_doc": embedded_follow / d,
        "cached_chunks": again.usage.cached_chunks, "follow_up_input_tokens": again.usage.input_tokens,
        "same_answer_as_uncached": again.text == uncached.text,
        "state_bytes_per_chunk": lm.state_nbytes,
    }


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.quick:
        doc_tokens, chunk, size = 1024, 128, dict(layers=2, hidden=128, head_size=64, vocab=512)
    else:
        doc_tokens, chunk, size = 4096, 512, dict(layers=4, hidden=256, head_size=64, vocab=512)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for version in (6, 7):
            row = _version(version, doc_tokens, chunk, 1 if args.quick else args.repeat, size, Path(tmp))
            rows.append(row)
            print({k: row[k] for k in ("family", "chunks", "speedup_vs_first", "speedup_vs_uncached",
                                       "follow_up_embedded_fraction_of_doc", "same_answer_as_uncached",
                                       "state_bytes_per_chunk")}, flush=True)

    plot = follow_up_plot(rows, "speedup_vs_uncached", "vs the uncached follow-up", "state KiB per chunk (fixed)")
    write("rwkv67_follow_up", args.out, {"families": rows, "doc_tokens": doc_tokens, "chunk_tokens": chunk,
                                         "model_size": size,
                                         "min_speedup_vs_uncached": min(r["speedup_vs_uncached"] for r in rows)},
          plot, quick=args.quick)


if __name__ == "__main__":
    main()
