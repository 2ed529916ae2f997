"""``oprm-rag eval``: LongBench, LongBench v2, the needle sweep and your own data, vanilla against OPRM.

::

    oprm-rag eval longbench    --model NAME --data DIR --mode both [--datasets a,b | all] [--chunk-tokens auto]
    oprm-rag eval longbench-v2 --model NAME --data DIR_OR_FILE --mode both
    oprm-rag eval needle       [--lengths 512,1024,...] [--depths 0,0.25,...] [--trials N] [--heatmap PNG]
    oprm-rag eval custom       --data FILE.jsonl [--metric f1|exact|contains|rouge-l]

``--base-url URL --model NAME [--api-key KEY]`` runs against an OpenAI-compatible server
(several examples in flight, ``--max-concurrency``). Results go to ``--out DIR`` one
record at a time; rerunning the same command resumes. Exit codes: 0 done, 1 bad input
(data, files), 2 bad usage, 3 the model could not be loaded or reached, 130 interrupted.

The lead wires :func:`add_parser` and :func:`run` into ``oprm_rag.cli``; :func:`main` runs
the same thing standalone (``python -m oprm_rag.eval.cli ...``).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..cli_args import (EXIT_USAGE, CLIError, add_model_args, chunk_tokens_arg, engine_from_args, positive_int,
                        run_reporting)

if TYPE_CHECKING:  # pragma: no cover
    from ..engine import Engine

__all__ = ["add_parser", "run", "main", "EvalError"]

logger = logging.getLogger("oprm_rag.eval")

#: An expected failure: one line for the user, and the exit code (the CLI's own type).
EvalError = CLIError


# ---------------------------------------------------------------------- arguments
def _positive(value: str) -> int:
    n = positive_int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {n}")
    return n


def _int_list(value: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {value!r}") from None
    if not out:
        raise argparse.ArgumentTypeError("expected at least one number")
    return out


def _float_list(value: str) -> list[float]:
    try:
        out = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {value!r}") from None
    if not out:
        raise argparse.ArgumentTypeError("expected at least one number")
    return out


#: The shortest needle haystack, in tokens (a fact and a little prose), and the longest: each
#: haystack is built in memory as text (about 4 bytes a token, per trial and depth).
MIN_NEEDLE_LENGTH, MAX_NEEDLE_LENGTH = 16, 16_000_000


def _lengths(value: str) -> list[int]:
    """``--lengths``: context lengths in tokens, 16 to 16M each, duplicates dropped."""
    out = _int_list(value)
    for n in out:
        if n < MIN_NEEDLE_LENGTH:
            raise argparse.ArgumentTypeError(f"lengths are in tokens, at least {MIN_NEEDLE_LENGTH}; got {n}")
        if n > MAX_NEEDLE_LENGTH:
            raise argparse.ArgumentTypeError(f"lengths are in tokens, at most {MAX_NEEDLE_LENGTH:,} (each haystack "
                                             f"is built in memory); got {n:,}")
    return list(dict.fromkeys(out))


def _depths(value: str) -> list[float]:
    """``--depths``: fractions of the text, 0 (start) to 1 (end), duplicates dropped."""
    out = _float_list(value)
    labels: dict[str, float] = {}
    for d in out:
        if not 0.0 <= d <= 1.0:  # NaN fails too
            raise argparse.ArgumentTypeError(f"depths are fractions of the text, 0 (start) to 1 (end); got {d:g}")
        other = labels.setdefault(f"{d:g}", d)  # the records' ids name a depth by these digits
        if other != d:
            raise argparse.ArgumentTypeError(f"depths {other!r} and {d!r} are the same to 6 digits; give "
                                             "depths that differ sooner")
    return list(dict.fromkeys(labels.values()))


def _rate(value: str) -> float:
    """``--distractors``: facts per 1,000 tokens, a finite number >= 0."""
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not (math.isfinite(x) and x >= 0):
        raise argparse.ArgumentTypeError(f"expected a number of facts per 1,000 tokens >= 0, got {value}")
    return x


def _common(p: argparse.ArgumentParser, *, data_help: str | None, download: bool = False,
            gen_default: int | None = None) -> None:
    add_model_args(p.add_argument_group("model"))
    run = p.add_argument_group("run")
    if data_help:
        run.add_argument("--data", metavar="DIR", help=data_help)
    if download:
        run.add_argument("--download", action="store_true",
                         help="fetch the data from the hub into --data first (needs the hub and the `datasets` "
                              "library: pip install 'oprm-rag[eval-hub]')")
    run.add_argument("--mode", choices=["vanilla", "oprm", "both"], default="both",
                     help="plain inference, OPRM, or both on the same examples (default: both)")
    run.add_argument("--chunk-tokens", type=chunk_tokens_arg, default="auto",
                     help="OPRM's chunk length: a number of tokens or 'auto' (the model's own; default)")
    run.add_argument("--out", metavar="DIR", help="results folder (default: oprm-eval/<benchmark>/<model>); "
                                                  "rerunning into it resumes")
    run.add_argument("--limit", type=_positive, metavar="N", help="only the first N examples (of each dataset)")
    run.add_argument("--max-concurrency", type=_positive, default=8, metavar="N",
                     help="examples in flight against a server (--base-url); in-process models run one at a time")
    run.add_argument("--max-new-tokens", type=_positive, default=gen_default, metavar="N",
                     help="tokens to generate per answer" + (" (default: the benchmark's own, per dataset)"
                                                             if gen_default is None else f" (default: {gen_default})"))
    run.add_argument("--no-idk-filter", action="store_true",
                     help="OPRM keeps chunks that answer the IDK word, and prompts carry no IDK instruction "
                          "(the paper runs Falcon3-Mamba this way)")
    run.add_argument("--chat-template", choices=["auto", "on", "off"], default="auto",
                     help="wrap prompts in the model's chat template: 'auto' = when the model has one")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``eval`` and its sub-commands to an ``argparse`` sub-parser set."""
    ev = subparsers.add_parser(
        "eval", help="LongBench, LongBench v2, needle and custom evaluation: vanilla against OPRM",
        description="Evaluate a model with and without OPRM on LongBench, LongBench v2, a needle-in-a-haystack "
                    "sweep or your own {context, question, answers} JSONL. Results are appended per example "
                    "under --out; rerun the same command to resume.")
    sub = ev.add_subparsers(dest="eval_command", required=True, metavar="{longbench,longbench-v2,needle,custom}")

    lb = sub.add_parser("longbench", help="LongBench (v1): 21 datasets, LongBench's prompts and metrics",
                        description="LongBench with its prompts, generation lengths and metrics; OPRM splits each "
                                    "prompt into instruction, context and question (see docs/evaluate.md).")
    _common(lb, data_help="folder with LongBench's JSONL files (NAME.jsonl or data/NAME.jsonl)", download=True)
    lb.add_argument("--datasets", default="paper",
                    help="comma-separated dataset names, 'paper' (the paper's 16 English datasets; default), "
                         "'english' or 'all'")
    lb.add_argument("--longbench-e", action="store_true", help="LongBench-E (NAME_e.jsonl), scored by length too")
    lb.add_argument("--gen-lengths", choices=["longbench", "paper"], default="longbench",
                    help="max generation length per dataset: LongBench's (default) or the paper's code's")
    lb.add_argument("--max-length", type=_positive, metavar="TOKENS",
                    help="vanilla's prompt budget: longer prompts are cut in the middle as LongBench does "
                         "(default: the model's position limit; none for recurrent models)")

    v2 = sub.add_parser("longbench-v2", help="LongBench v2: 503 multiple-choice questions, accuracy by "
                                             "difficulty and length")
    _common(v2, data_help="data.json (the hub's file), a folder holding it, or JSONL files", download=True)
    v2.add_argument("--max-length", type=_positive, metavar="TOKENS",
                    help="vanilla's prompt budget (middle truncation; default: the model's position limit)")

    nd = sub.add_parser("needle", help="needle in a haystack / associative recall, swept over length and depth, "
                                       "with a heatmap PNG")
    _common(nd, data_help=None, gen_default=8)
    nd.add_argument("--lengths", type=_lengths, default=[256, 512, 1024, 2048, 4096, 8192],
                    help="context lengths in tokens (default: 256,512,1024,2048,4096,8192)")
    nd.add_argument("--depths", type=_depths, default=[0.0, 0.25, 0.5, 0.75, 1.0],
                    help="needle depths, 0 = start, 1 = end (default: 0,0.25,0.5,0.75,1)")
    nd.add_argument("--trials", type=_positive, default=2, help="questions per cell (default: 2)")
    nd.add_argument("--distractors", type=_rate, default=0.0, metavar="PER_1K",
                    help="other facts per 1,000 tokens (associative recall; default 0: one needle)")
    nd.add_argument("--haystack", metavar="FILE", help="a text file whose sentences are the filler (default: "
                                                       "held-out prose shipped with the demo)")
    nd.add_argument("--seed", type=int, default=0)
    nd.add_argument("--heatmap", metavar="PNG", help="heatmap path (default: OUT/needle_heatmap.png)")

    cu = sub.add_parser("custom", help="your own JSONL of {context, question, answers}")
    _common(cu, data_help="the JSONL file ({context, question, answers} per line; _id optional)", gen_default=64)
    cu.add_argument("--metric", choices=["f1", "exact", "contains", "rouge-l"], default="f1",
                    help="score per answer: LongBench's QA F1 (default), normalised exact match, answer "
                         "contained in the prediction, or ROUGE-L")
    return ev


# ---------------------------------------------------------------------- model
def _model_name(args: argparse.Namespace) -> str:
    from .._about import DEMO_MODEL

    return args.model or DEMO_MODEL


def _load_model(args: argparse.Namespace) -> Any:
    """The model to evaluate: the CLI's one loader (a served model with ``--base-url``)."""
    return engine_from_args(args)


def _predictors(model: "Engine", args: argparse.Namespace, modes: Sequence[str]) -> dict[str, Any]:
    from .runner import Predictor

    chat = {"auto": None, "on": True, "off": False}[args.chat_template]
    if chat is True and not getattr(getattr(model, "tokenizer", None), "chat_template", None) \
            and not _engine_has_chat(model):
        raise EvalError("--chat-template on: this model has no chat template", EXIT_USAGE)
    _check_modes(args, modes)
    out = {}
    for m in modes:
        try:
            out[m] = Predictor(model, m, chunk_tokens=args.chunk_tokens or "auto", idk_filter=not args.no_idk_filter,
                               use_chat_template=chat, max_length=getattr(args, "max_length", None))
            if m == "oprm":
                out[m].resolved_chunk_tokens()  # a chunk length the model cannot take fails here, once
        except (ValueError, TypeError) as exc:
            raise EvalError(str(exc), EXIT_USAGE) from None
    return out


def _engine_has_chat(model: "Engine") -> bool:
    probe = getattr(model, "apply_chat_template", None)
    if not callable(probe):
        return False
    try:
        return probe([{"role": "user", "content": "x"}]) is not None
    except Exception:
        return False


def _concurrency(model: "Engine", args: argparse.Namespace) -> int:
    from .runner import is_served

    if is_served(model):
        return args.max_concurrency
    return 1


def _config(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    cfg = {"model": _model_name(args), "base_url": args.base_url, "dtype": args.dtype,
           "chunk_tokens": args.chunk_tokens, "idk_filter": not args.no_idk_filter,
           "chat_template": args.chat_template, "max_new_tokens": args.max_new_tokens,
           "max_length": getattr(args, "max_length", None)}
    cfg.update(extra)
    return cfg


def _out_dir(args: argparse.Namespace, benchmark: str) -> Path:
    if args.out:
        return Path(args.out)
    name = Path(_model_name(args).rstrip("/")).name or "model"
    return Path("oprm-eval") / benchmark / name


# ---------------------------------------------------------------------- sub-commands
def _resolve_datasets(spec: str) -> list[str]:
    from .prompts import ENGLISH_DATASETS, LONGBENCH_PROMPTS, PAPER_DATASETS

    low = spec.strip().lower()
    if low == "paper":
        return list(PAPER_DATASETS)
    if low == "english":
        return list(ENGLISH_DATASETS)
    if low == "all":
        return list(LONGBENCH_PROMPTS)
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in LONGBENCH_PROMPTS]
    if unknown or not names:
        raise EvalError(f"unknown LongBench dataset(s) {', '.join(unknown) or spec!r}; known: "
                        f"{', '.join(LONGBENCH_PROMPTS)} (or paper, english, all)", EXIT_USAGE)
    return list(dict.fromkeys(names))


def _check_modes(args: argparse.Namespace, modes: Sequence[str]) -> None:
    """What the flags alone contradict, before the model loads (usage errors)."""
    if "oprm" in modes and args.chunk_tokens is None:
        raise EvalError("--chunk-tokens none is plain inference: use --mode vanilla, or give OPRM a chunk length",
                        EXIT_USAGE)


class _Run:
    """The results folder of one command, checked before the model loads.

    ``--out`` is created and written to (a read-only disk or a file fails here, not after
    the model work); no file it will write may be an input (the data, the haystack); a
    folder holding another run's settings, or records of another dataset under the same
    file name, is refused. The settings are saved only once the model has loaded, so a
    mistyped ``--model`` leaves nothing behind that a corrected rerun would trip on.
    """

    def __init__(self, args: argparse.Namespace, benchmark: str, key: str, config: dict[str, Any],
                 datasets: Sequence[str], inputs: Sequence[Path], extra_outputs: Sequence[Path] = (),
                 summary_name: str | None = None) -> None:
        from ..user_files import refuse_overwriting_inputs
        from .runner import ResultStore

        self.store = ResultStore(_out_dir(args, benchmark), create=False)
        self.key, self.config, self.datasets = key, config, list(datasets)
        outputs = [*self.store.outputs(datasets), *extra_outputs]
        if summary_name is not None:
            from .report import summary_paths

            outputs += list(summary_paths(self.store.dir, summary_name))
        refuse_overwriting_inputs(outputs, inputs, f"--out {self.store.dir}")
        self.store.check_config(key, config, save=False, datasets=self.datasets)

    def start(self) -> Any:
        """The model has loaded: make the folder, record the settings; the store to append to."""
        self.store.create()
        self.store.check_config(self.key, self.config, datasets=self.datasets)
        return self.store


def _cmd_longbench(args: argparse.Namespace) -> int:
    from . import datasets as ds
    from .report import longbench_summary
    from .runner import RunStats, interleave, iter_modes, run_items
    from .tasks import longbench_work

    names = _resolve_datasets(args.datasets)
    if not args.data:
        raise EvalError(f"--data DIR is required: LongBench's files, as {ds.LONGBENCH_LAYOUT}", EXIT_USAGE)
    modes = iter_modes(args.mode)
    _check_modes(args, modes)
    if args.download:
        ds.download_longbench(args.data, names, e=args.longbench_e)
    examples = {n: ds.read_longbench(args.data, n, e=args.longbench_e, limit=args.limit) for n in names}
    inputs = [ds.longbench_file(args.data, n, args.longbench_e) for n in names]
    prepared = _Run(args, "longbench", "longbench",
                    _config(args, gen_lengths=args.gen_lengths, longbench_e=args.longbench_e), names, inputs,
                    summary_name="longbench")
    model = _load_model(args)
    predictors = _predictors(model, args, modes)
    store = prepared.start()
    make = longbench_work(predictors, gen_lengths=args.gen_lengths, max_new_tokens=args.max_new_tokens,
                          idk_instruction=not args.no_idk_filter)
    stats = RunStats()
    for n in names:
        run_items(interleave(examples[n], modes, make), store, max_concurrency=_concurrency(model, args),
                  desc=n, stats=stats)
    records = {n: _selected(store.records(n), examples[n]) for n in names}
    summary = longbench_summary(records, modes, model=_model_name(args), errors=len(stats.errors))
    return _finish(store, "longbench", summary, stats)


def _selected(records: list[dict[str, Any]], examples: Sequence[Any]) -> list[dict[str, Any]]:
    ids = {ex.id for ex in examples}
    return [r for r in records if str(r.get("_id")) in ids]


def _cmd_v2(args: argparse.Namespace) -> int:
    from . import datasets as ds
    from .report import v2_summary
    from .runner import RunStats, interleave, iter_modes, run_items
    from .tasks import v2_work

    if not args.data:
        raise EvalError(f"--data is required: LongBench v2 as {ds.V2_LAYOUT}", EXIT_USAGE)
    modes = iter_modes(args.mode)
    _check_modes(args, modes)
    if args.download:
        ds.download_longbench_v2(args.data)
    examples = ds.read_longbench_v2(args.data, limit=args.limit)
    prepared = _Run(args, "longbench-v2", "longbench_v2", _config(args), ["longbench_v2"], ds.v2_files(args.data),
                    summary_name="longbench_v2")
    model = _load_model(args)
    predictors = _predictors(model, args, modes)
    store = prepared.start()
    make = v2_work(predictors, max_new_tokens=args.max_new_tokens, idk_instruction=not args.no_idk_filter)
    stats = run_items(interleave(examples, modes, make), store, max_concurrency=_concurrency(model, args),
                      desc="longbench_v2", stats=RunStats())
    summary = v2_summary(_selected(store.records("longbench_v2"), examples), modes, model=_model_name(args),
                         errors=len(stats.errors))
    return _finish(store, "longbench_v2", summary, stats)


def _cmd_custom(args: argparse.Namespace) -> int:
    from . import datasets as ds
    from .report import custom_summary
    from .runner import RunStats, interleave, iter_modes, records_name, run_items
    from .tasks import custom_work

    if not args.data:
        raise EvalError("--data FILE.jsonl is required ({context, question, answers} per line)", EXIT_USAGE)
    modes = iter_modes(args.mode)
    _check_modes(args, modes)
    data = ds.custom_file(args.data)
    examples = ds.read_custom(data, limit=args.limit)
    name = examples[0].dataset
    summary_name = "custom_" + records_name(name)[:-len(".jsonl")].lstrip("~")
    prepared = _Run(args, "custom", f"custom:{name}",
                    _config(args, metric=args.metric, data=str(data.resolve())), [name], [data],
                    summary_name=summary_name)
    model = _load_model(args)
    predictors = _predictors(model, args, modes)
    store = prepared.start()
    make = custom_work(predictors, metric=args.metric, max_new_tokens=args.max_new_tokens)
    stats = run_items(interleave(examples, modes, make), store, max_concurrency=_concurrency(model, args),
                      desc=name, stats=RunStats())
    summary = custom_summary({name: _selected(store.records(name), examples)}, modes, model=_model_name(args),
                             metric=args.metric, errors=len(stats.errors))
    return _finish(store, summary_name, summary, stats)


def _cmd_needle(args: argparse.Namespace) -> int:
    from ..user_files import check_output_file
    from .needle import haystack_sentences, needle_examples, needle_markdown, needle_summary, plot_heatmap
    from .runner import RunStats, interleave, iter_modes, run_items
    from .tasks import needle_work

    modes = iter_modes(args.mode)
    _check_modes(args, modes)
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:  # the heatmap is the sweep's point: say so first
        raise EvalError("the needle heatmap needs matplotlib: pip install matplotlib (or 'oprm-rag[plot]')")
    sentences = haystack_sentences(args.haystack)
    haystack = str(Path(args.haystack).resolve()) if args.haystack else None
    out = _out_dir(args, "needle")
    heatmap = Path(args.heatmap) if args.heatmap else out / "needle_heatmap.png"
    prepared = _Run(args, "needle", "needle",
                    _config(args, seed=args.seed, haystack=haystack, distractors=args.distractors), ["needle"],
                    [Path(args.haystack)] if args.haystack else [],
                    extra_outputs=[heatmap, out / "needle_summary.json", out / "needle_summary.md"])
    check_output_file(heatmap, "--heatmap", create_parent=False)  # before the sweep, not after it
    model = _load_model(args)
    predictors = _predictors(model, args, modes)
    examples = needle_examples(model, args.lengths, args.depths, args.trials, seed=args.seed, sentences=sentences,
                               distractors_per_1k=args.distractors)
    if args.limit:
        examples = examples[:args.limit]
    store = prepared.start()
    make = needle_work(predictors, max_new_tokens=args.max_new_tokens)
    stats = run_items(interleave(examples, modes, make), store, max_concurrency=_concurrency(model, args),
                      desc="needle", stats=RunStats())
    chunk = predictors["oprm"].resolved_chunk_tokens() if "oprm" in predictors else None
    summary = needle_summary(_selected(store.records("needle"), examples), modes, args.lengths, args.depths,
                             model=_model_name(args), chunk_tokens=chunk)
    summary["errors"] = len(stats.errors)
    png = _written(lambda: plot_heatmap(summary, heatmap), heatmap)
    import json

    table = needle_markdown(summary)
    _written(lambda: (store.dir / "needle_summary.json").write_text(json.dumps(summary, indent=2) + "\n",
                                                                   encoding="utf-8"), store.dir)
    _written(lambda: (store.dir / "needle_summary.md").write_text(table + "\n", encoding="utf-8"), store.dir)
    print(table)
    print(f"\n{stats.done} answered, {stats.skipped} already recorded"
          + (f", {len(stats.errors)} could not be answered (errors.jsonl)" if stats.errors else "")
          + f"; heatmap: {png}; records: {store.dir}")
    return 0


def _written(write: Any, where: Path) -> Any:
    """Run a write of the results; an OS failure (full disk...) is the user's, in one line."""
    from ..user_files import os_problem

    try:
        return write()
    except OSError as exc:
        raise os_problem(exc, f"cannot write the results in {where}; the records are kept, rerun to write "
                              "the summary") from None


def _finish(store: Any, name: str, summary: dict[str, Any], stats: Any) -> int:
    from .report import markdown, write_summary

    j, m = _written(lambda: write_summary(store.dir, name, summary), store.dir)
    print(markdown(summary))
    print(f"\n{stats.done} answered, {stats.skipped} already recorded"
          + (f", {len(stats.errors)} could not be answered (errors.jsonl)" if stats.errors else "")
          + f"; summary: {j} and {m.name}; records: {store.dir}")
    return 0


# ---------------------------------------------------------------------- entry points
def run(args: argparse.Namespace) -> int:
    """Run a parsed ``oprm-rag eval ...`` command; errors become one line and an exit code."""
    if getattr(args, "verbose", False):
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    else:
        logging.getLogger("transformers").setLevel(logging.ERROR)
    commands = {"longbench": _cmd_longbench, "longbench-v2": _cmd_v2, "needle": _cmd_needle, "custom": _cmd_custom}

    def work() -> int:
        try:
            return commands[args.eval_command](args)
        except OSError as exc:  # a file or disk problem no check above named: still the user's, in one line
            from ..user_files import os_problem

            raise os_problem(exc, f"a file could not be read or written ({type(exc).__name__})") from None

    return run_reporting("oprm-rag eval", work,
                         verbose=bool(getattr(args, "verbose", False)),
                         interrupted="what was answered is saved: rerun the same command to resume")


def main(argv: Sequence[str] | None = None) -> int:
    """``oprm-rag eval ...`` standalone: ``main(["eval", "needle", ...])`` or without the ``eval``."""
    parser = argparse.ArgumentParser(prog="oprm-rag")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] != ["eval"]:
        argv = ["eval", *argv]
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse printed the usage error
        return int(exc.code or 0)
    return run(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
