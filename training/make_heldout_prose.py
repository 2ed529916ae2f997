"""Write the prose files the demo model never trains on, one per source, into ``oprm_rag/demo/data/``.

* ``heldout_<source>.txt`` for ``source`` in ``HELDOUT_SOURCES`` (the Python Language
  Reference, the licences in /usr/share/common-licenses, the GNU info manuals): the
  benchmarks' prose, each source reported separately;
* ``unseen_<source>.txt`` for ``source`` in ``UNSEEN_SOURCES`` (manual pages, Perl's
  documentation): prose that neither training nor this project's benchmarks use, kept
  for others to test on.

A sentence that two files would share stays only in the first (held-out before unseen,
in the order above), and the training script drops every sentence of these files from
its own corpus. A sentence version 1 of the model trained on (``stdlib_prose()``: the
standard library's docstrings; version 2 is fine-tuned from it) is in no file: the
Python Language Reference shares 39 sentences with the docstrings (pdb's, for one). Each file keeps at most ``--max-sentences`` (a seeded sample, in source
order), so the package stays small. One sentence a line; ``#`` lines are the header.

    python training/make_heldout_prose.py
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "training"))

from prose_sources import extract, norm  # noqa: E402

from oprm_rag.demo.recall_task import HELDOUT_SOURCES, UNSEEN_SOURCES, stdlib_prose  # noqa: E402

DATA = ROOT / "oprm_rag" / "demo" / "data"

DESCRIPTIONS = {
    "python_reference": "the Python Language Reference topics bundled with CPython (pydoc_data; PSF licence)",
    "licenses": "the licence texts in Debian's /usr/share/common-licenses (GPL, LGPL, GFDL, Apache-2.0, "
                "MPL, Artistic, BSD, CC0; verbatim copying permitted)",
    "gnu_info": "the GNU info manuals in /usr/share/info (coreutils, grep, sed, find, gzip, wget, gnupg, ...; "
                "GFDL)",
    "man_pages": "Debian's English manual pages, /usr/share/man sections 1-8, Perl's pages excluded "
                 "(each under its package's licence)",
    "perl_docs": "Perl's POD documentation under /usr/share/perl and /usr/share/perl5 (Artistic or GPL)",
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-sentences", type=int, default=2500)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    taken: set[str] = set()
    v1_prose = {norm(s) for s in stdlib_prose()}  # version 1's training prose
    for kind, names in (("heldout", HELDOUT_SOURCES), ("unseen", UNSEEN_SOURCES)):
        for name in names:
            sentences, own = [], set()
            for s in extract(name):  # a sentence two sources share stays in the first one only
                if norm(s) not in taken and norm(s) not in own:
                    own.add(norm(s))
                    sentences.append(s)
            if len(sentences) > args.max_sentences:
                keep = sorted(random.Random(f"{args.seed}:{name}").sample(range(len(sentences)), args.max_sentences))
                sentences = [sentences[i] for i in keep]
            sentences = [s for s in sentences if norm(s) not in v1_prose]  # after the sample: it stays put
            taken.update(norm(s) for s in sentences)
            use = ("the benchmarks' held-out prose (never in the demo model's training data)" if kind == "heldout"
                   else "prose that neither the demo model's training nor this project's benchmarks use")
            header = (f"# {name}: {use}.\n"
                      f"# From {DESCRIPTIONS[name]}.\n"
                      f"# {len(sentences)} sentences, one a line. Made by training/make_heldout_prose.py.\n")
            out = DATA / f"{kind}_{name}.txt"
            out.write_text(header + "\n".join(sentences) + "\n", encoding="utf-8")
            print(f"{kind:8s} {name:18s} {len(sentences):6d} sentences -> {out.relative_to(ROOT)}", flush=True)


if __name__ == "__main__":
    main()
