"""``oprm-rag eval``: the paper's LongBench and LongBench v2 evaluation, vanilla against OPRM.

Modules, one job each: :mod:`.datasets` (readers for the published schemas and the
custom format), :mod:`.prompts` (LongBench's prompts and their OPRM split), :mod:`.metrics`
(LongBench's metrics), :mod:`.runner` (answering, resumable JSONL records, concurrency),
:mod:`.tasks` (what one example becomes), :mod:`.report` (summary and tables beside the
paper's numbers), :mod:`.needle` (the needle / associative-recall sweep and its heatmap),
:mod:`.cli` (the command). Nothing heavy is imported until a command runs.
"""

from __future__ import annotations

__all__: list[str] = []
