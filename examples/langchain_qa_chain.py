"""Question answering over a long document with an LCEL chain and a recurrent model.

    python examples/langchain_qa_chain.py                 # the shipped demo model
    python examples/langchain_qa_chain.py --model PATH    # any Mamba / Mamba-2 / RWKV folder

The document (codes hidden in prose the demo model never trained on) is several times
longer than the model's training context: read in one pass, its state would overflow.
The chain is three LCEL steps:

    OPRMSelector  ->  prompt ([instruction, best chunk, question])  ->  ChatRecurrent

The selector has the model score every chunk by the entropy of its first answer token
and keeps the most certain one; the prompt step writes exactly the text the selector
scored, so the chat model resumes from the stored state of that chunk instead of
reading it again ("handoff hit"). ``langchain_oprm.create_oprm_qa_chain`` packages the
same chain.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from langchain_core.runnables import Runnable, RunnableLambda, RunnablePassthrough

from langchain_oprm import ChatRecurrent, OPRMSelector, oprm_prompt_messages


def build_chain(model: Any, chunk_tokens: int | str = "auto", max_tokens: int = 8) -> Runnable:
    """``{"question", "documents"}`` in; the input plus ``context`` (selected chunks) and
    ``answer`` (an ``AIMessage``) out."""
    # fallback: when every chunk answers "Error", still answer from the most certain one.
    selector = OPRMSelector(model=model, chunk_tokens=chunk_tokens, boundary="sentence", fallback="min_entropy")
    prompt = RunnableLambda(lambda x: oprm_prompt_messages(selector, x["question"], x["context"]), name="OPRMPrompt")
    chat = ChatRecurrent(model=model, max_tokens=max_tokens)
    return RunnablePassthrough.assign(context=selector) | RunnablePassthrough.assign(answer=prompt | chat)


def run(model: Any, facts: int = 48, seed: int = 7, chunk_tokens: int | str = "auto",
        max_tokens: int = 8) -> dict[str, Any]:
    """Build a long document, ask for one of its codes, and return what the chain did."""
    from oprm_rag.demo import demo_document
    from oprm_rag.demo.recall_task import question_for

    doc, target = demo_document(facts, seed)
    question = question_for(target.key)
    out = build_chain(model, chunk_tokens, max_tokens).invoke({"question": question, "documents": doc.text})
    best = out["context"][0]
    fact = doc.text.find(f"The code of {target.key} is")
    return {
        "document_chars": len(doc.text),
        "question": question,
        "expected": target.value,
        "answer": out["answer"].content.strip(),
        "handoff_hit": out["answer"].response_metadata["oprm_handoff_hit"],
        "usage": out["answer"].usage_metadata,
        "chunk": best,
        "fact_in_chunk": best.metadata["oprm_char_start"] <= fact < best.metadata["oprm_char_end"],
    }


def main(argv: Sequence[str] | None = None) -> int:
    import oprm_rag

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=oprm_rag.DEMO_MODEL, help="model folder (default: the shipped demo model)")
    parser.add_argument("--facts", type=int, default=48, help="codes hidden in the document (sets its length)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--chunk-tokens", default="auto", help="chunk length in tokens, or 'auto'")
    parser.add_argument("--max-tokens", type=int, default=8)
    args = parser.parse_args(argv)
    if not (Path(args.model) / "config.json").is_file():
        which = "The shipped demo model is" if args.model == oprm_rag.DEMO_MODEL else "No model is"
        print(f"{which} missing from {args.model}.\n"
              "Train it with `make train-demo-model-v2` (CPU, offline), or pass --model PATH to a local "
              "Mamba / Mamba-2 / RWKV / RecurrentGemma folder.", file=sys.stderr)
        return 1
    chunk_tokens = args.chunk_tokens if args.chunk_tokens == "auto" else int(args.chunk_tokens)
    result = run(args.model, args.facts, args.seed, chunk_tokens, args.max_tokens)
    chunk = result["chunk"]
    print(f"Document: {result['document_chars']:,} chars")
    print(f"Question: {result['question']}   (expected: {result['expected']})")
    print(f"Answer:   {result['answer']!r}")
    print(f"Chunk:    chars {chunk.metadata['oprm_char_start']}-{chunk.metadata['oprm_char_end']}, "
          f"relevance {chunk.metadata['relevance_score']:.3f}, holds the fact: {result['fact_in_chunk']}")
    print(f"Handoff hit: {result['handoff_hit']} (prompt tokens resumed from the selector's state: "
          f"{result['usage'].get('input_token_details', {}).get('cache_read', 0)} of "
          f"{result['usage']['input_tokens']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
