"""An agent that reads long documents through ``oprm_tool``.

    python examples/langchain_agent.py                        # offline, scripted agent model
    python examples/langchain_agent.py --chat-model ollama:qwen3   # a real tool-calling model

The tool takes a question and a document id; the recurrent model (the shipped demo
model by default) scores every chunk of that document and returns the chunk it can
answer from, so the agent's own model never has to read the long document.

The agent is ``langchain.agents.create_agent`` when the ``langchain`` package is
installed, else a minimal tool-calling loop on LangChain core. Offline there is no
real tool-calling chat model, so by default the agent is driven by
``ScriptedToolCaller``: a stand-in that makes the tool calls it is given, in order, then
answers by quoting what the tool returned. It exercises the tool for real (including
the error an unknown document id gets); it does not reason.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.tools import BaseTool

from langchain_oprm import oprm_tool

SYSTEM_PROMPT = ("You answer questions about long documents. Use the oprm_search tool to find the passage "
                 "that answers the question, then answer from it.")


class ScriptedToolCaller(BaseChatModel):
    """A stand-in tool-calling chat model: makes ``calls`` in order, one per turn, then
    answers with the tool results it saw. For offline runs and tests only."""

    calls: list[dict[str, Any]]

    @property
    def _llm_type(self) -> str:
        return "scripted-tool-caller"

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> "ScriptedToolCaller":
        return self  # the script already names the tools it calls

    def _generate(self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
                  run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> ChatResult:
        results = [m for m in messages if isinstance(m, ToolMessage)]
        if len(results) < len(self.calls):
            call = self.calls[len(results)]
            message = AIMessage(content="", tool_calls=[
                {"name": call["name"], "args": call["args"], "id": f"call_{len(results)}", "type": "tool_call"}])
        else:
            found = [str(r.content) for r in results if r.status != "error"]
            text = ("From the documents:\n" + "\n---\n".join(found)) if found else "I could not find it."
            message = AIMessage(content=text)
        return ChatResult(generations=[ChatGeneration(message=message)])


def build_documents(seed: int = 3, facts: int = 24) -> tuple[dict[str, str], str, str]:
    """Two long documents with hidden codes; a question about one code and its answer."""
    from oprm_rag.demo import demo_document
    from oprm_rag.demo.recall_task import question_for

    handbook, _ = demo_document(facts, seed)
    logbook, target = demo_document(facts, seed + 1)
    return {"handbook": handbook.text, "logbook": logbook.text}, question_for(target.key), target.value


def run_agent(chat_model: BaseChatModel, tool: BaseTool, question: str, max_steps: int = 6) -> list[BaseMessage]:
    """Run the agent to its final answer; returns the whole conversation."""
    try:
        from langchain.agents import create_agent
    except ImportError:
        create_agent = None
    if create_agent is not None:
        agent = create_agent(chat_model, tools=[tool], system_prompt=SYSTEM_PROMPT)
        return list(agent.invoke({"messages": [HumanMessage(question)]})["messages"])
    # A minimal tool-calling loop on LangChain core.
    model = chat_model.bind_tools([tool])
    messages: list[BaseMessage] = [SystemMessage(SYSTEM_PROMPT), HumanMessage(question)]
    for _ in range(max_steps):
        reply = model.invoke(messages)
        messages.append(reply)
        if not getattr(reply, "tool_calls", None):
            return messages
        for call in reply.tool_calls:
            if call["name"] != tool.name:
                messages.append(ToolMessage(f"Unknown tool {call['name']!r}; use {tool.name!r}.",
                                            tool_call_id=call["id"], status="error"))
            else:
                messages.append(tool.invoke(call))
    raise RuntimeError(f"the agent did not answer within {max_steps} steps")


def main(argv: Sequence[str] | None = None) -> int:
    import oprm_rag

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=oprm_rag.DEMO_MODEL, help="recurrent model folder for the tool")
    parser.add_argument("--chat-model", default=None,
                        help="provider:model for langchain's init_chat_model (needs the langchain package)")
    parser.add_argument("--chunk-tokens", default="auto", help="chunk length in tokens, or 'auto'")
    args = parser.parse_args(argv)
    if not (Path(args.model) / "config.json").is_file():
        print(f"No recurrent model at {args.model}. Train the demo model with `make train-demo-model-v2`, "
              "or pass --model PATH.", file=sys.stderr)
        return 1
    documents, question, expected = build_documents()
    chunk_tokens = args.chunk_tokens if args.chunk_tokens == "auto" else int(args.chunk_tokens)
    tool = oprm_tool(args.model, documents, chunk_tokens=chunk_tokens, boundary="sentence")
    if args.chat_model:
        from langchain.chat_models import init_chat_model

        chat_model: BaseChatModel = init_chat_model(args.chat_model)
    else:
        print("(offline: a scripted stand-in drives the agent; pass --chat-model for a real one)\n")
        chat_model = ScriptedToolCaller(calls=[
            {"name": tool.name, "args": {"question": question, "document_id": "log book"}},  # a wrong id first
            {"name": tool.name, "args": {"question": question, "document_id": "logbook"}},
        ])
    for message in run_agent(chat_model, tool, question):
        print(f"[{message.type}] {str(message.content)[:300] or message.tool_calls}")
    print(f"\n(expected code: {expected})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
