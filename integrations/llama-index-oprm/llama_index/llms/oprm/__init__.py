"""LlamaIndex LLM over a recurrent model loaded by oprm-rag (``RecurrentLLM``)."""

from llama_index.llms.oprm.base import RecurrentLLM

__all__ = ["RecurrentLLM"]
