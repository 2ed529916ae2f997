"""OPRM for LlamaIndex: a node postprocessor and a retriever-free query engine.

``OPRMNodePostprocessor`` reranks nodes by the entropy of a recurrent model's first answer
token; ``OPRMQueryEngine`` reads every node, selects with OPRM and answers from the winning
chunk's state. ``RecurrentLLM`` (the matching LLM) is in ``llama_index.llms.oprm``.
"""

from llama_index.postprocessor.oprm.base import OPRMNodePostprocessor
from llama_index.postprocessor.oprm.nodes import OPRM_METADATA_KEYS
from llama_index.postprocessor.oprm.prompts import oprm_qa_prompt
from llama_index.postprocessor.oprm.query_engine import OPRMQueryEngine

__all__ = ["OPRMNodePostprocessor", "OPRMQueryEngine", "OPRM_METADATA_KEYS", "oprm_qa_prompt"]
