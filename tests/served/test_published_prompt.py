"""The shipped model's prompt reaches a client that has only a URL, through llama.cpp too.

The exporter puts the folder's chat template into the GGUF; llama-server renders it with
``chat_template_kwargs`` on ``/apply-template``, so the template's published OPRM prompt
(``oprm_rag.served.published``) comes back the same way as from vLLM (tests/served/test_vllm.py).
"""

from __future__ import annotations

import random

import oprm_rag
from oprm_rag import OPRMSelector
from oprm_rag.demo.recall_task import build_document, heldout_prose, question_for
from oprm_rag.served import OpenAICompatibleLM
from oprm_rag.served.published import folder_format


def test_llama_server_serves_the_folders_prompt_and_training_length(demo_lm, demo_server) -> None:
    lm = OpenAICompatibleLM(demo_server.base_url, "oprm-demo", max_concurrency=4)
    try:
        assert lm.published_format == folder_format(oprm_rag.DEMO_MODEL)
        assert lm.prompt == demo_lm.prompt and lm.token_counting == "server"
        rng = random.Random(21)
        doc = build_document(rng, heldout_prose(), 6, 1600)
        question = question_for(doc.facts[0].key)
        a = OPRMSelector(demo_lm, chunk_tokens=128, cache=False).answer(question, doc.text, max_new_tokens=6)
        b = OPRMSelector(lm, chunk_tokens=128).answer(question, doc.text, max_new_tokens=6)
        assert (b.chunk.token_start, b.text) == (a.chunk.token_start, a.text)
    finally:
        lm.close()
