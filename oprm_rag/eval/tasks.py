"""What one example of each benchmark becomes: its prompt, its answer, its scored record.

A record is one example in one mode: ``_id``, ``dataset``, ``mode``, ``pred``,
``answers``, ``score`` (0-1), plus what the report groups by (``length``,
``difficulty``, ``length_class``) and what the answer cost (``usage``, ``seconds``,
``chunk_tokens``, ``truncated``).
"""

from __future__ import annotations

from typing import Any, Callable

from ..decoding.config import GenerationConfig
from ..errors import InputError
from . import metrics
from .datasets import Example
from .prompts import longbench_parts, max_new_tokens_for, v2_parts
from .runner import Mode, Prediction, Predictor

__all__ = ["longbench_work", "v2_work", "custom_work", "needle_work", "CUSTOM_METRICS"]


def _record(ex: Example, mode: Mode, pred: Prediction, score: float, **extra: Any) -> dict[str, Any]:
    return {"_id": ex.id, "dataset": ex.dataset, "mode": mode, "pred": pred.text, "answers": ex.answers,
            "score": score, **extra, "chunk_tokens": pred.chunk_tokens, "truncated": pred.truncated,
            "seconds": round(pred.seconds, 3), "usage": pred.usage}


def _guard(fn: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    """An example the model cannot take (question longer than a chunk...) is the example's
    problem, not the run's: report it as an InputError so the runner logs it and goes on.

    The same holds for a served model: a prompt longer than the server's context
    (:class:`~oprm_rag.served.errors.ContextOverflowError`) is one example's, exactly as
    in process; every other server failure (down, timeouts) still stops the run."""
    from ..served.errors import ContextOverflowError

    def run() -> dict[str, Any]:
        try:
            return fn()
        except InputError:
            raise
        except (ValueError, ContextOverflowError) as exc:  # one example's input, in process or served
            raise InputError(str(exc)) from exc
    return run


def longbench_work(predictors: dict[Mode, Predictor], *, gen_lengths: str = "longbench",
                   max_new_tokens: int | None = None, idk_instruction: bool = True
                   ) -> Callable[[Example, Mode], Callable[[], dict[str, Any]]]:
    """``make(example, mode)`` for LongBench datasets."""
    def make(ex: Example, mode: Mode) -> Callable[[], dict[str, Any]]:
        def work() -> dict[str, Any]:
            p = predictors[mode]
            parts = longbench_parts(ex.dataset, {"context": ex.context, "input": ex.input}, oprm=mode == "oprm",
                                    idk_word=p.idk_word, idk_instruction=idk_instruction)
            n = max_new_tokens_for(ex.dataset, gen_lengths, max_new_tokens)
            pred = p.predict(parts, n, keep_tail=mode == "oprm" and ex.dataset == "lcc")
            score = metrics.score_example(ex.dataset, pred.text, ex.answers, ex.meta.get("all_classes"))
            return _record(ex, mode, pred, score, all_classes=ex.meta.get("all_classes"),
                           length=ex.meta.get("length"), language=ex.meta.get("language"), max_new_tokens=n)
        return _guard(work)
    return make


def v2_work(predictors: dict[Mode, Predictor], *, max_new_tokens: int | None = None, idk_instruction: bool = True
            ) -> Callable[[Example, Mode], Callable[[], dict[str, Any]]]:
    """``make(example, mode)`` for LongBench v2 (multiple choice; score 1 when the extracted
    letter is the answer)."""
    def make(ex: Example, mode: Mode) -> Callable[[], dict[str, Any]]:
        def work() -> dict[str, Any]:
            p = predictors[mode]
            parts = v2_parts({**ex.meta, "context": ex.context}, oprm=mode == "oprm", idk_word=p.idk_word,
                             idk_instruction=idk_instruction)
            n = max_new_tokens_for("longbench_v2", "longbench", max_new_tokens)
            pred = p.predict(parts, n)
            choice = metrics.extract_choice(pred.text)
            return _record(ex, mode, pred, float(choice == ex.answers[0]), choice=choice,
                           difficulty=ex.meta.get("difficulty"), length_class=ex.meta.get("length_class"),
                           domain=ex.meta.get("domain"), max_new_tokens=n)
        return _guard(work)
    return make


def exact_match(prediction: str, reference: str, **_: Any) -> float:
    """1 when the normalised prediction equals the normalised reference."""
    return float(metrics.normalize_answer(prediction) == metrics.normalize_answer(reference))


def contains_answer(prediction: str, reference: str, **_: Any) -> float:
    """1 when the normalised reference occurs in the normalised prediction (as words)."""
    ref = metrics.normalize_answer(reference)
    return float(bool(ref) and f" {ref} " in f" {metrics.normalize_answer(prediction)} ")


#: Metrics for the custom format (``--metric``).
CUSTOM_METRICS: dict[str, metrics.Metric] = {
    "f1": metrics.qa_f1, "exact": exact_match, "contains": contains_answer, "rouge-l": metrics.rouge_l,
}


def custom_work(predictors: dict[Mode, Predictor], *, metric: str = "f1",
                max_new_tokens: int = GenerationConfig.max_new_tokens
                ) -> Callable[[Example, Mode], Callable[[], dict[str, Any]]]:
    """``make(example, mode)`` for ``{context, question, answers}`` data, with the model's own prompt."""
    if metric not in CUSTOM_METRICS:
        raise InputError(f"--metric must be one of {', '.join(CUSTOM_METRICS)}, got {metric!r}")
    fn = CUSTOM_METRICS[metric]

    def make(ex: Example, mode: Mode) -> Callable[[], dict[str, Any]]:
        def work() -> dict[str, Any]:
            pred = predictors[mode].predict_own_prompt(ex.input, ex.context, max_new_tokens)
            score = metrics.score_example(ex.dataset, pred.text, ex.answers, metric=fn)
            return _record(ex, mode, pred, score, metric=metric, max_new_tokens=max_new_tokens)
        return _guard(work)
    return make


def needle_work(predictors: dict[Mode, Predictor], *, max_new_tokens: int = 8
                ) -> Callable[[Example, Mode], Callable[[], dict[str, Any]]]:
    """``make(example, mode)`` for the needle sweep (the model's own prompt; score: the
    first number of the answer is the needle's value)."""
    from .needle import needle_score

    def make(ex: Example, mode: Mode) -> Callable[[], dict[str, Any]]:
        def work() -> dict[str, Any]:
            p = predictors[mode]
            pred = p.predict_own_prompt(ex.input, ex.context, max_new_tokens)
            return _record(ex, mode, pred, needle_score(pred.text, ex.answers[0]), length=ex.meta["length"],
                           depth=ex.meta["depth"], trial=ex.meta["trial"], tokens=len(p.model.encode(ex.context)),
                           distractors=ex.meta.get("distractors", 0), max_new_tokens=max_new_tokens)
        return _guard(work)
    return make
