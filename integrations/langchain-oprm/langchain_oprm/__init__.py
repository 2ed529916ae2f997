"""LangChain integration of oprm-rag: OPRM context selection for recurrent LLMs.

``OPRMSelector`` picks, with the recurrent model itself, the chunks of long documents
it can answer a question from; ``OPRMCompressor`` does the same behind a retriever;
``ChatRecurrent`` and ``RecurrentLLM`` decode from the same shared model, resuming
from the selector's stored state when their prompt begins with the scored text
(``create_oprm_qa_chain`` wires that up); ``oprm_tool`` hands the selector to agents.
Importing this package loads no model and does not import torch.
"""

from __future__ import annotations

from .chains import create_oprm_qa_chain, oprm_prompt_messages
from .chat_models import ChatRecurrent
from .compressor import OPRMCompressor
from .llms import RecurrentLLM
from .selector import OPRMSelector, OPRMSelectorInput
from .tools import oprm_tool

__version__ = "0.1.0"

__all__ = [
    "ChatRecurrent",
    "OPRMCompressor",
    "OPRMSelector",
    "OPRMSelectorInput",
    "RecurrentLLM",
    "__version__",
    "create_oprm_qa_chain",
    "oprm_prompt_messages",
    "oprm_tool",
]
