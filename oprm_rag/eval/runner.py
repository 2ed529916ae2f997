"""Run benchmark examples in vanilla and OPRM mode, one JSONL record per example and mode.

*Vanilla* is the selector with ``chunk_tokens=None``: the whole context in one state,
with LongBench's middle truncation for models that have a hard position limit (keep the
first and the last half of the prompt's tokens). *OPRM* is the selector with chunks,
the IDK filter and, for summary datasets, summary mode. Both modes read the same
examples with the same prompt words (plus OPRM's IDK instruction).

Records are appended (and flushed) one at a time to ``OUT/<dataset>.jsonl``; a run that
stops (Ctrl-C, a crash, a lost node) resumes where it stopped: records already written
are skipped, and a half-written last line is cut off before anything is appended. The
run's settings are kept in ``OUT/run.json``; resuming with different settings is refused
rather than mixing two runs in one table.

With a model behind a server (an ``Engine`` that holds no states in this process),
several examples are in flight at once (``max_concurrency``); in-process models run one
example at a time (the model already uses the whole machine).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

from ..engine import Engine
from ..errors import InputError
from .datasets import Example
from .prompts import PromptParts

if TYPE_CHECKING:  # pragma: no cover
    from ..engine.resolve import ModelLike
    from ..prompts import PromptTemplate

__all__ = ["Mode", "MODES", "Predictor", "Prediction", "ResultStore", "RunItem", "run_items", "position_limit",
           "is_served", "truncate_middle", "model_prompt"]

logger = logging.getLogger("oprm_rag.eval")

Mode = str
MODES: tuple[str, ...] = ("vanilla", "oprm")


# ---------------------------------------------------------------------- the model, as the runner sees it
def is_served(model: object) -> bool:
    """True for an engine whose model runs on a server (its requests can run concurrently),
    False for an in-process engine (one model, one call at a time) and for anything else."""
    from ..engine.local import InProcessEngine

    return isinstance(model, Engine) and not isinstance(model, InProcessEngine)


def position_limit(engine: Engine) -> int | None:
    """The most tokens one sequence may hold, for models with absolute positions; None
    for recurrent models (their vanilla baseline reads the whole context, as the paper's)."""
    return engine.describe().position_limit


def model_prompt(engine: Engine) -> "PromptTemplate":
    """The model's own ``PromptTemplate`` (its folder's ``oprm_prompt.json`` or the default)."""
    return engine.prompt


def _encode(model: Engine, text: str) -> list[int]:
    return list(model.encode(text))


def truncate_middle(parts: PromptParts, model: Engine, limit: int) -> tuple[PromptParts, bool]:
    """LongBench's truncation: when P + C + Q exceeds ``limit`` tokens, keep the first
    ``limit // 2`` and the last ``limit // 2`` tokens of the prompt.

    The cut always falls inside the context (P and Q are far shorter than half a window),
    so we cut the context's tokens and keep P and Q whole: the same tokens LongBench keeps.
    """
    p, c, q = _encode(model, parts.instruction), _encode(model, parts.context), _encode(model, parts.question)
    if len(p) + len(c) + len(q) <= limit:
        return parts, False
    half = limit // 2
    head, tail = max(0, half - len(p)), max(0, half - len(q))
    context = model.decode(c[:head]) + (model.decode(c[-tail:]) if tail else "")
    return PromptParts(parts.instruction, context, parts.question, parts.summary, parts.idk_means), True


# ---------------------------------------------------------------------- predicting
@dataclass
class Prediction:
    """One answer and what it cost."""

    text: str
    usage: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    truncated: bool = False
    chunk_tokens: int | None = None


def _usage(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        return dict(to_dict())
    try:
        from dataclasses import asdict

        return asdict(value)
    except TypeError:
        return {"usage": str(value)}


class Predictor:
    """Answers one example in one mode through the public ``OPRMSelector`` API.

    Args:
        model: a ``RecurrentLM`` or an ``Engine`` (in-process or served).
        mode: ``"vanilla"`` or ``"oprm"``.
        chunk_tokens: OPRM's chunk length (int or ``"auto"``); ignored in vanilla mode.
        idk_filter: OPRM drops chunks answering the IDK word (the paper's rule).
        use_chat_template: wrap P + C + Q in the model's chat template (instruct models).
        max_length: vanilla's token budget (LongBench's middle truncation); None = the
            model's position limit, or no truncation for recurrent models.
    """

    def __init__(self, model: "ModelLike", mode: Mode, *, chunk_tokens: int | str = "auto",
                 idk_filter: bool = True, use_chat_template: bool | None = None,
                 max_length: int | None = None) -> None:
        if mode not in MODES:
            raise InputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        from ..engine.resolve import resolve

        self.model: Engine = resolve(model)
        self.mode = mode
        self.chunk_tokens = chunk_tokens
        self.idk_filter = idk_filter
        own = model_prompt(model)
        self.idk_word: str = own.idk_word
        self.system_prompt = getattr(own, "system_prompt", None)
        self.use_chat_template = own.use_chat_template if use_chat_template is None else bool(use_chat_template)
        self.max_length = max_length  # an explicit budget (LongBench's model2maxlen), else from the limit
        self.position_limit = position_limit(model)
        self._local = threading.local()  # selectors per thread: served runs predict concurrently
        self._resolved_chunk: int | None = None

    # -- selectors
    def _template(self, instruction: str) -> Any:
        from ..prompts import PromptTemplate

        return PromptTemplate(instruction=instruction, question_template="{question}", idk_word=self.idk_word,
                              use_chat_template=self.use_chat_template, system_prompt=self.system_prompt)

    def selector(self, instruction: str | None = None) -> Any:
        """The selector for this mode and instruction (None: the model's own prompt)."""
        from .. import OPRMSelector

        cache = self._local.__dict__.setdefault("selectors", {})
        sel = cache.get(instruction)
        if sel is None:
            prompt = None if instruction is None else self._template(instruction)
            if prompt is None and self.use_chat_template != model_prompt(self.model).use_chat_template:
                from dataclasses import replace

                prompt = replace(model_prompt(self.model), use_chat_template=self.use_chat_template)
            vanilla = self.mode == "vanilla"
            sel = OPRMSelector(self.model, chunk_tokens=None if vanilla else self.chunk_tokens, prompt=prompt,
                               idk_filter=self.idk_filter and not vanilla, cache=False)
            cache[instruction] = sel
        return sel

    def resolved_chunk_tokens(self) -> int | None:
        """OPRM's chunk length in tokens (``auto`` resolved), None in vanilla mode."""
        if self.mode == "vanilla":
            return None
        if isinstance(self.chunk_tokens, int):
            return self.chunk_tokens
        if self._resolved_chunk is None:
            value = self.selector(None).chunk_tokens
            if value is None:
                value = self.model.describe().auto_chunk.tokens
            self._resolved_chunk = int(value)
        return self._resolved_chunk

    #: Tokens kept free for the chat template's turn markers when the budget comes from
    #: the model's position limit (LongBench's own budgets leave a few hundred).
    TEMPLATE_MARGIN = 64

    def prompt_budget(self, max_new_tokens: int) -> int | None:
        """Vanilla's prompt budget: ``max_length`` if given, else the position limit less
        the answer and the template's markers; None (no truncation) for recurrent models."""
        if self.max_length is not None:
            return self.max_length
        if self.position_limit is None:
            return None
        return max(16, self.position_limit - max_new_tokens - self.TEMPLATE_MARGIN)

    # -- answering
    def predict(self, parts: PromptParts, max_new_tokens: int, *, keep_tail: bool = False) -> Prediction:
        """Answer ``parts`` (P, C, Q). ``keep_tail`` (lcc under OPRM, as the paper's code):
        read only the last chunk of the context instead of selecting among chunks."""
        start = time.perf_counter()
        truncated = False
        budget = self.prompt_budget(max_new_tokens)
        if self.mode == "vanilla" and budget is not None:
            parts, truncated = truncate_middle(parts, self.model, budget)
        chunk = self.resolved_chunk_tokens()
        if keep_tail and chunk is not None:
            ids = _encode(self.model, parts.context)
            if len(ids) > chunk:
                parts = PromptParts(parts.instruction, self.model.decode(ids[-chunk:]), parts.question, parts.summary,
                                    parts.idk_means)
        sel = self.selector(parts.instruction)
        if parts.summary and self.mode == "oprm":
            answer = sel.summarize(parts.context, question=parts.question, max_new_tokens=max_new_tokens)
        else:
            answer = sel.answer(parts.question, parts.context, max_new_tokens=max_new_tokens)
        text = answer.text
        if parts.idk_means is not None and text.strip() == self.idk_word:
            text = parts.idk_means
        return Prediction(text, _usage(getattr(answer, "usage", None)), time.perf_counter() - start, truncated, chunk)

    def predict_own_prompt(self, question: str, context: str, max_new_tokens: int) -> Prediction:
        """Answer with the model's own prompt (custom data, the needle task)."""
        start = time.perf_counter()
        sel = self.selector(None)
        answer = sel.answer(question, context, max_new_tokens=max_new_tokens)
        return Prediction(answer.text, _usage(getattr(answer, "usage", None)), time.perf_counter() - start, False,
                          self.resolved_chunk_tokens())


# ---------------------------------------------------------------------- records
#: Files of the store itself: no dataset's records file may take one of these names.
ERRORS_FILE, SETTINGS_FILE = "errors.jsonl", "run.json"
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyz" "ABCDEFGHIJKLMNOPQRSTUVWXYZ" "0123456789" "-_.")
_FILES_KEY = "_files"  # run.json: which dataset owns which records file


def records_name(dataset: str) -> str:
    """The records file's name for ``dataset``: one name per dataset and one dataset per
    name (injective), so two datasets never share a file.

    Letters, digits, ``-``, ``_`` and ``.`` stay as they are (``qasper`` -> ``qasper.jsonl``);
    every other character becomes ``~`` and its UTF-8 bytes in hex (``my data`` ->
    ``my~20data.jsonl``, never ``my_data.jsonl``); a name that would be one of the store's
    own files (``errors``) or hidden (``.x``) gets a leading ``~``, which escaping never
    produces. The mapping is case-sensitive; :meth:`ResultStore.claim` refuses two
    datasets whose names differ only in case (one file on macOS and Windows)."""
    out = "".join(ch if ch in _SAFE else "".join(f"~{b:02x}" for b in ch.encode("utf-8")) for ch in dataset)
    if not out or out.startswith(".") or f"{out}.jsonl".lower() in (ERRORS_FILE, SETTINGS_FILE):
        out = "~" + out
    return f"{out}.jsonl"


def _valid_record(value: Any) -> bool:
    return (isinstance(value, dict) and "_id" in value and isinstance(value.get("mode"), str)
            and isinstance(value.get("score"), (int, float)) and not isinstance(value.get("score"), bool))


class ResultStore:
    """Per-dataset JSONL files of records under one folder, appended one record at a time.

    Every failure to read or write the folder is the user's problem, said in one line
    (:class:`~oprm_rag.errors.InputError`): ``--out`` that is a file, a read-only or full
    disk. A damaged records file (a crash mid-write, an edit) never stops a resume: lines
    that are not records are moved to ``NAME.jsonl.damaged`` and the rest is kept.
    """

    def __init__(self, out_dir: str | Path, *, create: bool = True) -> None:
        from ..user_files import check_output_dir

        self.dir = check_output_dir(out_dir, "--out", create=create)  # create=False: checked, made by create()
        self._lock = threading.Lock()

    def create(self) -> None:
        """Make the folder (a store opened with ``create=False``, once the work starts)."""
        from ..user_files import check_output_dir

        check_output_dir(self.dir, "--out")

    def path(self, dataset: str) -> Path:
        return self.dir / records_name(dataset)

    def outputs(self, datasets: Iterable[str]) -> list[Path]:
        """Every file the store writes for ``datasets`` (to check against the inputs)."""
        paths = [self.dir / ERRORS_FILE, self.dir / SETTINGS_FILE]
        for d in datasets:
            p = self.path(d)
            paths += [p, p.with_name(p.name + ".damaged")]
        return paths

    def _write_problem(self, exc: OSError, path: Path) -> InputError:
        from ..user_files import os_problem

        return os_problem(exc, f"cannot write the results in {path}; what was recorded before is kept")

    def _repair(self, path: Path) -> None:
        """Make ``path`` whole records, one a line, before anything is appended: a
        half-written last line (an interrupted write) is cut; a line that is not a record
        (unparsable, or not an object with ``_id``, ``mode`` and ``score``) is moved to
        ``NAME.jsonl.damaged`` (kept for the user to look at; a rerun answers it again)."""
        if not path.is_file():
            return
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise self._write_problem(exc, path) from None
        lines = data.split(b"\n")
        cut = b""
        if lines and lines[-1] != b"":  # no newline at the end: an interrupted write
            cut = lines.pop()
        keep, bad = [], []
        for line in lines:
            if not line.strip():
                continue
            try:
                ok = _valid_record(json.loads(line.decode("utf-8")))
            except (ValueError, RecursionError):  # JSON, UTF-8 (both ValueErrors) or absurd nesting
                ok = False
            (keep if ok else bad).append(line)
        if not bad and not cut:
            return
        try:
            if bad:
                with path.with_name(path.name + ".damaged").open("ab") as fh:
                    fh.write(b"".join(line + b"\n" for line in bad))
            from ..user_files import replace_atomically

            with replace_atomically(path, "cannot repair the results file") as tmp:
                tmp.write_bytes(b"".join(line + b"\n" for line in keep))
        except OSError as exc:
            raise self._write_problem(exc, path) from None
        if cut:
            logger.warning("%s: dropped a half-written last record (interrupted run)", path)
        if bad:
            logger.warning("%s: %d line(s) were not records; moved to %s.damaged (they are answered again)",
                           path, len(bad), path.name)

    def records(self, dataset: str) -> list[dict[str, Any]]:
        """Every complete record of ``dataset`` (lines that are not records are skipped)."""
        path = self.path(dataset)
        if not path.is_file():
            return []
        try:
            data = path.read_bytes()
        except OSError as exc:
            from ..user_files import os_problem

            raise os_problem(exc, f"cannot read the results file {path}") from None
        out = []
        for line in data.split(b"\n"):
            if not line.strip():
                continue
            try:
                value = json.loads(line.decode("utf-8"))
            except (ValueError, RecursionError):
                continue
            if _valid_record(value):
                out.append(value)
        return out

    def done(self, dataset: str) -> set[tuple[str, str]]:
        """(``_id``, mode) pairs already recorded for ``dataset``."""
        return {(str(r.get("_id")), str(r.get("mode"))) for r in self.records(dataset)}

    def open_for_append(self, dataset: str) -> None:
        self._repair(self.path(dataset))

    def _append_line(self, path: Path, record: Mapping[str, Any], sync: bool) -> None:
        line = json.dumps(record, ensure_ascii=False, default=str) + "\n"
        try:
            with self._lock, path.open("a", encoding="utf-8") as fh:
                fh.write(line)
                fh.flush()
                if sync:
                    os.fsync(fh.fileno())
        except OSError as exc:
            raise self._write_problem(exc, path) from None

    def append(self, record: Mapping[str, Any]) -> None:
        self._append_line(self.path(str(record["dataset"])), record, sync=True)

    def error(self, record: Mapping[str, Any]) -> None:
        self._append_line(self.dir / ERRORS_FILE, record, sync=False)

    # -- the run's settings
    def _settings(self) -> dict[str, Any]:
        path = self.dir / SETTINGS_FILE
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            from ..user_files import os_problem

            raise os_problem(exc, f"cannot read {path}") from None
        except (ValueError, RecursionError):
            data = None
        if not isinstance(data, dict):
            raise InputError(f"{path} is damaged (not the JSON object this command writes); delete it (and the "
                             "results) or use another --out")
        return data

    def check_config(self, benchmark: str, config: Mapping[str, Any], *, save: bool = True,
                     datasets: Iterable[str] = ()) -> None:
        """Refuse to resume a folder made with other settings, or whose records files belong
        to other datasets; with ``save``, record the run's settings (``run.json``)."""
        path = self.dir / SETTINGS_FILE
        data = self._settings()
        old = data.get(benchmark)
        new = json.loads(json.dumps(dict(config), default=str))
        if old is not None and old != new:
            if not isinstance(old, dict):
                old = {}
            diff = ", ".join(f"{k}: {old.get(k)!r} before, {new.get(k)!r} now"
                             for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))
            raise InputError(f"{self.dir} holds {benchmark} results of a run with other settings ({diff}); "
                             "use another --out, or delete that folder to start over")
        files = data.get(_FILES_KEY) if isinstance(data.get(_FILES_KEY), dict) else {}
        owners = {str(name).lower(): owner for name, owner in files.items()}
        for d in datasets:
            name = records_name(d)
            owner = owners.get(name.lower())
            if owner is not None and owner != d:
                raise InputError(f"{self.dir}: the records file {name} holds the results of {owner!r}, not of {d!r} "
                                 "(their names differ only in case or escaping); use another --out for this one")
            files[name] = owners[name.lower()] = d
        if not save:
            return
        data[benchmark] = new
        if files:
            data[_FILES_KEY] = files
        from ..user_files import replace_atomically

        with replace_atomically(path, "cannot write the run's settings") as tmp:  # never half a run.json
            tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------- the loop
@dataclass
class RunItem:
    """One (example, mode) to answer, and how to turn the answer into a record."""

    example: Example
    mode: Mode
    work: Callable[[], dict[str, Any]]  # answers and returns the record (with a "score")


@dataclass
class RunStats:
    done: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)


def _progress(total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="ex", disable=None, leave=False)


def run_items(items: Sequence[RunItem], store: ResultStore, *, max_concurrency: int = 1, desc: str = "",
              stats: RunStats | None = None) -> RunStats:
    """Answer every item not yet recorded, appending each record as soon as it exists.

    An item whose answer raises an :class:`InputError` (an example the model cannot
    take) is logged to ``errors.jsonl`` and not recorded, so a rerun retries it; any
    other exception and Ctrl-C stop the run (what was recorded stays).
    """
    stats = stats or RunStats()
    datasets = {it.example.dataset for it in items}
    done: dict[str, set[tuple[str, str]]] = {}
    for d in datasets:
        store.open_for_append(d)
        done[d] = store.done(d)
    todo = [it for it in items if (it.example.id, it.mode) not in done[it.example.dataset]]
    stats.skipped += len(items) - len(todo)
    if not todo:
        return stats
    bar = _progress(len(todo), desc)

    def finish(item: RunItem, record: dict[str, Any] | None, exc: BaseException | None) -> None:
        if exc is not None:
            if not isinstance(exc, InputError):
                raise exc
            msg = f"{item.example.dataset} {item.example.id} ({item.mode}): {exc}"
            stats.errors.append(msg)
            store.error({"_id": item.example.id, "dataset": item.example.dataset, "mode": item.mode,
                         "error": str(exc)})
            logger.warning("skipped %s", msg)
        else:
            assert record is not None
            store.append(record)
            stats.done += 1
        bar.update(1)

    try:
        if max_concurrency <= 1:
            for item in todo:
                try:
                    record = item.work()
                except InputError as exc:
                    finish(item, None, exc)
                    continue
                finish(item, record, None)
        else:
            _run_concurrently(todo, max_concurrency, finish)
    finally:
        bar.close()
    return stats


def _run_concurrently(todo: Sequence[RunItem], workers: int,
                      finish: Callable[[RunItem, dict[str, Any] | None, BaseException | None], None]) -> None:
    """Keep ``workers`` items in flight; record each as it completes (in completion order)."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="oprm-eval")
    queue = iter(todo)
    running: dict[Future, RunItem] = {}
    try:
        for item in queue:
            running[pool.submit(item.work)] = item
            if len(running) >= workers:
                break
        while running:
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                item = running.pop(fut)
                exc = fut.exception()
                finish(item, None if exc else fut.result(), exc)
                nxt = next(queue, None)
                if nxt is not None:
                    running[pool.submit(nxt.work)] = nxt
    finally:
        for fut in running:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def iter_modes(mode: str) -> tuple[Mode, ...]:
    """``vanilla``, ``oprm`` or ``both`` as the modes to run, vanilla first."""
    if mode == "both":
        return MODES
    if mode not in MODES:
        raise InputError(f"--mode must be vanilla, oprm or both, got {mode!r}")
    return (mode,)


def interleave(examples: Iterable[Example], modes: Sequence[Mode],
               make: Callable[[Example, Mode], Callable[[], dict[str, Any]]]) -> list[RunItem]:
    """Items for every example in every mode, modes adjacent: an interrupted ``both`` run
    leaves pairs that can be compared."""
    return [RunItem(ex, m, make(ex, m)) for ex in examples for m in modes]
