"""Associative recall against the number of facts (the OPRM paper's Figure, on our model).

Documents are held-out prose with N facts ``The code of KEY is VALUE.`` (N = 16 ... 1024,
about 28 tokens of document per fact, so the largest reach ~29K tokens), from each
held-out prose source separately (``HELDOUT_SOURCES``: prose the model never trained
on). Each document gets questions about keys it holds (right: the code), about random
absent keys, and about near-miss absent keys (one letter changed, same prefix, ...; see
``near_miss_key``), where the right answer is ``Error``. Compared, all through
``OPRMSelector`` on the model's own defaults otherwise:

* ``plain``: plain inference (``chunk_tokens=None``: the whole document in one state);
* ``oprm``: the selector's defaults (``chunk_tokens="auto"``, the paper's rule: drop a
  chunk whose most likely first answer token is the IDK word, answer from the lowest
  entropy);
* ``oprm_idkp<T>``: also drop a chunk when its probability of the IDK word exceeds T
  (``idk_threshold``);
* ``oprm_no_idk``: without the IDK filter.

It also counts, from every chunk's first-token statistics (``Answer.chunks``), the
per-chunk false-positive rate: among (question, chunk) pairs where the chunk does not
hold the asked key, the share that the rule keeps; with a 95% interval from resampling
whole documents (the pairs of one document share its chunks, so they are not independent;
the binomial Clopper-Pearson interval over pairs is kept beside it as ``ci95_binomial``).
If every kept key-free chunk outranked the key's chunk, an answer would survive about
(1 - fp)^N with N chunks; the table's "outranked" column says how often one really does.
This rate is what decides the long-document end of the curve.

Chunk states are prepared once per document and chunking (the document cache); each
question then costs only its own tokens per chunk.

    python -m benchmarks.associative_recall            # full
    python -m benchmarks.associative_recall --quick    # < 2 min
"""

from __future__ import annotations

import math
import random
import time
from typing import Any

from benchmarks.common import parser, setup, write

TOKENS_PER_FACT = 28
THRESHOLDS = (0.5, 0.2, 0.1, 0.05)  # first-token rules measured from the statistics
THRESHOLD_CONFIGS = (0.2,)          # ... and run end to end as selector configurations


def clopper_pearson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Exact binomial interval for k successes in n trials (bisection on the binomial CDF)."""
    if n <= 0:
        return (0.0, 1.0)

    def cdf(x: int, p: float) -> float:  # P(X <= x)
        if x < 0:
            return 0.0
        if x >= n:
            return 1.0
        if p <= 0.0:
            return 1.0
        if p >= 1.0:
            return 0.0
        lp, lq = math.log(p), math.log1p(-p)
        return min(1.0, sum(math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
                                     + i * lp + (n - i) * lq) for i in range(x + 1)))

    def solve(f, target: float) -> float:  # f decreasing in p
        lo, hi = 0.0, 1.0
        for _ in range(80):
            mid = (lo + hi) / 2
            if f(mid) > target:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    lower = 0.0 if k == 0 else solve(lambda p: cdf(k - 1, p), 1.0 - alpha / 2)  # P(X >= k) = alpha/2
    upper = 1.0 if k == n else solve(lambda p: cdf(k, p), alpha / 2)             # P(X <= k) = alpha/2
    return lower, upper


def make_document(lm: Any, sentences: tuple[str, ...], n_facts: int, tokens: int, seed: int):
    """Prose of ``sentences`` with ``n_facts`` facts, about ``tokens`` model tokens long."""
    from oprm_rag.demo.recall_task import build_document

    doc = build_document(random.Random(seed), sentences, n_facts, int(tokens * 4.0))
    n = lm.count_tokens(doc.text)
    if not 0.95 * tokens <= n <= 1.05 * tokens:  # one correction for this tokenizer's chars per token
        doc = build_document(random.Random(seed), sentences, n_facts, int(tokens * 4.0 * tokens / max(1, n)))
    return doc


def _holds(chunk: Any, span: tuple[int, int] | None) -> str:
    """'key' if the chunk holds the whole fact, 'free' if none of it, 'part' if a piece."""
    if span is None:
        return "free"
    a, b = span
    if chunk.char_start <= a and b <= chunk.char_end:
        return "key"
    if b <= chunk.char_start or a >= chunk.char_end:
        return "free"
    return "part"


def _kept(score: Any, tau: float | None) -> bool:
    """Whether a rule keeps a chunk: the paper's (not IDK argmax), optionally also P(IDK) <= tau."""
    if score.is_idk or not getattr(score, "finite", True):
        return False
    return tau is None or score.idk_prob <= tau


def _answers(sel: Any, asks: list[tuple[str, str]], doc_text: str) -> list[tuple[str, Any]]:
    """(decoded answer, the answer's chunk scores) for every question about ``doc_text``."""
    from oprm_rag.demo import answer_all
    from oprm_rag.demo.recall_task import question_for

    answers = answer_all(sel, [question_for(key) for key, _ in asks], doc_text, max_new_tokens=6)
    return [(a.text.strip(), a.chunks) for a in answers]


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--docs", type=int, default=None, help="documents per fact count and source")
    p.add_argument("--present", type=int, default=None, help="questions about present keys per document")
    p.add_argument("--absent", type=int, default=None, help="questions about random absent keys per document")
    p.add_argument("--near", type=int, default=None, help="questions about near-miss absent keys per document")
    p.add_argument("--facts", type=int, nargs="*", default=None, help="fact counts")
    p.add_argument("--sources", nargs="*", default=None, help="held-out prose sources")
    args = p.parse_args()
    lm = setup(args)

    from oprm_rag import OPRMSelector
    from oprm_rag.storage.cache import DocumentStateCache
    from oprm_rag.demo.recall_task import HELDOUT_SOURCES, IDK_WORD, heldout_prose, near_miss_key, new_keys

    facts = args.facts or ([16, 128] if args.quick else [16, 32, 64, 128, 256, 512, 1024])
    sources = args.sources or list(HELDOUT_SOURCES)
    n_docs = args.docs or (1 if args.quick else 4)
    n_present = args.present or (4 if args.quick else 12)
    n_absent = args.absent or (3 if args.quick else 8)
    n_near = args.near if args.near is not None else (1 if args.quick else 4)
    configs: dict[str, dict[str, Any]] = {"plain": {"chunk_tokens": None}, "oprm": {}}
    for tau in THRESHOLD_CONFIGS:
        configs[f"oprm_idkp{round(tau * 100):02d}"] = {"idk_threshold": tau}
    configs["oprm_no_idk"] = {"idk_filter": False}
    chunk_tokens = OPRMSelector(lm, cache=False).chunk_tokens
    rules = {"paper": None, **{f"idk_prob>{t}": t for t in THRESHOLDS}}

    def blank() -> dict[str, Any]:
        return {name: {"right": 0, "asked": 0, "idk_right": 0, "idk_asked": 0, "near_right": 0, "near_asked": 0}
                for name in configs}

    def fp_blank() -> dict[str, Any]:
        return {"pairs": 0, "chunks": 0, "present_questions": 0, "per_doc": [],
                **{r: {"kept": 0, "key_dropped": 0, "outranked": 0} for r in rules}}

    rows: list[dict[str, Any]] = []
    fp_by_source = {s: fp_blank() for s in sources}
    fp_by_facts = {n: fp_blank() for n in facts}
    t_start = time.perf_counter()
    for n in facts:
        by_source = {}
        for source in sources:
            sentences = heldout_prose(source)
            stats = blank()
            doc_tokens = []
            for d in range(n_docs):
                seed = 1000 * n + d + 7919 * sources.index(source)
                doc = make_document(lm, sentences, n, TOKENS_PER_FACT * n, seed)
                doc_tokens.append(lm.count_tokens(doc.text))
                rng = random.Random(seed + 1)
                present = rng.sample(doc.facts, min(n_present, len(doc.facts)))
                keys = {f.key for f in doc.facts}
                spans = {f.key: s for f, s in zip(doc.facts, doc.fact_spans)}
                absent = new_keys(rng, n_absent, keys)
                near: list[str] = []
                for _ in range(n_near):
                    near.append(near_miss_key(rng, rng.choice(doc.facts).key, keys | set(absent) | set(near)))
                asks = ([(f.key, f.value, "present") for f in present] + [(k, IDK_WORD, "absent") for k in absent]
                        + [(k, IDK_WORD, "near") for k in near])
                # One cache for every configuration: its key holds the chunking, so configurations
                # that chunk alike share the chunk states.
                cache = DocumentStateCache(max_bytes=4 * 2**30)
                mark = fp_by_source[source]
                before = (mark["pairs"], {r: mark[r]["kept"] for r in rules})
                for name, kw in configs.items():
                    sel = OPRMSelector(lm, cache=cache, **kw)
                    answers = _answers(sel, [(k, v) for k, v, _ in asks], doc.text)
                    if name == "oprm" and answers:
                        for fp in (fp_by_source[source], fp_by_facts[n]):
                            fp["chunks"] += len(answers[0][1])  # distinct chunks of this document
                    for (key, want, kind), (got, chunks) in zip(asks, answers):
                        s = stats[name]
                        field = {"present": "", "absent": "idk_", "near": "near_"}[kind]
                        s[f"{field}asked"] += 1
                        s[f"{field}right"] += got == want
                        if name != "oprm":
                            continue
                        span = spans.get(key)
                        for fp in (fp_by_source[source], fp_by_facts[n]):
                            _count_fp(fp, rules, chunks, span, kind == "present")
                # this document's (key-free pairs, kept per rule): the clusters of the interval
                doc_tally = (mark["pairs"] - before[0], {r: mark[r]["kept"] - before[1][r] for r in rules})
                for fp in (fp_by_source[source], fp_by_facts[n]):
                    fp["per_doc"].append(doc_tally)
            row = {"facts": n, "source": source, "doc_tokens": round(sum(doc_tokens) / len(doc_tokens))}
            row.update(_rates(stats))
            rows.append(row)
            by_source[source] = stats
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        total = blank()
        for stats in by_source.values():
            for name, s in stats.items():
                for k, v in s.items():
                    total[name][k] += v
        row = {"facts": n, "source": "all",
               "doc_tokens": round(sum(r["doc_tokens"] for r in rows if r["facts"] == n) / len(sources))}
        row.update(_rates(total))
        rows.append(row)
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)

    overall = fp_blank()
    for fp in fp_by_source.values():
        _merge(overall, fp)
    false_positives = {"all": _fp_summary(overall, rules),
                       "by_source": {s: _fp_summary(fp, rules) for s, fp in fp_by_source.items()},
                       "by_facts": {str(n): _fp_summary(fp, rules) for n, fp in fp_by_facts.items()}}
    print("false positives (paper's rule):", false_positives["all"]["paper"], flush=True)

    def plot(fig) -> None:
        ax = fig.add_subplot(121)
        allrows = [r for r in rows if r["source"] == "all"]
        xs = [r["facts"] for r in allrows]
        palette = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#8c564b"]
        for (name, _), color in zip(configs.items(), palette):
            ax.plot(xs, [r[name] for r in allrows], marker="o", color=color, label=name,
                    ls="--" if name.endswith("no_idk") else "-")
        ax.plot(xs, [r["oprm_idk"] for r in allrows], color="#1f77b4", ls=":", marker="x",
                label="oprm: Error on absent keys")
        ax.axhspan(0.75, 0.85, color="#cccccc", alpha=0.4, label="paper: OPRM, Falcon-Mamba-7B")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("facts in the document")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{lm.name.split('/')[-1]}: all held-out sources", fontsize=9)
        ax.legend(fontsize=6, loc="lower left")
        ax2 = fig.add_subplot(122)
        for source, color in zip(sources, ["#1f77b4", "#ff7f0e", "#2ca02c", "#17becf"]):
            srows = [r for r in rows if r["source"] == source]
            ax2.plot(xs, [r["oprm"] for r in srows], color=color, marker="o", label=f"oprm, {source}")
            ax2.plot(xs, [r["plain"] for r in srows], color=color, ls="--", lw=0.8, label=f"plain, {source}")
        ax2.set_xscale("log", base=2)
        ax2.set_xticks(xs, [str(x) for x in xs])
        ax2.set_ylim(-0.02, 1.02)
        ax2.set_xlabel("facts in the document")
        ax2.set_title("present keys, by prose source", fontsize=9)
        ax2.legend(fontsize=6, loc="lower left")

    data = {
        "model": lm.name, "train_context_tokens": lm.training_context_tokens, "chunk_tokens": chunk_tokens,
        "tokens_per_fact": TOKENS_PER_FACT, "sources": sources,
        "docs_per_point": n_docs, "present_questions_per_doc": n_present,
        "absent_questions_per_doc": n_absent, "near_miss_questions_per_doc": n_near,
        "configs": configs, "rows": rows, "false_positives": false_positives,
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    }
    write("associative_recall", args.out, data, plot, quick=args.quick)
    print(markdown_tables(data))


def markdown_tables(data: dict[str, Any]) -> str:
    """The README's tables: accuracy per fact count (all sources), per source, and the
    per-chunk false-positive rate of each rule (95% interval: documents resampled)."""
    names = list(data["configs"])
    rows = data["rows"]
    head = "| facts | tokens | " + " | ".join(names) + " | `Error` on absent keys: " + ", ".join(
        names) + " | near misses: " + ", ".join(names) + " |"
    lines = [head, "|" + " --- |" * (len(names) + 4)]
    for r in (r for r in rows if r["source"] == "all"):
        lines.append(f"| {r['facts']} | {r['doc_tokens']:,} | " + " | ".join(f"{r[n]:.2f}" for n in names)
                     + " | " + " / ".join(f"{r[n + '_idk']:.2f}" for n in names)
                     + " | " + " / ".join(f"{r[n + '_idk_near']:.2f}" for n in names) + " |")
    sources = data["sources"]
    lines += ["", "| facts | " + " | ".join(f"{s}: plain, oprm, `Error`" for s in sources) + " |",
              "|" + " --- |" * (len(sources) + 1)]
    for n in sorted({r["facts"] for r in rows}):
        cells = []
        for s in sources:
            r = next(r for r in rows if r["facts"] == n and r["source"] == s)
            cells.append(f"{r['plain']:.2f}, {r['oprm']:.2f}, {r['oprm_idk']:.2f}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    fp = data["false_positives"]
    lines += ["", f"| rule | key-free chunks kept (all sources, {fp['all']['key_free_pairs']:,} (question, chunk) "
              f"pairs over {fp['all']['distinct_chunks']:,} chunks) | 95% CI (documents resampled) | "
              + " | ".join(sources) + " | key chunk dropped | key chunk outranked |",
              "|" + " --- |" * (len(sources) + 5)]
    for rule in fp["all"]:
        if not isinstance(fp["all"][rule], dict):
            continue
        a = fp["all"][rule]
        lines.append(f"| {rule} | {a['rate']:.3%} ({a['kept']}) | {a['ci95'][0]:.3%}-{a['ci95'][1]:.3%} | "
                     + " | ".join(f"{fp['by_source'][s][rule]['rate']:.3%}" for s in sources)
                     + f" | {a['key_chunk_dropped']:.3f} | {a['outranked_by_key_free_chunk']:.3f} |")
    return "\n".join(lines)


def _rates(stats: dict[str, dict[str, int]]) -> dict[str, float]:
    out = {}
    for name, s in stats.items():
        out[name] = s["right"] / max(1, s["asked"])
        out[f"{name}_idk"] = s["idk_right"] / max(1, s["idk_asked"])
        out[f"{name}_idk_near"] = s["near_right"] / max(1, s["near_asked"])
    return out


def _count_fp(fp: dict[str, Any], rules: dict[str, float | None], chunks: list[Any],
              span: tuple[int, int] | None, present: bool) -> None:
    """Add one question's chunk statistics: key-free chunks kept by each rule; for a present
    key, whether the rule dropped the key's chunk or kept a key-free chunk of lower entropy."""
    where = [_holds(c, span) for c in chunks]
    free = [c for c, w in zip(chunks, where) if w == "free"]
    key = [c for c, w in zip(chunks, where) if w == "key"]
    fp["pairs"] += len(free)
    present = present and bool(key)  # a fact cut across two chunks has no chunk of its own
    fp["present_questions"] += present
    for rule, tau in rules.items():
        r = fp[rule]
        r["kept"] += sum(_kept(c, tau) for c in free)
        if present and key:
            k = key[0]
            if not _kept(k, tau):
                r["key_dropped"] += 1
            elif any(_kept(c, tau) and c.entropy < k.entropy for c in free):
                r["outranked"] += 1


def document_bootstrap(per_doc: list[tuple[int, dict[str, int]]], rule: str, draws: int = 2000,
                       seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the pooled rate, resampling whole documents.

    The (question, chunk) pairs are not independent: every question about a document
    meets the same chunks, so a binomial interval over pairs (``ci95_binomial``) is too
    narrow. Documents are independent draws, so they are what is resampled.
    """
    docs = [(pairs, kept[rule]) for pairs, kept in per_doc if pairs]
    if not docs:
        return (0.0, 1.0)
    rng = random.Random(seed)
    rates = []
    for _ in range(draws):
        sample = [docs[rng.randrange(len(docs))] for _ in docs]
        rates.append(sum(k for _, k in sample) / sum(p for p, _ in sample))
    rates.sort()
    return rates[int(0.025 * (draws - 1))], rates[int(0.975 * (draws - 1))]


def _merge(into: dict[str, Any], other: dict[str, Any]) -> None:
    for k, v in other.items():
        if isinstance(v, dict):
            for kk, vv in v.items():
                into[k][kk] += vv
        else:
            into[k] += v


def _fp_summary(fp: dict[str, Any], rules: dict[str, float | None]) -> dict[str, Any]:
    out: dict[str, Any] = {"key_free_pairs": fp["pairs"], "distinct_chunks": fp["chunks"],
                           "present_questions": fp["present_questions"]}
    for rule in rules:
        r = fp[rule]
        lo, hi = clopper_pearson(r["kept"], fp["pairs"])
        out[rule] = {"kept": r["kept"], "rate": r["kept"] / max(1, fp["pairs"]),
                     "ci95": list(document_bootstrap(fp["per_doc"], rule)), "ci95_binomial": [lo, hi],
                     "key_chunk_dropped": r["key_dropped"] / max(1, fp["present_questions"]),
                     "outranked_by_key_free_chunk": r["outranked"] / max(1, fp["present_questions"])}
    return out


if __name__ == "__main__":
    main()
