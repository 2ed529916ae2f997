"""Ask a long document (or a folder of documents) a question with OPRM through LlamaIndex.

    python examples/llamaindex_query_engine.py
    python examples/llamaindex_query_engine.py --docs my_folder --question "What is the code of alpha?"

Without ``--docs`` it builds a long document in the demo model's task format (prose with
``The code of KEY is VALUE.`` facts) and asks for one code, so the expected answer is
known. It answers twice:

1. ``OPRMQueryEngine``: retriever-free; every chunk is scored by the entropy of the first
   answer token and the answer is decoded from the winning chunk's state (streamed).
2. The standard LlamaIndex wiring: ``SummaryIndex(...).as_query_engine(llm=RecurrentLLM,
   node_postprocessors=[OPRMNodePostprocessor])`` with the model's own OPRM prompt.

It runs offline on the CPU with the shipped demo model (``--model`` picks another).
Needs ``pip install -e integrations/llama-index-oprm``.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing oprm-rag

from oprm_rag import DEMO_MODEL  # noqa: E402
from oprm_rag import resolve

if TYPE_CHECKING:  # pragma: no cover
    from llama_index.core.schema import Document, NodeWithScore

MISSING = (
    "The shipped demo model is missing: {path} has no model.safetensors.\n"
    "Train it with `make train-demo-model-v2` (a fine-tune of training/checkpoints/demo-v1, see the Makefile),\n"
    "or point --model at a local recurrent model folder (config, weights, tokenizer)."
)


def generated_document(seed: int, n_facts: int, chars: int) -> Tuple[str, str, str, str]:
    """A long recall-task document, a question about one of its facts, the answer and the fact."""
    from oprm_rag.demo.recall_task import build_document, fact_sentence, heldout_prose, question_for

    rng = random.Random(seed)
    doc = build_document(rng, heldout_prose(), n_facts=n_facts, target_chars=chars)
    fact = doc.facts[rng.randrange(len(doc.facts))]
    return doc.text, question_for(fact.key), fact.value, fact_sentence(fact)


def load_documents(path: Path) -> List["Document"]:
    from llama_index.core import Document, SimpleDirectoryReader

    if path.is_dir():
        return SimpleDirectoryReader(str(path), required_exts=[".txt", ".md"], recursive=True).load_data()
    return [Document(text=path.read_text(encoding="utf-8"), metadata={"file_name": path.name})]


def describe(source: "NodeWithScore") -> str:
    node = source.node
    meta = node.metadata
    where = meta.get("file_name") or meta.get("oprm_source_node_id", node.node_id)[:8]
    start, end = getattr(node, "start_char_idx", None), getattr(node, "end_char_idx", None)
    if start is None or end is None:  # no document offsets: the span within the node
        start, end = meta["oprm_char_start"], meta["oprm_char_end"]
    return (f"{where} chars {start}-{end} "
            f"(entropy {meta['oprm_entropy']:.3f}, score {source.score:.3f})")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEMO_MODEL, help="model folder or hub name (default: the shipped demo model)")
    p.add_argument("--docs", type=Path, help="a text file or a folder of .txt/.md files (default: generated)")
    p.add_argument("--question", help="the question (needed with --docs)")
    p.add_argument("--chunk-tokens", type=int, default=None, help="chunk length (default: half the training length)")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args(argv)

    if args.model == DEMO_MODEL and not Path(DEMO_MODEL, "model.safetensors").is_file():
        print(MISSING.format(path=DEMO_MODEL), file=sys.stderr)
        return 2
    if args.docs is not None and not args.question:
        p.error("--docs needs --question")

    from llama_index.core import Document, SummaryIndex

    from llama_index.llms.oprm import RecurrentLLM
    from llama_index.postprocessor.oprm import OPRMNodePostprocessor, OPRMQueryEngine
    from oprm_rag.engine.resolve import load_model

    expected = fact = None
    if args.docs is None:
        text, question, expected, fact = generated_document(args.seed, n_facts=8, chars=6000)
        documents = [Document(text=text, metadata={"file_name": "generated.txt"})]
    else:
        documents, question = load_documents(args.docs), args.question
    if not documents:
        print(f"no documents found in {args.docs}", file=sys.stderr)
        return 1

    t0 = time.perf_counter()
    lm = load_model(args.model)  # loaded once; every component below shares it
    print(f"model: {lm.name} ({lm.family}), loaded in {time.perf_counter() - t0:.1f}s")
    print(f"documents: {len(documents)}, {sum(len(d.text) for d in documents)} chars")
    print(f"question: {question}" + (f"  (expected: {expected})" if expected else ""))

    options = {"chunk_tokens": args.chunk_tokens, "max_new_tokens": args.max_new_tokens}
    engine = OPRMQueryEngine.from_documents(documents, model=lm, **options)
    t0 = time.perf_counter()
    response = engine.query(question)
    usage = response.metadata["oprm_usage"]
    print(f"\n[1] OPRMQueryEngine answer: {response.response.strip()!r}  ({time.perf_counter() - t0:.1f}s, "
          f"{usage['chunks']} chunks scored)")
    for source in response.source_nodes:
        print(f"    source: {describe(source)}")
        if fact:
            print(f"    source holds the fact: {'yes' if fact in source.node.get_content() else 'no'}")
    print("    streamed: ", end="", flush=True)
    streaming = OPRMQueryEngine.from_documents(documents, model=lm, streaming=True, **options)
    for piece in streaming.query(question).response_gen:
        print(piece, end="", flush=True)
    print()

    oprm = OPRMNodePostprocessor(model=lm, top_n=1, chunk_tokens=args.chunk_tokens)
    wired = SummaryIndex.from_documents(documents).as_query_engine(
        llm=RecurrentLLM(model=lm, max_new_tokens=args.max_new_tokens),
        node_postprocessors=[oprm],
        text_qa_template=oprm.qa_prompt(),  # the prompt the model was scored (and trained) with
    )
    hits = resolve(lm).handoff.hits
    t0 = time.perf_counter()
    response = wired.query(question)
    print(f"\n[2] standard wiring answer: {response.response.strip()!r}  ({time.perf_counter() - t0:.1f}s, "
          f"state handoff hits: {resolve(lm).handoff.hits - hits})")
    for source in response.source_nodes:
        print(f"    source: {describe(source)}")
    if resolve(lm).handoff.hits == hits:
        print("    (no handoff: LlamaIndex's prompt differs from the scored text - it adds node metadata and\n"
              "     strips the chunk's edge whitespace - so the winning chunk was read a second time)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
