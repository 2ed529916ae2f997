"""Training data of the demo model's version 3: chunks exactly as the selector scores them.

Why a new batcher: version 2 trained on ``[P, document, (Q, A) x n]`` sequences. The
selector never shows the model that: it scores every chunk as ``[P, C_i, Q]`` with one
question, and the chunks are cut by its own chunker (``oprm_rag.chunking``: the
model's chunk length, ended at a sentence boundary). Version 2's per-chunk false
positives (7.4%: a chunk without the key answering a confident digit) were measured on
that prompt, mostly with keys that the document does hold, but in another chunk. So
version 3 trains on exactly that prompt and exactly those chunks:

* a document of held-apart training prose with facts at a varied density is tokenised
  and cut by ``chunk_document`` with the selector's defaults (sentence boundaries,
  15% tolerance), at the model's ``chunk_tokens`` most of the time and at shorter sizes
  otherwise; one chunk of it is the context;
* ``per_chunk`` questions each branch from the state after ``[P, C]``
  (``fast_mamba2.branch_forward``): each sees ``P, C, Q`` and nothing else, and the
  chunk is paid for once;
* about two questions in three ask for a key the chunk does not hold, most of them
  hard: keys of the same document's other chunks (the benchmark's commonest key-free
  case), near misses of keys in the chunk and outside it, words of the prose, random
  keys; a tenth of the chunks hold no fact at all. A fact cut by the chunk's edge is
  never asked about (its answer is ambiguous).

A curriculum makes the lookup learnable from scratch: chunks start at 128 tokens of facts
only (``progress`` 0), then grow to the full chunk length while prose ramps in; the share
of absent-key questions rises from 0.3 to its full value over the first 5% of training.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

import torch

from oprm_rag.chunking import DocumentTokens, chunk_document
from oprm_rag.demo.recall_task import IDK_WORD, build_document, near_miss_key, new_keys, question_for

__all__ = ["ChunkBatch", "ChunkBatcher", "KINDS"]

#: What a training question asks: a key in the chunk, or one of these absent kinds.
KINDS = ("present", "other_chunk", "near", "near_other", "word", "random")
#: Odds of each absent kind (where it cannot be made, a random key is asked instead).
ABSENT_ODDS = {"other_chunk": 0.3, "near": 0.3, "near_other": 0.1, "word": 0.1, "random": 0.2}
_WORD = re.compile(r"\b[a-z]{4,8}\b")


@dataclass
class ChunkBatch:
    """``docs`` [b, T] left-padded ``[P, C]`` (``doc_mask`` 1 on tokens, ``doc_weight`` the
    loss weight of predicting each next token); ``branches`` [b * per_chunk, t]
    right-padded ``[Q, A, EOS]`` rows, row ``i * per_chunk + j`` continuing chunk ``i``
    (``branch_weight``: the loss weight of each next token, ``first_answer`` [rows] the
    position, within the row, whose next token is the first answer token; -1 for an
    unused row)."""

    docs: torch.Tensor
    doc_mask: torch.Tensor
    doc_weight: torch.Tensor
    branches: torch.Tensor
    branch_weight: torch.Tensor
    first_answer: torch.Tensor
    answer_is_idk: torch.Tensor
    per_chunk: int
    kinds: list[str] = field(default_factory=list)

    def to(self, device: torch.device | str) -> "ChunkBatch":
        names = ("docs", "doc_mask", "doc_weight", "branches", "branch_weight", "first_answer", "answer_is_idk")
        return ChunkBatch(*(getattr(self, n).to(device) for n in names), self.per_chunk, self.kinds)


class ChunkBatcher:
    """Makes :class:`ChunkBatch` es for ``chunk_tokens``-token chunks (see the module docstring)."""

    def __init__(self, tokenizer, corpus: dict[str, list[str]], source_weights: dict[str, float],
                 instruction: str, question_template: str, answer_template: str, eos: str,
                 chunk_tokens: int, rng: random.Random, per_chunk: int = 8, absent_share: float = 0.65,
                 free_share: float = 0.1, full_share: float = 0.6, doc_weight: float = 0.2,
                 absent_ramp: float = 0.05, early_absent_share: float = 0.3) -> None:
        self.tok = tokenizer
        self.corpus = corpus
        self.sources = [s for s in source_weights if corpus.get(s)]
        self.weights = [source_weights[s] for s in self.sources]
        self.question_template = question_template
        self.answer_template = answer_template
        self.chunk_tokens = chunk_tokens
        self.rng = rng
        self.per_chunk = per_chunk
        self.absent_share = absent_share
        self.absent_ramp = absent_ramp
        self.early_absent_share = min(early_absent_share, absent_share)
        self.free_share = free_share
        self.full_share = full_share
        self.doc_weight = doc_weight
        self.prefix = tokenizer.encode(instruction)
        self.eos = tokenizer.convert_tokens_to_ids(eos)
        self.pad = tokenizer.pad_token_id
        self.idk_first = tokenizer.encode(answer_template.format(answer=IDK_WORD))[0]
        self.progress = 0.0  # 0 -> 1 over training, set by the loop
        self.counts = {k: 0 for k in KINDS}
        self.counts["free_chunks"] = 0

    # ------------------------------------------------------------------ one chunk
    def chunk(self) -> tuple[str, list[int], list, list, set[str], list[str]]:
        """(chunk text, chunk token ids, facts inside, facts of other chunks, keys cut by an
        edge, prose words) of one chunk cut as the selector cuts."""
        rng, p = self.rng, self.progress
        grow = min(1.0, p / 0.3)
        ramp = min(1.0, max(0.0, (p - 0.05) / 0.25))   # prose share: none before 5%, all from 30%
        shortest = min(128, self.chunk_tokens)  # ~11 facts: room for many present questions
        longest = int(shortest + (self.chunk_tokens - shortest) * grow)
        size = longest if rng.random() < self.full_share else rng.randint(min(24, longest), longest)
        free = rng.random() < self.free_share * max(0.3, ramp)
        # tokens per fact: the benchmark's 28 or anything from 12 to 60 with all the prose; a
        # fact alone is about 11.5 tokens, and the prose between facts grows with the ramp
        per_fact = 11.5 + (rng.choice([28.0, rng.uniform(12, 60)]) - 11.5) * ramp
        doc_tokens = 3 * size  # about three chunks: most chunks start and end as the selector's do
        n_facts = 0 if free else max(1, round(doc_tokens / per_fact))
        source = rng.choices(self.sources, self.weights)[0]
        prose_chars = int(n_facts * (per_fact - 11.5) * 4.2) if n_facts else int(doc_tokens * 4.2)
        doc = build_document(rng, self.corpus[source], n_facts, n_facts * 28 + prose_chars + 40)
        enc = self.tok(doc.text, return_offsets_mapping=True)
        tokens = DocumentTokens(doc.text, enc["input_ids"], enc["offset_mapping"])
        chunks = chunk_document(tokens, 0, size, boundary="sentence", tolerance=0.15)
        c = rng.choice(chunks)
        lo, hi = c.char_start, c.char_end
        inside, outside, cut = [], [], set()
        for f, (a, b) in zip(doc.facts, doc.fact_spans):
            if lo <= a and b <= hi:
                inside.append(f)
            elif b <= lo or a >= hi:
                outside.append(f)
            else:
                cut.add(f.key)
        words = sorted(set(_WORD.findall(doc.text[lo:hi])) - {f.key for f in doc.facts})
        self.counts["free_chunks"] += not inside
        return doc.text[lo:hi], [int(t) for t in c.token_ids], inside, outside, cut, words

    def _absent(self, kind: str, inside: list, outside: list, words: list[str], banned: set[str]) -> tuple[str, str]:
        rng = self.rng
        try:
            if kind == "other_chunk" and outside:
                cands = [f.key for f in outside if f.key not in banned]
                if cands:
                    return rng.choice(cands), kind
            elif kind == "near" and inside:
                return near_miss_key(rng, rng.choice(inside).key, banned), kind
            elif kind == "near_other" and outside:
                return near_miss_key(rng, rng.choice(outside).key, banned), kind
            elif kind == "word":
                cands = [w for w in words if w not in banned]
                if cands:
                    return rng.choice(cands), kind
        except ValueError:  # no near miss outside the banned keys: ask a random one
            pass
        return new_keys(rng, 1, banned)[0], "random"

    def questions(self, inside: list, outside: list, cut: set[str], words: list[str]) -> list[tuple[str, str, str]]:
        """``per_chunk`` distinct (key, answer, kind) about the chunk."""
        rng = self.rng
        pool = list(inside)
        rng.shuffle(pool)
        banned = {f.key for f in inside} | cut
        asked: set[str] = set()
        out = []
        absent_kinds, odds = list(ABSENT_ODDS), list(ABSENT_ODDS.values())
        share = self.absent_share_now()
        while len(out) < self.per_chunk:
            if pool and rng.random() >= share:
                f = pool.pop()
                key, answer, kind = f.key, f.value, "present"
            else:
                kind = rng.choices(absent_kinds, odds)[0]
                key, kind = self._absent(kind, inside, outside, words, banned | asked)
                answer = IDK_WORD
            asked.add(key)
            out.append((key, answer, kind))
        return out

    def absent_share_now(self) -> float:
        """The share of absent-key questions: ``early_absent_share`` at the start, rising to
        ``absent_share`` over the first ``absent_ramp`` of training. Every kind of hard
        negative is asked from the first step; only their share grows, so that the
        lookup itself is found first (v2's notes: from scratch, with most questions absent,
        a model answered ``Error`` to everything for over 1,000 steps)."""
        if self.absent_ramp <= 0:
            return self.absent_share
        t = min(1.0, self.progress / self.absent_ramp)
        return self.early_absent_share + (self.absent_share - self.early_absent_share) * t

    # ------------------------------------------------------------------ a batch
    def batch(self, size: int) -> ChunkBatch:
        rows, branch_rows = [], []
        kinds: list[str] = []
        for _ in range(size):
            _, ids, inside, outside, cut, words = self.chunk()
            rows.append(self.prefix + ids)
            for key, answer, kind in self.questions(inside, outside, cut, words):
                q = self.tok.encode(self.question_template.format(question=question_for(key)))
                a = self.tok.encode(self.answer_template.format(answer=answer)) + [self.eos]
                branch_rows.append((q, a, answer == IDK_WORD))
                kinds.append(kind)
                self.counts[kind] += 1
        width = max(len(r) for r in rows)
        docs = torch.full((size, width), self.pad, dtype=torch.long)
        mask = torch.zeros((size, width))
        dw = torch.zeros((size, width))
        for i, r in enumerate(rows):
            docs[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
            # weight of predicting token j+1 from position j: the chunk's own tokens only
            dw[i, width - len(r) + len(self.prefix) - 1: width - 1] = self.doc_weight
        bw_width = max(len(q) + len(a) for q, a, _ in branch_rows)
        n = len(branch_rows)
        br = torch.full((n, bw_width), self.pad, dtype=torch.long)
        bw = torch.zeros((n, bw_width))
        first = torch.full((n,), -1, dtype=torch.long)
        idk = torch.zeros(n, dtype=torch.bool)
        for i, (q, a, is_idk) in enumerate(branch_rows):
            br[i, : len(q) + len(a)] = torch.tensor(q + a)
            # position j predicts token j+1; the last question token predicts the first answer token
            bw[i, : len(q) - 1] = 0.1
            bw[i, len(q) - 1] = 8.0
            bw[i, len(q): len(q) + len(a) - 1] = 4.0
            first[i] = len(q) - 1
            idk[i] = is_idk
        return ChunkBatch(docs, mask, dw, br, bw, first, idk, self.per_chunk, kinds)
