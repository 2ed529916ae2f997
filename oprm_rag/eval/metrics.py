"""LongBench's metrics, as LongBench defines them, and the LongBench v2 accuracy.

Each function follows the definition in THUDM/LongBench (``LongBench/metrics.py`` and
``eval.py`` for v1, ``pred.py`` and ``result.py`` for v2), re-implemented here so the
numbers we print are the numbers LongBench's own scripts would print for the same
predictions. Where LongBench's code has a quirk that changes scores, we keep it and say
so; where it leans on a library, we use a maintained one and say how it maps:

* **ROUGE-L** — LongBench calls the ``rouge`` package (pltrdy): *summary-level* ROUGE-L
  over sentences cut at ``.``, words split on spaces (no lower-casing, punctuation kept),
  counting distinct words. Google's ``rouge-score`` computes a different quantity
  (lower-cased alphanumeric tokens, no sentence split, repeated words counted), so its
  numbers would not match the paper's. :func:`rouge_l` re-implements the ``rouge``
  package's definition in a few lines instead. One difference: that package's recursive
  LCS back-trace raises ``RecursionError`` on sentence pairs of ~1,000+ words, which
  LongBench scores as 0; ours scores them.
* **Code edit similarity** — LongBench uses ``fuzzywuzzy.fuzz.ratio`` (an integer 0-100);
  with ``python-Levenshtein`` installed that is the Indel similarity, which ``rapidfuzz``
  computes (we round it to an integer the same way). Without ``python-Levenshtein``,
  fuzzywuzzy falls back to ``difflib`` and can differ by a point or two.
* **Chinese** — LongBench segments with ``jieba``; so do we (an optional dependency,
  asked for by name when a Chinese dataset is scored without it).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Any, Callable, Iterable, Mapping, Sequence

from ..errors import InputError

__all__ = [
    "normalize_answer", "normalize_zh_answer", "token_f1", "qa_f1", "qa_f1_zh", "rouge_l", "rouge_l_zh",
    "classification_score", "retrieval_score", "retrieval_zh_score", "count_score", "code_sim_score",
    "DATASET_METRIC", "FIRST_LINE_DATASETS", "CATEGORIES", "score_example", "extract_choice",
    "v2_accuracy", "mean_percent",
]

_CN_PUNCTUATION = ("！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿"
                   "–—‘’‛“”„‟…‧﹏.")
_EN_PUNCT = set(string.punctuation)
_ZH_PUNCT = set(string.punctuation + _CN_PUNCTUATION)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NUMBER = re.compile(r"\d+")


# ---------------------------------------------------------------------- normalisation
def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lower-case, drop punctuation, drop a/an/the, squeeze spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _EN_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalize_zh_answer(text: str) -> str:
    """Chinese normalisation: lower-case, drop ASCII and CJK punctuation, drop all spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _ZH_PUNCT)
    return "".join(text.split())


def _jieba_cut(text: str) -> list[str]:
    try:
        import jieba
    except ImportError:
        raise InputError("scoring a Chinese LongBench dataset needs jieba (LongBench segments Chinese with "
                         "it): pip install jieba, or pip install 'oprm-rag[eval]'") from None
    jieba.setLogLevel(60)  # its "Building prefix dict" chatter goes to the log, not the terminal
    return list(jieba.cut(text, cut_all=False))


# ---------------------------------------------------------------------- QA F1
def token_f1(prediction: Sequence[str], reference: Sequence[str]) -> float:
    """F1 of two token lists, counting repeated tokens (bag of words)."""
    same = sum((Counter(prediction) & Counter(reference)).values())
    if same == 0:
        return 0.0
    precision = same / len(prediction)
    recall = same / len(reference)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, reference: str, **_: Any) -> float:
    """LongBench ``qa_f1_score``: token F1 after :func:`normalize_answer`."""
    return token_f1(normalize_answer(prediction).split(), normalize_answer(reference).split())


def qa_f1_zh(prediction: str, reference: str, **_: Any) -> float:
    """LongBench ``qa_f1_zh_score``: jieba words, each normalised, empty ones dropped."""
    pred = [t for t in (normalize_zh_answer(w) for w in _jieba_cut(prediction)) if t]
    ref = [t for t in (normalize_zh_answer(w) for w in _jieba_cut(reference)) if t]
    return token_f1(pred, ref)


# ---------------------------------------------------------------------- ROUGE-L
def _sentences(text: str) -> list[str]:
    # The rouge package: cut at '.', keep every non-empty piece, squeeze its whitespace.
    return [" ".join(piece.split()) for piece in text.split(".") if len(piece) > 0]


def _lcs_words(ref: list[str], hyp: list[str]) -> set[str]:
    """Words of the LCS of ``ref`` and ``hyp`` along the rouge package's back-trace.

    Which LCS is taken matters (words are counted as a set): at a mismatch the trace goes
    up when the cell above is strictly larger, else left.
    """
    n, m = len(ref), len(hyp)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        ri, row, prev = ref[i - 1], table[i], table[i - 1]
        for j in range(1, m + 1):
            row[j] = prev[j - 1] + 1 if ri == hyp[j - 1] else max(prev[j], row[j - 1])
    words: set[str] = set()
    i, j = n, m
    while i > 0 and j > 0:
        if ref[i - 1] == hyp[j - 1]:
            words.add(ref[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def rouge_l(prediction: str, reference: str, **_: Any) -> float:
    """LongBench ``rouge_score``: the ``rouge`` package's summary-level ROUGE-L F.

    R = |U| / distinct reference words, P = |U| / distinct prediction words, where U is
    the union of the LCS word sets of every (reference sentence, prediction sentence)
    pair; F = 2PR / (P + R + 1e-8). An empty side scores 0 (the package raises and
    LongBench returns 0).
    """
    hyp, ref = _sentences(prediction), _sentences(reference)
    if not hyp or not ref:
        return 0.0
    hyp_words = [s.split(" ") for s in hyp]
    ref_words = [s.split(" ") for s in ref]
    n_ref = len({w for s in ref_words for w in s})
    n_hyp = len({w for s in hyp_words for w in s})
    union: set[str] = set()
    for r in ref_words:
        for h in hyp_words:
            union |= _lcs_words(r, h)
    recall, precision = len(union) / n_ref, len(union) / n_hyp
    return 2.0 * (precision * recall) / (precision + recall + 1e-8)


def rouge_l_zh(prediction: str, reference: str, **_: Any) -> float:
    """LongBench ``rouge_zh_score``: ROUGE-L over jieba words joined by spaces."""
    return rouge_l(" ".join(_jieba_cut(prediction)), " ".join(_jieba_cut(reference)))


# ---------------------------------------------------------------------- classification, retrieval, count
def classification_score(prediction: str, reference: str, *, all_classes: Sequence[str] | None = None,
                         **_: Any) -> float:
    """LongBench ``classification_score``: 1/k when the reference is among the k class names
    found in the prediction, after dropping names that are strict substrings of the reference.

    LongBench removes those names from the list while iterating over it, which skips the
    name right after each removal; we keep that behaviour so scores match.
    """
    if not all_classes:
        raise InputError("classification scoring needs the example's all_classes list")
    matched = [c for c in all_classes if c in prediction]
    i = 0
    while i < len(matched):
        term = matched[i]
        if term in reference and term != reference:
            del matched[i]
        i += 1  # after a removal this steps over the next name, as LongBench's loop does
    return 1.0 / len(matched) if reference in matched else 0.0


def _share_of_numbers(prediction: str, target: str) -> float:
    numbers = _NUMBER.findall(prediction)
    if not numbers:
        return 0.0
    return sum(1 for n in numbers if n == target) / len(numbers)


def retrieval_score(prediction: str, reference: str, **_: Any) -> float:
    """LongBench ``retrieval_score``: the share of numbers in the prediction that are the
    paragraph number of the reference (``Paragraph N``)."""
    found = re.findall(r"Paragraph (\d+)", reference)
    if not found:
        raise InputError(f"a passage_retrieval_en answer must read 'Paragraph N', got {reference!r}")
    return _share_of_numbers(prediction, found[0])


def retrieval_zh_score(prediction: str, reference: str, **_: Any) -> float:
    """LongBench ``retrieval_zh_score``: as :func:`retrieval_score`, references ``段落N``."""
    found = re.findall(r"段落(\d+)", reference)
    if not found:
        raise InputError(f"a passage_retrieval_zh answer must read '段落N', got {reference!r}")
    return _share_of_numbers(prediction, found[0])


def count_score(prediction: str, reference: str, **_: Any) -> float:
    """LongBench ``count_score``: the share of numbers in the prediction equal to the count."""
    return _share_of_numbers(prediction, str(reference))


# ---------------------------------------------------------------------- code
def code_sim_score(prediction: str, reference: str, **_: Any) -> float:
    """LongBench ``code_sim_score``: edit similarity of the first line that is not a comment
    or a code fence (no `` ` ``, ``#`` or ``//``), as ``fuzz.ratio`` / 100."""
    line = ""
    for candidate in prediction.lstrip("\n").split("\n"):
        if "`" not in candidate and "#" not in candidate and "//" not in candidate:
            line = candidate
            break
    try:
        from rapidfuzz import fuzz
    except ImportError:
        raise InputError("code similarity (lcc, repobench-p) needs rapidfuzz: pip install rapidfuzz, or "
                         "pip install 'oprm-rag[eval]'") from None
    if line == reference:
        return 1.0
    if not line or not reference:
        return 0.0
    return int(round(fuzz.ratio(line, reference))) / 100  # fuzzywuzzy returns an integer percentage


# ---------------------------------------------------------------------- per dataset
Metric = Callable[..., float]

#: LongBench's metric for each dataset (``eval.py``'s ``dataset2metric``).
DATASET_METRIC: dict[str, Metric] = {
    "narrativeqa": qa_f1, "qasper": qa_f1, "multifieldqa_en": qa_f1, "multifieldqa_zh": qa_f1_zh,
    "hotpotqa": qa_f1, "2wikimqa": qa_f1, "musique": qa_f1, "dureader": rouge_l_zh,
    "gov_report": rouge_l, "qmsum": rouge_l, "multi_news": rouge_l, "vcsum": rouge_l_zh,
    "trec": classification_score, "triviaqa": qa_f1, "samsum": rouge_l, "lsht": classification_score,
    "passage_retrieval_en": retrieval_score, "passage_count": count_score,
    "passage_retrieval_zh": retrieval_zh_score, "lcc": code_sim_score, "repobench-p": code_sim_score,
}

#: Few-shot datasets whose prediction is cut to its first line before scoring (``eval.py``).
FIRST_LINE_DATASETS = frozenset({"trec", "triviaqa", "samsum", "lsht"})

#: LongBench's task categories (its paper's Table 1 grouping).
CATEGORIES: dict[str, tuple[str, ...]] = {
    "Single-Document QA": ("narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh"),
    "Multi-Document QA": ("hotpotqa", "2wikimqa", "musique", "dureader"),
    "Summarization": ("gov_report", "qmsum", "multi_news", "vcsum"),
    "Few-shot Learning": ("trec", "triviaqa", "samsum", "lsht"),
    "Synthetic Tasks": ("passage_count", "passage_retrieval_en", "passage_retrieval_zh"),
    "Code Completion": ("lcc", "repobench-p"),
}


def score_example(dataset: str, prediction: str, answers: Sequence[str], all_classes: Sequence[str] | None = None,
                  metric: Metric | None = None) -> float:
    """One example's score in [0, 1]: the best over its reference answers (``eval.py``'s
    ``scorer``). ``metric`` overrides the dataset's (custom datasets)."""
    if metric is None:
        if dataset not in DATASET_METRIC:
            raise InputError(f"no LongBench metric for dataset {dataset!r}; known: {', '.join(DATASET_METRIC)}")
        metric = DATASET_METRIC[dataset]
        if dataset in FIRST_LINE_DATASETS:  # LongBench's rule, for its datasets only
            prediction = prediction.lstrip("\n").split("\n")[0]
    best = 0.0
    for reference in answers:
        best = max(best, metric(prediction, reference, all_classes=all_classes))
    return best


def mean_percent(scores: Iterable[float]) -> float | None:
    """Mean of scores in [0, 1] as a percentage rounded to 2 places (LongBench's report), or None."""
    values = list(scores)
    return round(100 * sum(values) / len(values), 2) if values else None


# ---------------------------------------------------------------------- LongBench v2
def extract_choice(response: str) -> str | None:
    """The letter of ``The correct answer is (X)`` (or ``... is X``) in a response, as
    LongBench v2's ``extract_answer``; None when the response has neither form."""
    response = response.replace("*", "")
    match = re.search(r"The correct answer is \(([A-D])\)", response)
    if match:
        return match.group(1)
    match = re.search(r"The correct answer is ([A-D])", response)
    return match.group(1) if match else None


def v2_accuracy(records: Iterable[Mapping[str, Any]]) -> dict[str, float | int | None]:
    """Accuracy (percent, 1 decimal as ``result.py``) overall, by difficulty and by length.

    Each record needs ``score`` (1 or 0), ``difficulty`` (``easy``/``hard``) and
    ``length_class`` (``short``/``medium``/``long``). Like ``result.py``, anything not
    ``easy`` counts as hard and anything not short/medium counts as long.
    """
    groups: dict[str, list[float]] = {k: [] for k in ("overall", "easy", "hard", "short", "medium", "long")}
    for r in records:
        s = float(r["score"])
        groups["overall"].append(s)
        groups["easy" if r.get("difficulty") == "easy" else "hard"].append(s)
        length = r.get("length_class")
        groups[length if length in ("short", "medium") else "long"].append(s)
    out: dict[str, float | int | None] = {k: (round(100 * sum(v) / len(v), 1) if v else None)
                                          for k, v in groups.items()}
    out["n"] = len(groups["overall"])
    return out
