"""Command-line options shared by ``oprm-rag`` and ``oprm-rag serve``.

The selector flags map one to one onto :class:`~oprm_rag.options.SelectorOptions`; a
flag left out keeps the core default (flags are ``SUPPRESS``-ed, never defaulted here),
so the CLI and the web app choose exactly what the library chooses.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from typing import Any, Callable, Iterator

__all__ = ["CLIError", "add_model_args", "add_selector_args", "selector_options_from_args", "positive_int",
           "engine_from_args", "startup_interrupts", "chunk_tokens_arg", "run_reporting",
           "EXIT_INPUT", "EXIT_USAGE", "EXIT_MODEL", "EXIT_BUG", "EXIT_INTERRUPT", "EXIT_PIPE"]

EXIT_INPUT, EXIT_USAGE, EXIT_MODEL, EXIT_BUG, EXIT_INTERRUPT, EXIT_PIPE = 1, 2, 3, 4, 130, 141


class CLIError(Exception):
    """A failure to report in one line, with its exit code."""

    def __init__(self, message: str, code: int = EXIT_INPUT) -> None:
        super().__init__(message)
        self.code = code


def chunk_tokens_arg(value: str) -> Any:
    from .errors import OptionError
    from .options import parse_chunk_tokens

    try:
        return parse_chunk_tokens(value)
    except OptionError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _number(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    return x


def positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {n}")
    return n


def _default(name: str) -> str:
    from .options import SelectorOptions

    return repr(getattr(SelectorOptions(), name))


def add_model_args(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--base-url`` (a served model), ``--device``, ``--dtype``, ``-v``."""
    p.add_argument("--model", default=None,
                   help="model folder or hub name (default: the shipped demo model); with --base-url, the "
                        "served model's name")
    p.add_argument("--base-url", default=None,
                   help="an OpenAI-compatible server (vLLM, llama.cpp, SGLang, Ollama), e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default=None, help="the server's API key (default: $OPENAI_API_KEY, else none)")
    p.add_argument("--tokenizer", default=None,
                   help="with --base-url: a local tokenizer folder for exact token counts and chunk boundaries")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("-v", "--verbose", action="store_true", help="log what the library decides")


def add_selector_args(p: argparse.ArgumentParser) -> None:
    """Selector options; each left out takes the library's default (``SelectorOptions``)."""
    p.add_argument("--chunk-tokens", type=chunk_tokens_arg, default=argparse.SUPPRESS,
                   help="tokens per chunk, 'auto' (the model's own) or 'none' (plain inference); default "
                        + _default("chunk_tokens"))
    p.add_argument("--chunk-overlap", type=positive_int, default=argparse.SUPPRESS,
                   help="tokens repeated from the previous chunk; default " + _default("chunk_overlap"))
    p.add_argument("--boundary", choices=["sentence", "paragraph", "none"], default=argparse.SUPPRESS,
                   help="end chunks at sentence/paragraph ends where possible; default " + _default("boundary"))
    p.add_argument("--top-k", type=positive_int, default=argparse.SUPPRESS,
                   help="chunks to answer from (joined in document order); default " + _default("top_k"))
    p.add_argument("--criterion", choices=["entropy", "question_likelihood"], default=argparse.SUPPRESS,
                   help="how chunks are ranked; default " + _default("criterion"))
    p.add_argument("--no-idk-filter", dest="idk_filter", action="store_false", default=argparse.SUPPRESS,
                   help="keep chunks whose first answer token is the IDK word")
    p.add_argument("--idk-word", default=argparse.SUPPRESS, help="the IDK word (default: the model prompt's)")
    p.add_argument("--idk-threshold", type=_number, default=argparse.SUPPRESS,
                   help="also drop chunks whose IDK probability is above this")
    p.add_argument("--entropy-threshold", type=float, default=argparse.SUPPRESS,
                   help="also drop chunks whose entropy (nats) is above this")
    p.add_argument("--fallback", choices=["min_entropy", "none"], default=argparse.SUPPRESS,
                   help="min_entropy: answer from the surest chunk even when every chunk is dropped")
    p.add_argument("--max-batch-tokens", type=positive_int, default=argparse.SUPPRESS,
                   help="rows x tokens per model call; default " + _default("max_batch_tokens"))


_SELECTOR_ARGS = ("chunk_tokens", "chunk_overlap", "boundary", "top_k", "criterion", "idk_filter", "idk_word",
                  "idk_threshold", "entropy_threshold", "fallback", "max_batch_tokens")


def selector_options_from_args(args: argparse.Namespace, **extra: Any) -> Any:
    """The ``SelectorOptions`` the flags ask for (flags left out keep the core defaults)."""
    from .errors import OptionError
    from .options import SelectorOptions

    given = {k: getattr(args, k) for k in _SELECTOR_ARGS if hasattr(args, k)}
    for key in ("boundary", "fallback"):
        if given.get(key) == "none":
            given[key] = None
    try:
        return SelectorOptions.build(**given, **extra)
    except OptionError as exc:
        raise CLIError(str(exc), EXIT_USAGE) from exc


def engine_from_args(args: argparse.Namespace) -> Any:
    """The model the command runs on: a served one (``--base-url``) or a local one.

    Loading writes nothing, so Ctrl-C during it exits on the spot (``startup_interrupts``).
    """
    with startup_interrupts():
        return _load_engine(args)


def _load_engine(args: argparse.Namespace) -> Any:
    from .errors import ModelLoadError, OPRMError

    if getattr(args, "base_url", None):
        if not args.model:
            raise CLIError("--base-url needs --model NAME (the model's name on that server)", EXIT_USAGE)
        try:
            from .served import OpenAICompatibleLM
        except ImportError as exc:
            raise CLIError(f"serving needs the [served] extra: pip install 'oprm-rag[served]' ({exc})",
                           EXIT_MODEL) from exc
        try:
            return OpenAICompatibleLM(base_url=args.base_url, model=args.model,
                                      api_key=args.api_key or os.environ.get("OPENAI_API_KEY"),
                                      tokenizer=args.tokenizer)
        except OPRMError as exc:
            raise CLIError(str(exc), EXIT_MODEL) from exc
    from ._about import DEMO_MODEL
    from .engine.resolve import resolve

    path = args.model or DEMO_MODEL
    kwargs = {k: v for k, v in (("device", args.device), ("dtype", args.dtype)) if v}
    try:
        return resolve(path, **kwargs)
    except KeyboardInterrupt:
        raise
    except ModelLoadError as exc:
        raise CLIError(f"could not load the model {path!r}: {exc}", EXIT_MODEL) from exc
    except Exception as exc:  # noqa: BLE001 - anything else from transformers / torch while loading
        raise CLIError(f"could not load the model {path!r}: {type(exc).__name__}: {exc}", EXIT_MODEL) from exc


@contextlib.contextmanager
def startup_interrupts() -> Iterator[None]:
    """Ctrl-C while the heavy libraries load exits at once and cleanly (130).

    An interrupt that lands inside native start-up code (torch, tokenizers) can be
    swallowed, surface later as a traceback, or abort the process; nothing is written
    during start-up, so exiting on the spot loses nothing.
    """
    def stop(signum: int, frame: Any) -> None:  # noqa: ARG001
        try:
            os.write(2, b"\noprm-rag: interrupted\n")
        finally:
            os._exit(EXIT_INTERRUPT)

    previous: Any = None
    try:
        # Started with Ctrl-C ignored (``nohup ... &``): keep it ignored.
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            previous = signal.signal(signal.SIGINT, stop)
    except ValueError:  # not the main thread (embedded use): leave signals alone
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def run_reporting(prog: str, work: Callable[[], int], *, verbose: bool = False, interrupted: str = "") -> int:
    """Run a command; every failure ends in one line and its exit code.

    The user's mistakes (:class:`~oprm_rag.errors.InputError`: 1, options: 2), the
    model's side (:class:`~oprm_rag.errors.ModelLoadError`, a server, non-finite scores:
    3), Ctrl-C (130, with ``interrupted`` as a hint), and anything else as a bug with its
    type (4; ``verbose`` prints the traceback). A closed stdout is left to the caller.
    """
    from .errors import InputError, OPRMError, OptionError

    try:
        return work()
    except CLIError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.code
    except OptionError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except InputError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except OPRMError as exc:  # the model's side: loading, a server, non-finite scores
        print(f"{prog}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_MODEL
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted" + (f"; {interrupted}" if interrupted else ""), file=sys.stderr)
        return EXIT_INTERRUPT
    except BrokenPipeError:
        raise
    except Exception as exc:  # noqa: BLE001 - an internal fault: say it is one, with its type
        if verbose:
            import traceback

            traceback.print_exc()
        print(f"{prog}: internal error (a bug, please report it): {type(exc).__name__}: {exc}"
              + ("" if verbose else " (run with -v for the traceback)"), file=sys.stderr)
        return EXIT_BUG

