"""Follow-up questions on the families run from transformers' own caches (issue #21).

For each family (the hybrids Granite-4.0-H, Nemotron-H, Bamba, Zamba2, Falcon-H1, Jamba,
Qwen3-Next, LFM2; the purely recurrent xLSTM; a plain Llama) a random-init model of the
family's layer mix, a document of D tokens in chunks of L:

* ``first``: the first question (every chunk prefilled from P's state, states cached);
* ``follow_up``: a second question about the same document (cached chunk states: only Q
  runs per chunk), on the exact cache backend;
* ``replay_follow_up``: the same follow-up on the token-replay backend these families ran
  on before (every chunk's [P, C_i, Q] prefilled again).

It reports the speed-ups of the follow-up over both, the tokens the model embedded (a hook
on its embedding layer) against the document's, whether the answers agree, and the state
bytes per chunk at the chunk size used (a hybrid's attention keys grow with the chunk: the
fixed recurrent part and the bytes per token are reported apart). The models are tiny, so
per-call overhead weighs more than it would on a real checkpoint; the token counts do not
depend on the size.

    python -m benchmarks.hybrid_follow_up            # 8,192-token document, 512-token chunks
    python -m benchmarks.hybrid_follow_up --quick    # 512 tokens, 128-token chunks
"""

from __future__ import annotations

import copy
import time

from benchmarks.common import follow_up_plot, parser, time_follow_up, write


def _family(family: str, doc_tokens: int, chunk: int, repeat: int) -> dict:
    import torch

    from oprm_rag import OPRMSelector, RecurrentLM
    from oprm_rag.backends.replay import ReplayBackend
    from oprm_rag.testing import tiny_model

    model, tok = tiny_model(family)
    lm = RecurrentLM(model, tok, name=f"tiny-{family}")
    sentence = "The code of alpha is 1234. Long documents overflow a fixed size state. "
    text = sentence * max(1, doc_tokens // max(1, lm.count_tokens(sentence)))
    d = lm.count_tokens(text)
    question, follow = "What is the code of alpha?", "What is the code of beta?"
    opts = dict(chunk_tokens=chunk, idk_filter=False)

    run = time_follow_up(lm, text, question, follow, repeat, **opts)
    sel, first, again = run.selector, run.first, run.again
    t_first, t_follow = run.first_seconds, run.follow_up_seconds
    embedded_first, embedded_follow = run.embedded_first, run.embedded_follow_up

    # What these families ran on before: the same weights with the cache backend's verdict
    # set to "no", so backend selection falls through to the token replay.
    old = copy.deepcopy(model)
    old._oprm_cache_verdict, old._oprm_cache_why = False, "the benchmark's replay baseline"
    replay = RecurrentLM(old, tok, name=f"tiny-{family}-replay")
    assert isinstance(replay.backend, ReplayBackend)
    rsel = OPRMSelector(replay, **opts)
    rsel.answer(question, text, max_new_tokens=4)
    t0 = time.perf_counter()
    r_again = rsel.answer(follow, text, max_new_tokens=4)
    t_replay = time.perf_counter() - t0

    backend = lm.backend
    ids = torch.randint(2, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(input_ids=ids, use_cache=False).logits.float()
    cont = backend.forward(ids[:, 17:], backend.forward(ids[:, :17]).state, all_logits=True).logits
    prefix = len(sel._prefix_ids())
    per_chunk = backend.state_nbytes(prefix + sel.chunk_tokens)
    with torch.no_grad():
        params = sum(p.numel() for p in model.parameters())
    return {
        "family": family, "model_class": type(model).__name__, "backend": type(backend).__name__,
        "parameters": params, "doc_tokens": d, "chunk_tokens": sel.chunk_tokens, "chunks": len(first.chunks),
        "first_seconds": t_first, "follow_up_seconds": t_follow, "replay_follow_up_seconds": t_replay,
        "speedup_vs_first": t_first / t_follow, "speedup_vs_replay": t_replay / t_follow,
        "embedded_first": embedded_first, "embedded_follow_up": embedded_follow,
        "follow_up_embedded_fraction_of_doc": embedded_follow / d,
        "cached_chunks": again.usage.cached_chunks, "follow_up_input_tokens": again.usage.input_tokens,
        "same_answer_as_replay": again.text == r_again.text,
        "state_bytes_per_chunk": per_chunk, "state_fixed_bytes": backend.state_nbytes(0),
        "kv_bytes_per_token": backend.kv_bytes_per_token(), "prefix_tokens": prefix,
        "continuation_max_abs_logit_diff": float((cont - plain[:, 17:]).abs().max()),
    }


def main() -> None:
    from oprm_rag.testing import CACHE_FAMILIES

    p = parser(__doc__)
    p.add_argument("--families", nargs="*", default=list(CACHE_FAMILIES))
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    doc_tokens, chunk = (512, 128) if args.quick else (8192, 512)
    rows = []
    for family in args.families:
        row = _family(family, doc_tokens, chunk, 1 if args.quick else args.repeat)
        rows.append(row)
        print({k: row[k] for k in ("family", "chunks", "speedup_vs_first", "speedup_vs_replay",
                                   "follow_up_embedded_fraction_of_doc", "same_answer_as_replay",
                                   "state_bytes_per_chunk")}, flush=True)

    plot = follow_up_plot(rows, "speedup_vs_replay", "vs the replay follow-up", "state KiB per chunk (tiny models)")
    write("hybrid_follow_up", args.out, {"families": rows, "doc_tokens": doc_tokens, "chunk_tokens": chunk,
                                         "min_speedup_vs_replay": min(r["speedup_vs_replay"] for r in rows)},
          plot, quick=args.quick)


if __name__ == "__main__":
    main()
