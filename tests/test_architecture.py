"""The shape issue #20 set: one model type below the edges, a small engine protocol, no
import cycles, decoding defaults written once. Measured from the source, so a change
that brings back a second resolver, a probe or a cycle fails here with where it is.

``python -m tests.test_architecture`` prints the numbers the closing note quotes.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "oprm_rag"
INTEGRATIONS = [ROOT / "integrations" / "langchain-oprm" / "langchain_oprm",
                ROOT / "integrations" / "llama-index-oprm" / "llama_index"]
MODEL_NAMES = {"model", "engine", "lm"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    if level == 0:
        return name or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([name] if name else []))


def import_graph() -> dict[str, set[str]]:
    """Every import edge between the package's modules: module level, inside functions and
    under ``TYPE_CHECKING`` alike. (A module's implicit import of its own package's
    ``__init__`` is not counted: a package that re-exports its submodules is no cycle.)"""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(mod, is_pkg, node.level, node.module)
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                # the deepest module of the package that the import names
                while t and t not in mods:
                    t = t.rsplit(".", 1)[0] if "." in t else ""
                if t and t != mod:
                    graph[mod].add(t)
    return graph


def import_cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph = import_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _sources() -> list[Path]:
    files = list(PACKAGE.rglob("*.py"))
    for folder in INTEGRATIONS:
        files += list(folder.rglob("*.py"))
    return files


#: Where a ``model`` parameter is the transformers model object itself (an ``nn.Module`` of
#: any class the backends recognise): ``Any`` is its honest type.
TRANSFORMERS_MODEL = ("oprm_rag/backends/", "oprm_rag/loading.py", "oprm_rag/mitigation.py", "oprm_rag/lm.py")


def any_model_parameters() -> list[str]:
    """Parameters named model / engine / lm annotated ``Any`` (where the model type was lost),
    leaving out the transformers model object itself."""
    hits = []
    for path in _sources():
        if str(path.relative_to(ROOT)).startswith(TRANSFORMERS_MODEL):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
                for a in args:
                    if a.arg in MODEL_NAMES and a.annotation is not None and ast.unparse(a.annotation) in (
                            "Any", "'Any'"):
                        hits.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}({a.arg})")
    return hits


def lm_probes() -> list[str]:
    """``getattr(x, "lm", ...)``: reaching through an engine for the model behind it."""
    pattern = re.compile(r"getattr\([^,]+,\s*[\"']lm[\"']")
    return [f"{p.relative_to(ROOT)}:{i}" for p in _sources()
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]


def engine_abstract_methods() -> list[str]:
    from oprm_rag.engine import Engine

    return sorted(Engine.__abstractmethods__)


def max_new_tokens_defaults() -> list[str]:
    """Places that write ``GenerationConfig``'s answer length as a literal default (a
    parameter, a field or a flag): they belong to the one field. (Lengths of other jobs,
    a needle's 8 tokens or the LangChain wrappers' documented 256, are their own.)"""
    from oprm_rag.decoding.config import GenerationConfig

    n = GenerationConfig.max_new_tokens
    pattern = re.compile(rf"(max_new_tokens|max_tokens)\s*(:\s*[\w\[\]| ]+)?\s*=\s*(Field\(\s*default=)?{n}\b"
                         rf"|--max-new-tokens.*default={n}\b")
    return [f"{p.relative_to(ROOT)}:{i}" for p in _sources()
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]


def test_no_import_cycles_of_any_kind() -> None:
    assert import_cycles() == []


def test_the_engine_protocol_is_small() -> None:
    assert len(engine_abstract_methods()) <= 6, engine_abstract_methods()


def test_no_probing_for_the_model_behind_an_engine() -> None:
    assert lm_probes() == []


def test_the_model_type_is_kept_below_the_edges() -> None:
    assert len(any_model_parameters()) <= 5, any_model_parameters()


def test_the_answer_length_default_is_written_once() -> None:
    places = max_new_tokens_defaults()
    assert len(places) == 1 and "oprm_rag/decoding/config.py" in places[0], places


def test_the_import_graph_sees_function_level_and_type_checking_imports() -> None:
    graph = import_graph()
    # lm imports the mitigation only under TYPE_CHECKING, and the engine's resolver imports
    # the served engine inside a function: both must be edges
    assert "oprm_rag.mitigation" in graph["oprm_rag.lm"]
    assert "oprm_rag.served" in graph["oprm_rag.engine.resolve"]


if __name__ == "__main__":  # pragma: no cover
    print("import cycles:", import_cycles())
    print("engine abstract methods:", len(engine_abstract_methods()), engine_abstract_methods())
    print("getattr(..., 'lm') probes:", lm_probes())
    print("model/engine/lm parameters typed Any:", len(any_model_parameters()), any_model_parameters())
    print("answer-length defaults written:", max_new_tokens_defaults())
