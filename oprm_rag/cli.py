"""The ``oprm-rag`` command: ask, chat, inspect, demo, serve, eval and export-gguf.

Exit codes: 0 success, 1 a document or input problem, 2 bad usage (options), 3 the
model could not load or its server failed, 4 an internal fault (a bug: reported with
its type), 130 interrupted (Ctrl-C), 141 standard output closed early (``| head``).
No tracebacks for expected failures (``-v`` shows one for internal faults).

Selector options are built as :class:`~oprm_rag.options.SelectorOptions`: a flag left
out takes the core default, so the CLI chooses exactly what the library, the web app
and the integrations choose.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .decoding.config import GenerationConfig
from .cli_args import (EXIT_INTERRUPT, EXIT_PIPE, EXIT_USAGE, CLIError, add_model_args, add_selector_args,
                       engine_from_args, positive_int, run_reporting, selector_options_from_args, startup_interrupts)

if TYPE_CHECKING:  # pragma: no cover
    from .engine import Engine

__all__ = ["main"]


def _common(p: argparse.ArgumentParser, question: str | None, required: bool = False) -> None:
    p.add_argument("files", nargs="+", metavar="FILE", help=".txt, .md or .pdf files; - reads stdin")
    if question:
        p.add_argument("-q", "--question", required=required, help=question)
    add_model_args(p)
    add_selector_args(p)
    p.add_argument("--cache-dir", help="keep chunk states on disk here: follow-up runs cost only the question")
    p.add_argument("--max-new-tokens", type=positive_int, default=GenerationConfig.max_new_tokens)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oprm-rag", description="Answer questions about long documents with "
                                     "recurrent LLMs, using OPRM chunk selection.")
    sub = parser.add_subparsers(dest="command", required=True)
    ask = sub.add_parser("ask", help="answer one question about the files")
    _common(ask, question="the question to answer (required unless --summary; with it, what to summarise for)")
    ask.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    ask.add_argument("--summary", action="store_true", help="summarise: decode from every chunk, in document order")
    chat = sub.add_parser("chat", help="ask questions in a loop over the same files (states are reused)")
    _common(chat, question=None)
    ins = sub.add_parser("inspect", help="show every chunk's entropy; --plot writes a PNG")
    _common(ins, question="the question to score the chunks for", required=True)
    ins.add_argument("--plot", help="PNG path for the entropy chart")
    ins.add_argument("--json", action="store_true", help="print the selection as one JSON object")
    sub.add_parser("serve", help="the web QA page (its options: oprm-rag serve --help)", add_help=False)
    demo = sub.add_parser("demo", help="plain inference against OPRM on the shipped model")
    add_model_args(demo)
    demo.add_argument("--facts", type=_demo_facts, default=96,
                      help=f"facts hidden in the demo document ({_DEMO_FACTS[0]} to {_DEMO_FACTS[1]:,})")
    demo.add_argument("--seed", type=int, default=7)
    for module in ("oprm_rag.gguf_export", "oprm_rag.eval.cli"):
        _add_plugin(sub, module)
    return parser


#: ``demo --facts``: enough for a tally, few enough to build in seconds.
_DEMO_FACTS = (2, 20_000)


def _demo_facts(value: str) -> int:
    n = positive_int(value)
    if not _DEMO_FACTS[0] <= n <= _DEMO_FACTS[1]:
        raise argparse.ArgumentTypeError(f"expected {_DEMO_FACTS[0]} to {_DEMO_FACTS[1]:,} facts, got {n}")
    return n


_PLUGINS: dict[str, str] = {}


def _add_plugin(sub: Any, module: str) -> None:
    """Sub-commands that live in their own module (``add_parser(sub)`` + ``run(args)``)."""
    from importlib import import_module

    try:
        mod = import_module(module)
    except ImportError:  # an optional part that is not installed
        return
    before = set(sub.choices)
    mod.add_parser(sub)
    for name in set(sub.choices) - before:
        _PLUGINS[name] = module


def _engine(args: argparse.Namespace) -> Any:
    return engine_from_args(args)


def _selector(engine: "Engine", args: argparse.Namespace) -> "OPRMSelector":
    from .errors import InputError
    from .selector import OPRMSelector

    cache: Any = None
    if getattr(args, "cache_dir", None):
        from .storage.cache import DocumentStateCache

        try:
            cache = DocumentStateCache(directory=args.cache_dir)
        except (InputError, OSError) as exc:
            raise CLIError(f"--cache-dir {args.cache_dir}: {exc}", EXIT_USAGE) from exc
    options = selector_options_from_args(args, show_progress=sys.stderr.isatty() or bool(args.verbose))
    try:
        return OPRMSelector(engine, options, cache=cache)
    except InputError as exc:
        raise CLIError(str(exc), EXIT_USAGE) from exc


def _documents(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    from .errors import DocumentError
    from .readers import read_documents

    try:
        docs = read_documents(args.files)
    except DocumentError as exc:
        raise CLIError(str(exc)) from exc
    for d in docs:
        for warning in getattr(d, "warnings", ()):
            print(f"oprm-rag: warning: {warning}", file=sys.stderr)
    return [d.name for d in docs], [d.text for d in docs]


def _usage_line(usage: Any) -> str:
    return (f"[{usage.chunks} chunks of <= {usage.chunk_tokens or 'whole'} tokens scored; {usage.input_tokens} "
            f"tokens prefilled, {usage.cached_chunks} chunk states from cache]")


def _cmd_ask(args: argparse.Namespace) -> int:
    from .report import describe_chunk

    if not args.summary and not args.question:
        raise CLIError("ask needs a question: -q \"...\" (or --summary to summarise the files)", EXIT_USAGE)
    names, texts = _documents(args)
    sel = _selector(_engine(args), args)
    stream = (sel.stream_summary(texts, args.question, max_new_tokens=args.max_new_tokens) if args.summary
              else sel.stream(args.question, texts, max_new_tokens=args.max_new_tokens))
    if args.json:
        stream.text()
    else:
        print("Answer: ", end="", flush=True)
        for piece in stream:
            print(piece, end="", flush=True)
        print()
    ans = stream.answer
    if args.json:
        print(json.dumps({"question": args.question, **ans.to_dict(sources=names)}, indent=2))
        return 0
    if ans.chunk is None and not args.summary:
        print(f"(no chunk could answer: {ans.no_answer_reason})")
    elif ans.chunk is not None:
        print("\nFrom " + describe_chunk(ans.chunk, names))
    print("\n" + _usage_line(ans.usage), file=sys.stderr)
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from .errors import InputError
    from .report import describe_chunk

    names, texts = _documents(args)
    sel = _selector(_engine(args), args)
    if sel.cache is not None:
        n = sel.prepare(texts)
        print(f"Ready: {n} chunk states prepared. Ask a question (empty line or Ctrl-D to quit).", flush=True)
    while True:
        try:
            question = input("? ").strip()
        except EOFError:
            break
        if not question or question.lower() in ("exit", "quit"):
            break
        try:
            stream = sel.stream(question, texts, max_new_tokens=args.max_new_tokens)
            for piece in stream:
                print(piece, end="", flush=True)
            print()
        except InputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            continue
        ans = stream.answer
        if ans.chunk is not None:
            print("  from " + describe_chunk(ans.chunk, names, width=120).replace("\n", "\n  "))
        print("  " + _usage_line(ans.usage), file=sys.stderr)
    return 0


def _writable(path: str) -> Path:
    """Fail before any model work if ``path`` cannot be written."""
    p = Path(path)
    if p.is_dir():
        raise CLIError(f"--plot {path}: is a folder; give a file name such as entropy.png", EXIT_USAGE)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise CLIError(f"--plot {path}: the folder {parent} does not exist", EXIT_USAGE)
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise CLIError(f"--plot {path}: cannot write there (permission denied)", EXIT_USAGE)
    return p


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .report import entropy_bars, plot_entropy

    plot = _writable(args.plot) if args.plot else None
    names, texts = _documents(args)
    sel = _selector(_engine(args), args)
    res = sel.select(args.question, texts)
    if args.json:
        print(json.dumps(res.to_dict(sources=names), indent=2))
    else:
        print(entropy_bars(res.chunks))
        if res.best is not None:
            b = res.best
            print(f"\nselected: {names[b.doc_index]} chars {b.char_start}-{b.char_end} (entropy {b.entropy:.3f})")
        else:
            print(f"\nno chunk selected: {res.no_answer_reason}")
        print(_usage_line(res.usage), file=sys.stderr)
    if plot is not None:
        try:
            path = plot_entropy(res.chunks, plot, title=f"Q: {args.question}")
        except OSError as exc:
            raise CLIError(f"--plot {args.plot}: cannot write ({exc.strerror or exc})") from exc
        print(f"wrote {path}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _preload(args: argparse.Namespace) -> None:
    """Import what the command will need while Ctrl-C exits cleanly."""
    if args.command in ("ask", "chat", "inspect", "demo"):
        import torch  # noqa: F401
        import transformers  # noqa: F401


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(argv)
    except KeyboardInterrupt:  # anywhere, even before the command started
        print("\noprm-rag: interrupted", file=sys.stderr)
        return EXIT_INTERRUPT
    except BrokenPipeError:
        # stdout closed early (`oprm-rag ask ... | head -1`): stop quietly, like any Unix tool.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return EXIT_PIPE


def _main(argv: list[str]) -> int:
    if argv[:1] == ["serve"]:  # the web app parses its own options
        from .web.app import main as serve

        return serve(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    verbose = bool(getattr(args, "verbose", False))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        logging.getLogger("transformers").setLevel(logging.ERROR)

    def work() -> int:
        with startup_interrupts():
            _preload(args)
        if args.command in _PLUGINS:
            from importlib import import_module

            return int(import_module(_PLUGINS[args.command]).run(args))
        if args.command == "demo":
            from .demo import run_demo

            if args.base_url:
                raise CLIError("the demo runs a model in this process (it shows its state size and plain "
                               "inference beside OPRM); drop --base-url, or use `oprm-rag ask --base-url`", EXIT_USAGE)
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # the loader's bar would stay on screen above the results
            return run_demo(_engine(args).lm, facts=args.facts, seed=args.seed)
        return {"ask": _cmd_ask, "chat": _cmd_chat, "inspect": _cmd_inspect}[args.command](args)

    return run_reporting("oprm-rag", work, verbose=verbose)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
