"""Offline prose sources for the demo model: which ones it trains on, which it never sees.

The demo model must not learn one corpus's style, and the project must be judged on
prose the model never saw. So the prose comes from several unrelated sources available
on a Debian machine without network, split three ways:

============================  =====================================================
training                      ``stdlib`` Python standard-library docstrings,
                              ``torch_docs`` PyTorch docstrings,
                              ``debian_docs`` /usr/share/doc READMEs and notes,
                              ``generated`` sentences from a small seeded grammar
benchmark held-out            ``python_reference`` the Python Language Reference
(``oprm_rag/demo/data/``)     (pydoc_data), ``licenses`` /usr/share/common-licenses,
                              ``gnu_info`` the GNU info manuals (/usr/share/info)
never trained, never          ``man_pages`` manual pages (/usr/share/man, sections
benchmarked (for others)      1-8, Perl's excluded), ``perl_docs`` Perl's POD files
============================  =====================================================

Every extractor returns sentences that pass the task's prose filter, deduplicated and in
a deterministic order (sorted files). :func:`disjoint` removes from a set every sentence
that another set already holds, so a sentence quoted in two places (a licence paragraph
inside a README, a GNU manual's GFDL appendix) never crosses the split.
"""

from __future__ import annotations

import gzip
import random
import re
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from oprm_rag.demo.recall_task import (  # noqa: E402
    HELDOUT_SOURCES,
    UNSEEN_SOURCES,
    _is_prose,
    docstrings,
    split_sentences,
    stdlib_prose,
)

__all__ = ["TRAINING_SOURCES", "HELDOUT_SOURCES", "UNSEEN_SOURCES", "EXTRACTORS", "extract", "disjoint", "norm",
           "clean_sentences", "generated_prose"]

TRAINING_SOURCES = ("stdlib", "torch_docs", "debian_docs", "generated")

_QUOTES = re.compile(r"[\"`*_|<>\[\]{}]")


def clean_sentences(paragraphs: Iterable[str]) -> Iterator[str]:
    """Sentences of ``paragraphs`` that pass the task's prose filter (markup quotes removed)."""
    for paragraph in paragraphs:
        for s in split_sentences(paragraph):
            s = _QUOTES.sub("", s).strip()
            s = re.sub(r"\s+", " ", s)
            if s and _is_prose(s):
                yield s


def _unique(sentences: Iterable[str], limit: int | None = None) -> list[str]:
    seen: set[str] = set()
    out: list[str] = []
    for s in sentences:
        if s not in seen:
            seen.add(s)
            out.append(s)
            if limit is not None and len(out) >= limit:
                break
    return out


def _paragraphs(text: str, skip_indented: bool = True) -> Iterator[str]:
    for block in re.split(r"\n\s*\n", text):
        lines = [l for l in block.splitlines() if l.strip()]
        if not lines:
            continue
        if skip_indented and any(l.startswith(("    ", "\t", ">>>", "$ ", "# ")) for l in lines):
            continue  # code, examples, tables
        yield " ".join(l.strip() for l in lines)


def _read(path: Path) -> str:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8", errors="replace") as fh:
                return fh.read()
        return path.read_text(encoding="utf-8", errors="replace")
    except (OSError, EOFError, gzip.BadGzipFile):
        return ""


# --------------------------------------------------------------------------- training sources
def _docstring_sentences(root: Path, skip_dirs: set[str]) -> Iterator[str]:
    for doc in docstrings(root, skip_dirs):
        yield from clean_sentences(_paragraphs(doc))


def stdlib() -> list[str]:
    return list(stdlib_prose())


def torch_docs() -> list[str]:
    import importlib.util

    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return []
    root = Path(list(spec.submodule_search_locations)[0])
    return _unique(_docstring_sentences(root, {"test", "testing", "_vendor", "__pycache__", "include"}))


def debian_docs(root: Path = Path("/usr/share/doc")) -> list[str]:
    """READMEs and notes under /usr/share/doc; never copyright files or changelogs."""
    out: list[str] = []
    if not root.is_dir():
        return out
    for path in sorted(root.rglob("*")):
        name = path.name.lower()
        if not path.is_file() or path.is_symlink():
            continue
        if "copyright" in name or "changelog" in name or "licen" in name or "copying" in name:
            continue
        stem = name[:-3] if name.endswith(".gz") else name
        if not (stem.startswith(("readme", "news", "faq", "todo", "notes")) or stem.endswith((".txt", ".md", ".rst"))):
            continue
        out += clean_sentences(_paragraphs(_read(path)))
    return _unique(out)


# The grammar of the generated source: plain English about made-up things, with nonce words
# that look like the task's keys and, now and then, numbers, so that neither a strange word
# nor a number in the prose is mistaken for a fact.
_DET = ["The", "A", "Each", "Every", "This", "That", "No", "Some", "Another"]
_ADJ = ["quiet", "narrow", "old", "bright", "small", "heavy", "early", "distant", "simple", "careful",
        "broken", "hidden", "common", "green", "wooden", "sudden", "gentle", "empty", "local", "northern",
        "patient", "rapid", "silver", "modest", "famous", "crowded", "frozen", "brief", "curious", "loyal"]
_NOUN = ["river", "village", "engine", "teacher", "garden", "letter", "market", "bridge", "window", "captain",
         "harbour", "library", "farmer", "storm", "valley", "council", "painter", "kitchen", "station", "island",
         "mountain", "soldier", "journey", "forest", "record", "machine", "museum", "orchard", "signal", "tower",
         "report", "student", "wagon", "meadow", "lantern", "sailor", "castle", "doctor", "festival", "ledger"]
_VERB = ["crosses", "follows", "carries", "repairs", "watches", "opens", "describes", "protects", "visits",
         "remembers", "collects", "measures", "ignores", "supports", "paints", "replaces", "guards", "reaches",
         "shelters", "announces", "borrows", "finds", "leaves", "moves", "holds", "keeps", "sends", "builds"]
_ADV = ["slowly", "often", "rarely", "quietly", "always", "never", "sometimes", "carefully", "early", "again"]
_PREP = ["near", "behind", "under", "beyond", "across", "beside", "above", "after", "before", "without"]
_CONJ = ["because", "although", "while", "when", "since", "until", "unless", "whenever"]
_TEMPLATES = [
    "{D} {a} {n} {v} the {n2} {p} the {a2} {n3}.",
    "{D} {n} {adv} {v} the {a} {n2}.",
    "{D} {a} {n} {v} the {n2} {c} the {n3} {v2} a {a2} {n4}.",
    "In the {a} {n}, the {n2} {v} {x}.",
    "{X} {v} the {a} {n} {p} the {n2}.",
    "They say that {x} {adv} {v} the {n}, {c} the {n2} {v2} nothing.",
    "{D} {n} of {x} {v} the {a} {n2}.",
    "Nobody {v} the {n} {p} {x} {c} the {a} {n2} {v2} it.",
    "The {n} {v} {k} {ns} {p} the {a} {n2}.",
    "In {y}, the {a} {n} {v} the {n2} of {x}.",
    "Why the {n} {v} the {a} {n2} is not clear.",
    "{D} {n} {v} the {n2}, and the {a} {n3} {v2} the {n4} {adv}.",
]


def _nonce(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(4, 8)))


def generated_prose(n: int = 20000, seed: int = 20240) -> list[str]:
    """``n`` distinct sentences from a small grammar (seeded, so the same on every machine)."""
    rng = random.Random(seed)
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        t = rng.choice(_TEMPLATES)
        x = _nonce(rng)
        s = t.format(D=rng.choice(_DET), a=rng.choice(_ADJ), a2=rng.choice(_ADJ), n=rng.choice(_NOUN),
                     n2=rng.choice(_NOUN), n3=rng.choice(_NOUN), n4=rng.choice(_NOUN), v=rng.choice(_VERB),
                     v2=rng.choice(_VERB), adv=rng.choice(_ADV), p=rng.choice(_PREP), c=rng.choice(_CONJ),
                     x=x, X=x.capitalize(), k=rng.randint(2, 99), ns=rng.choice(_NOUN) + "s",
                     y=rng.randint(1200, 2099))
        s = s[0].upper() + s[1:]
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def generated() -> list[str]:
    return generated_prose()


# --------------------------------------------------------------------------- held-out sources
def python_reference() -> list[str]:
    from pydoc_data.topics import topics

    paragraphs = []
    for name in sorted(topics):
        paragraphs += _paragraphs(topics[name])
    return _unique(clean_sentences(paragraphs))


def licenses(root: Path = Path("/usr/share/common-licenses")) -> list[str]:
    out: list[str] = []
    if root.is_dir():
        for path in sorted(root.iterdir()):
            if path.is_file() and not path.is_symlink():
                out += clean_sentences(_paragraphs(_read(path), skip_indented=False))
    return _unique(out)


def gnu_info(root: Path = Path("/usr/share/info")) -> list[str]:
    out: list[str] = []
    if root.is_dir():
        for path in sorted(root.glob("*.info*")):
            text = _read(path).replace("\x1f", "\n\n")
            paragraphs = [p for p in _paragraphs(text)
                          if not p.startswith(("File:", "Tag Table", "*")) and "INFO-DIR" not in p
                          and not re.search(r"\w: \(\w", p)]  # headers, menus, index entries
            out += clean_sentences(paragraphs)
    return _unique(out)


# --------------------------------------------------------------------------- unseen sources
_TROFF_ESCAPES = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),   # font changes
    (re.compile(r"\\\*(\[[^\]]*\]|\(..|.)"), ""),  # strings
    (re.compile(r"\\\((..)"), " "),                 # special characters
    (re.compile(r"\\s[-+]?\d"), ""),
    (re.compile(r"\\[&|^%]"), ""),
    (re.compile(r"\\-"), "-"),
    (re.compile(r"\\e"), "\\\\"),
    (re.compile(r"\\ "), " "),
]


def _troff_text(source: str) -> str:
    lines: list[str] = []
    for line in source.splitlines():
        if line.startswith((".", "'")):
            macro = line[1:].split(" ", 1)
            if macro[0] in ("PP", "LP", "P", "TP", "IP", "SH", "SS", "sp", "br", "HP", "RS", "RE", "nf", "fi"):
                lines.append("")
            if macro[0] in ("B", "I", "BR", "IR", "RB", "RI", "BI", "IB", "SM") and len(macro) > 1:
                lines.append(macro[1].replace('"', ""))
            continue
        for pattern, repl in _TROFF_ESCAPES:
            line = pattern.sub(repl, line)
        lines.append(line)
    return "\n".join(lines)


def man_pages(root: Path = Path("/usr/share/man")) -> list[str]:
    """English manual pages, sections 1-8; Perl's (also in ``perl_docs``) excluded."""
    out: list[str] = []
    for section in range(1, 9):
        d = root / f"man{section}"
        if not d.is_dir():
            continue
        for path in sorted(d.iterdir()):
            name = path.name
            if path.is_symlink() or not path.is_file() or name.startswith("perl") or ".3pm" in name \
                    or ".3perl" in name or "::" in name:
                continue
            source = _read(path)
            if source.startswith(".so "):
                continue  # an alias of another page
            out += clean_sentences(_paragraphs(_troff_text(source), skip_indented=False))
    return _unique(out)


_POD_CODES = re.compile(r"[BICFSLEXZ]<(?:<+\s)?([^<>]*?)(?:\s>+)?>")


def _pod_text(source: str) -> str:
    keep: list[str] = []
    in_pod = False
    for block in re.split(r"\n\s*\n", source):
        if block.startswith("=cut"):
            in_pod = False
            continue
        if block.startswith("="):
            in_pod = True
            continue
        if not in_pod or block.startswith((" ", "\t")):
            continue
        for _ in range(3):
            block = _POD_CODES.sub(lambda m: m.group(1).split("|")[0], block)
        keep.append(block)
    return "\n\n".join(keep)


def perl_docs(roots: tuple[Path, ...] = (Path("/usr/share/perl"), Path("/usr/share/perl5"))) -> list[str]:
    out: list[str] = []
    for root in roots:
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*.pod")):
            if path.is_file():
                source = _read(path)
                out += clean_sentences(_paragraphs(_pod_text(source)))
    return _unique(out)


EXTRACTORS: dict[str, Callable[[], list[str]]] = {
    "stdlib": stdlib, "torch_docs": torch_docs, "debian_docs": debian_docs, "generated": generated,
    "python_reference": python_reference, "licenses": licenses, "gnu_info": gnu_info,
    "man_pages": man_pages, "perl_docs": perl_docs,
}


def extract(name: str) -> list[str]:
    if name not in EXTRACTORS:
        raise KeyError(f"unknown prose source {name!r}; known: {sorted(EXTRACTORS)}")
    return EXTRACTORS[name]()


def norm(sentence: str) -> str:
    """The form sentences are compared in: lower case, punctuation and spacing ignored."""
    return re.sub(r"\W+", " ", sentence.lower()).strip()


def disjoint(keep: dict[str, list[str]], exclude: Iterable[str]) -> dict[str, list[str]]:
    """``keep`` without any sentence in ``exclude`` (compared by :func:`norm`)."""
    banned = {norm(s) for s in exclude}
    return {name: [s for s in sents if norm(s) not in banned] for name, sents in keep.items()}
