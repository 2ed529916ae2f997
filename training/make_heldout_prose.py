"""Write ``oprm_rag/demo/data/heldout_prose.txt``: filler prose the demo model never trains on.

Sources: the Python Language Reference topics bundled with CPython (``pydoc_data``, PSF
licence; the training corpus skips that package) and the text of the GNU GPL v3 (its
verbatim copying is permitted), when this machine has it. One sentence a line.
"""

from __future__ import annotations

import re
from pathlib import Path

from oprm_rag.demo.recall_task import _is_prose, split_sentences

OUT = Path(__file__).resolve().parents[1] / "oprm_rag" / "data" / "heldout_prose.txt"


def _topics_sentences() -> list[str]:
    from pydoc_data.topics import topics

    out = []
    for name in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[name]):
            lines = block.splitlines()
            if any(line.startswith(("   ", "\t", ">>>")) for line in lines[1:]):
                continue
            out += split_sentences(" ".join(l.strip() for l in lines))
    return out


def main() -> None:
    sentences = _topics_sentences()
    gpl = Path("/usr/share/common-licenses/GPL-3")
    if gpl.exists():
        sentences += split_sentences(gpl.read_text())
    seen, kept = set(), []
    for s in sentences:
        s = re.sub(r"[\"`*]", "", s)
        if _is_prose(s) and s not in seen:
            seen.add(s)
            kept.append(s)
    header = ("# Held-out filler prose for the associative-recall task (one sentence a line).\n"
              "# From the Python Language Reference (pydoc_data, PSF licence) and the GNU GPL v3 text.\n"
              "# Made by training/make_heldout_prose.py. The demo model never trained on it.\n")
    OUT.write_text(header + "\n".join(kept) + "\n", encoding="utf-8")
    print(f"{len(kept)} sentences -> {OUT}")


if __name__ == "__main__":
    main()
