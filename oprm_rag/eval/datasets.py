"""Readers for LongBench, LongBench v2 and the custom ``{context, question, answers}`` JSONL.

Everything is read from local files in the published schemas, so a machine without the
hub (or a cluster with a shared disk) runs the benchmark the same way:

* **LongBench** — one JSONL file per dataset, as in LongBench's ``data.zip``: ``DIR/NAME.jsonl``
  or ``DIR/data/NAME.jsonl`` (``NAME_e.jsonl`` for LongBench-E), each line with ``input``,
  ``context``, ``answers``, ``all_classes``, ``length``, ``dataset``, ``language`` and ``_id``.
* **LongBench v2** — ``data.json`` (a JSON list, as the hub's file) or any ``.jsonl`` /
  ``.json`` file with ``_id``, ``domain``, ``sub_domain``, ``difficulty``, ``length``,
  ``question``, ``choice_A``..``choice_D``, ``answer`` and ``context``.
* **custom** — JSONL with ``context``, ``question`` and ``answers`` (a list or one string),
  optionally ``_id``.

``--download`` fetches the files with the ``datasets`` library (imported only then)
and writes them in the layout above; where the hub cannot be reached the error says so
and shows the layout to provide instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..errors import InputError

__all__ = ["Example", "read_longbench", "read_longbench_v2", "read_custom", "download_longbench",
           "download_longbench_v2", "LONGBENCH_LAYOUT", "V2_LAYOUT", "longbench_file", "custom_file", "v2_files"]

LONGBENCH_LAYOUT = ("DIR/qasper.jsonl, DIR/hotpotqa.jsonl, ... (or DIR/data/NAME.jsonl: the layout of LongBench's "
                    "data.zip; NAME_e.jsonl for LongBench-E), one JSON object per line with input, context, answers, "
                    "all_classes, length, _id")
V2_LAYOUT = ("DIR/data.json (the hub's file: a JSON list) or DIR/*.jsonl, each item with _id, domain, sub_domain, "
             "difficulty, length, question, choice_A..choice_D, answer, context")

_V2_FIELDS = ("_id", "difficulty", "length", "question", "choice_A", "choice_B", "choice_C", "choice_D", "answer",
              "context")


@dataclass
class Example:
    """One benchmark item, whatever its source.

    ``input`` is the question (LongBench's field name), ``answers`` the references;
    ``meta`` keeps what scoring or reporting needs (``all_classes``, ``length``,
    ``difficulty``, ``length_class``, ...).
    """

    id: str
    dataset: str
    context: str
    input: str
    answers: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


def _lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """The JSON objects of a JSONL file, one a line; any problem with the file is the
    user's (InputError, with the line): not UTF-8, not JSON, nested absurdly deep."""
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    with handle:
        for number, raw in enumerate(_read_lines(handle, path), 1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(f"{path}:{number}: not UTF-8 text (byte {exc.start + 1} of the line); save the "
                                 "file as UTF-8") from None
            if not line.strip():
                continue
            item = _parse_json(line, f"{path}:{number}")
            if not isinstance(item, dict):
                raise InputError(f"{path}:{number}: each line must be a JSON object")
            yield number, item


def _read_lines(handle: Any, path: Path) -> Iterator[bytes]:
    try:
        yield from handle
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: not valid JSON ({exc.msg})") from None
    except RecursionError:
        raise InputError(f"{where}: the JSON is nested too deeply to be a benchmark item") from None


def _answers(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(a, str) for a in value):
        return list(value)
    raise InputError(f"{where}: 'answers' must be a non-empty list of strings (or one string)")


def longbench_file(data_dir: str | Path, dataset: str, e: bool = False) -> Path:
    """Where ``dataset`` is in ``data_dir`` (``NAME.jsonl`` or ``data/NAME.jsonl``)."""
    root = Path(data_dir)
    name = f"{dataset}_e.jsonl" if e else f"{dataset}.jsonl"
    for candidate in (root / name, root / "data" / name):
        if candidate.is_file():
            return candidate
    if not root.is_dir():
        raise InputError(f"--data {root}: no such folder. Provide LongBench as {LONGBENCH_LAYOUT}, or pass "
                         "--download where the hub is reachable")
    raise InputError(f"{dataset}: no {name} in {root} (nor in {root / 'data'}). Provide LongBench as "
                     f"{LONGBENCH_LAYOUT}, or pass --download where the hub is reachable")


def read_longbench(data_dir: str | Path, dataset: str, *, e: bool = False, limit: int | None = None) -> list[Example]:
    """The examples of one LongBench dataset, in file order (first ``limit`` only if given)."""
    path = longbench_file(data_dir, dataset, e)
    out: list[Example] = []
    for number, item in _lines(path):
        where = f"{path}:{number}"
        for key in ("input", "context", "answers"):
            if key not in item:
                raise InputError(f"{where}: missing field {key!r} (LongBench lines have input, context, answers, "
                                 "all_classes, length, _id)")
        out.append(Example(
            id=str(item.get("_id") or f"{dataset}-{number}"), dataset=dataset, context=str(item["context"] or ""),
            input=str(item["input"] or ""), answers=_answers(item["answers"], where),
            meta={"all_classes": item.get("all_classes"), "length": item.get("length"),
                  "language": item.get("language")}))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise InputError(f"{path} holds no examples")
    _check_unique(out, path)
    return out


def _check_unique(examples: list[Example], path: Path) -> None:
    seen: set[str] = set()
    for ex in examples:
        if ex.id in seen:
            raise InputError(f"{path}: _id {ex.id!r} appears twice; results are keyed by _id, so ids must be unique")
        seen.add(ex.id)


def _v2_items(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    if path.suffix == ".json":
        try:
            text = path.read_text(encoding="utf-8-sig")
        except OSError as exc:
            raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise InputError(f"{path}: not UTF-8 text; save the file as UTF-8") from None
        data = _parse_json(text, str(path))
        if not isinstance(data, list):
            raise InputError(f"{path}: LongBench v2's data.json is a JSON list of items")
        for i, item in enumerate(data):
            if not isinstance(item, dict):
                raise InputError(f"{path}: item {i} is not a JSON object")
            yield f"{path}[{i}]", item
    else:
        for number, item in _lines(path):
            yield f"{path}:{number}", item


def v2_files(data: str | Path) -> list[Path]:
    """The LongBench v2 files ``--data`` names (see :data:`V2_LAYOUT`)."""
    root = Path(data)
    if root.is_file():
        return [root]
    if root.is_dir():
        if (root / "data.json").is_file():
            return [root / "data.json"]
        files = sorted(root.glob("*.jsonl"))
        if files:
            return files
    raise InputError(f"--data {root}: no LongBench v2 data there. Provide {V2_LAYOUT}, or pass --download where "
                     "the hub is reachable")


def read_longbench_v2(data: str | Path, *, limit: int | None = None) -> list[Example]:
    """LongBench v2's multiple-choice items (``answer`` is the letter A-D)."""
    out: list[Example] = []
    for path in v2_files(data):
        for where, item in _v2_items(path):
            missing = [k for k in _V2_FIELDS if k not in item]
            if missing:
                raise InputError(f"{where}: missing LongBench v2 field(s) {', '.join(missing)}")
            if item["answer"] not in ("A", "B", "C", "D"):
                raise InputError(f"{where}: 'answer' must be one of A, B, C, D, got {item['answer']!r}")
            out.append(Example(
                id=str(item["_id"]), dataset="longbench_v2", context=str(item["context"]),
                input=str(item["question"]), answers=[item["answer"]],
                meta={"difficulty": item["difficulty"], "length_class": item["length"],
                      "domain": item.get("domain"), "sub_domain": item.get("sub_domain"),
                      **{k: item[k] for k in ("question", "choice_A", "choice_B", "choice_C", "choice_D")}}))
            if limit is not None and len(out) >= limit:
                _check_unique(out, path)
                return out
    if not out:
        raise InputError(f"{data}: no LongBench v2 items found")
    _check_unique(out, Path(data))
    return out


def custom_file(path: str | Path) -> Path:
    """The custom JSONL file ``--data`` names (a folder holding exactly one ``.jsonl`` file names it)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.jsonl"))
        if len(files) != 1:
            raise InputError(f"--data {p}: give the JSONL file itself (the folder holds {len(files)} .jsonl files)")
        p = files[0]
    if not p.is_file():
        raise InputError(f"--data {p}: no such file. The custom format is JSONL with one "
                         '{"context": ..., "question": ..., "answers": [...]} object per line')
    return p


def read_custom(path: str | Path, *, limit: int | None = None, name: str | None = None) -> list[Example]:
    """Your own documents: JSONL of ``{"context", "question", "answers"}`` (``_id`` optional)."""
    p = custom_file(path)
    dataset = name or p.stem
    out: list[Example] = []
    for number, item in _lines(p):
        where = f"{p}:{number}"
        for key in ("context", "question", "answers"):
            if key not in item:
                raise InputError(f"{where}: missing field {key!r}; each line needs context, question and answers")
        context, question = item["context"], item["question"]
        if not isinstance(context, str) or not context.strip():
            raise InputError(f"{where}: 'context' must be a non-empty string")
        if not isinstance(question, str) or not question.strip():
            raise InputError(f"{where}: 'question' must be a non-empty string")
        out.append(Example(id=str(item.get("_id", f"{dataset}-{number}")), dataset=dataset, context=context,
                           input=question, answers=_answers(item["answers"], where)))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise InputError(f"{p} holds no examples")
    _check_unique(out, p)
    return out


# ---------------------------------------------------------------------- download
def _load_dataset():
    try:
        from datasets import load_dataset
    except ImportError:
        return None
    return load_dataset


def _hub_error(what: str, layout: str, reason: str) -> InputError:
    return InputError(f"could not download {what}: {reason}. Without the hub, put the files in --data as {layout}")


def _write_jsonl(path: Path, rows: Any) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".part")
    n = 0
    with tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(dict(row), ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(path)
    return n


def download_longbench(data_dir: str | Path, datasets: list[str], *, e: bool = False) -> list[Path]:
    """Fetch LongBench datasets from the hub into ``data_dir`` (skips files already there)."""
    load_dataset = _load_dataset()
    if load_dataset is None:
        raise _hub_error("LongBench", LONGBENCH_LAYOUT,
                         "the `datasets` library is not installed (pip install 'oprm-rag[eval-hub]')")
    written = []
    for name in datasets:
        path = Path(data_dir) / (f"{name}_e.jsonl" if e else f"{name}.jsonl")
        if path.is_file():
            continue
        try:
            rows = load_dataset("THUDM/LongBench", f"{name}_e" if e else name, split="test")
            _write_jsonl(path, rows)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # the hub's client raises many types (connection, HTTP, offline mode)
            raise _hub_error("LongBench", LONGBENCH_LAYOUT,
                             f"the hub is not reachable from here ({type(exc).__name__}: {exc})") from None
        written.append(path)
    return written


def download_longbench_v2(data_dir: str | Path) -> Path:
    """Fetch LongBench v2 from the hub into ``data_dir/data.json`` (kept if already there)."""
    path = Path(data_dir) / "data.json"
    if path.is_file():
        return path
    load_dataset = _load_dataset()
    if load_dataset is None:
        raise _hub_error("LongBench v2", V2_LAYOUT,
                         "the `datasets` library is not installed (pip install 'oprm-rag[eval-hub]')")
    try:
        rows = [dict(r) for r in load_dataset("THUDM/LongBench-v2", split="train")]
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        raise _hub_error("LongBench v2", V2_LAYOUT,
                         f"the hub is not reachable from here ({type(exc).__name__}: {exc})") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.part")
    tmp.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    tmp.replace(path)
    return path
