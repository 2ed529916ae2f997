"""The ``oprm-rag`` command: ask, chat, inspect and demo, with clean errors.

Exit codes: 0 success, 1 a document or input problem, 2 bad usage, 3 the model could
not load, 130 interrupted (Ctrl-C). No tracebacks for expected failures.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Sequence

__all__ = ["main"]

EXIT_INPUT, EXIT_USAGE, EXIT_MODEL, EXIT_INTERRUPT = 1, 2, 3, 130


class CLIError(Exception):
    def __init__(self, message: str, code: int = EXIT_INPUT) -> None:
        super().__init__(message)
        self.code = code


def parse_chunk_tokens(value: str) -> int | str | None:
    """``--chunk-tokens``: a number of tokens, ``auto`` (from state capacity) or ``none`` (plain)."""
    if value.lower() in ("auto", "none"):
        return None if value.lower() == "none" else "auto"
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError("--chunk-tokens takes a number of tokens, 'auto' or 'none'") from None
    if n < 8:
        raise argparse.ArgumentTypeError("--chunk-tokens must be at least 8")
    return n


def _common(p: argparse.ArgumentParser, question: str | None, required: bool = False) -> None:
    p.add_argument("files", nargs="+", metavar="FILE", help=".txt, .md or .pdf files; - reads stdin")
    if question:
        p.add_argument("-q", "--question", required=required, help=question)
    _model_args(p)
    p.add_argument("--chunk-tokens", type=parse_chunk_tokens, default="auto",
                   help="tokens per chunk, 'auto' (from the model's state capacity) or 'none' (plain inference)")
    p.add_argument("--top-k", type=int, default=1, help="chunks to answer from (joined in document order)")
    p.add_argument("--no-idk-filter", action="store_true", help="keep chunks whose first answer token is the IDK word")
    p.add_argument("--boundary", choices=["sentence", "paragraph", "none"], default="sentence",
                   help="end chunks at sentence/paragraph ends where possible (default: sentence)")
    p.add_argument("--cache-dir", help="keep chunk states on disk here: follow-up runs cost only the question")
    p.add_argument("--max-new-tokens", type=int, default=64)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model folder or hub name (default: the shipped demo model)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("-v", "--verbose", action="store_true", help="log what the library decides")


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
    sub.add_parser("serve", help="the web QA page (its options: oprm-rag serve --help)", add_help=False)
    demo = sub.add_parser("demo", help="plain inference against OPRM on the shipped model")
    _model_args(demo)
    demo.add_argument("--facts", type=int, default=96, help="facts hidden in the demo document")
    demo.add_argument("--seed", type=int, default=7)
    return parser


def _load(args: argparse.Namespace) -> Any:
    from . import DEMO_MODEL
    from .registry import resolve_lm

    path = args.model or DEMO_MODEL
    try:
        kwargs = {k: v for k, v in (("device", args.device), ("dtype", args.dtype)) if v}
        return resolve_lm(path, **kwargs)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # anything from transformers / torch while loading
        raise CLIError(f"could not load the model {path!r}: {exc}", EXIT_MODEL) from exc


def _selector(lm: Any, args: argparse.Namespace) -> Any:
    from .cache import DocumentStateCache
    from .selector import OPRMSelector

    cache: Any = True
    if getattr(args, "cache_dir", None):
        cache = DocumentStateCache(directory=args.cache_dir)
    try:
        return OPRMSelector(lm, chunk_tokens=args.chunk_tokens, top_k=args.top_k,
                            idk_filter=not args.no_idk_filter,
                            boundary=None if args.boundary == "none" else args.boundary,
                            cache=cache, show_progress=sys.stderr.isatty() or bool(getattr(args, "verbose", False)))
    except (ValueError, TypeError) as exc:
        raise CLIError(str(exc), EXIT_USAGE) from exc


def _documents(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    from .readers import DocumentError, read_documents

    try:
        docs = read_documents(args.files)
    except DocumentError as exc:
        raise CLIError(str(exc)) from exc
    return [d.name for d in docs], [d.text for d in docs]


def _cmd_ask(args: argparse.Namespace) -> int:
    from .report import describe_chunk

    if not args.summary and not args.question:
        raise CLIError("ask needs a question: -q \"...\" (or --summary to summarise the files)", EXIT_USAGE)
    names, texts = _documents(args)
    lm = _load(args)
    sel = _selector(lm, args)
    try:
        stream = (sel.stream_summary(texts, args.question, max_new_tokens=args.max_new_tokens) if args.summary
                  else sel.stream(args.question, texts, max_new_tokens=args.max_new_tokens))
        if args.json:
            text = stream.text()
        else:
            print("Answer: ", end="", flush=True)
            for piece in stream:
                print(piece, end="", flush=True)
            print()
    except ValueError as exc:
        raise CLIError(str(exc)) from exc
    ans = stream.answer
    if args.json:
        print(json.dumps({
            "question": args.question,
            "answer": text, "all_idk": ans.all_idk, "usage": ans.usage,
            "winner": ({**ans.chunk.to_dict(), "file": names[ans.chunk.doc_index]} if ans.chunk else None),
            "chunks": [{**c.to_dict(), "file": names[c.doc_index]} for c in ans.chunks],
        }, indent=2, default=str))
        return 0
    if ans.all_idk and ans.chunk is None:
        print(f"(every chunk answered {lm.prompt.idk_word!r}: the documents do not seem to hold the answer)")
    elif ans.chunk is not None:
        print("\nFrom " + describe_chunk(ans.chunk, names))
    print(f"\n[{len(ans.chunks)} chunks scored; {ans.usage.get('input_tokens')} tokens prefilled, "
          f"{ans.usage.get('cached_chunks', 0)} chunk states from cache]", file=sys.stderr)
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from .report import describe_chunk

    names, texts = _documents(args)
    lm = _load(args)
    sel = _selector(lm, args)
    if lm.backend.exact_continuation:
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
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            continue
        ans = stream.answer
        if ans.chunk is not None:
            print("  from " + describe_chunk(ans.chunk, names, width=120).replace("\n", "\n  "))
        print(f"  [{ans.usage.get('input_tokens')} tokens prefilled]", file=sys.stderr)
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .report import entropy_bars, plot_entropy

    names, texts = _documents(args)
    lm = _load(args)
    sel = _selector(lm, args)
    try:
        res = sel.select(args.question, texts)
    except ValueError as exc:
        raise CLIError(str(exc)) from exc
    print(entropy_bars(res.chunks))
    if res.best is not None:
        b = res.best
        print(f"\nselected: {names[b.doc_index]} chars {b.char_start}-{b.char_end} (entropy {b.entropy:.3f})")
    else:
        print(f"\nevery chunk answered {res.idk_word!r}")
    if args.plot:
        path = plot_entropy(res.chunks, args.plot, title=f"Q: {args.question}")
        print(f"wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:  # the web app parses its own options
        from .web.app import main as serve

        return serve(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "verbose", False):
        logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(_load(args), facts=args.facts, seed=args.seed)
        return {"ask": _cmd_ask, "chat": _cmd_chat, "inspect": _cmd_inspect}[args.command](args)
    except CLIError as exc:
        print(f"oprm-rag: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("\noprm-rag: interrupted", file=sys.stderr)
        return EXIT_INTERRUPT


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
