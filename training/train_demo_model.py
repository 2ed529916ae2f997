"""Train the shipped demo model (version 2): a small Mamba-2 that answers the recall task
and says ``Error`` when the key is absent, on prose it never saw.

One command, reproducible from a seed, CPU only (``make train-demo-model-v2``)::

    python training/train_demo_model.py --out oprm_rag/demo/model

It can be stopped and continued: a checkpoint (weights, optimiser, step, every random
generator) is written under ``--run-dir`` (default ``runs/demo-v2``, ignored by git)
every ``--ckpt-minutes``; ``--resume`` continues from it with the same arguments, and the
result is the same as an uninterrupted run.

What it does:

1. builds the training prose from four sources (``training/prose_sources.py``: standard
   library docstrings, PyTorch docstrings, /usr/share/doc notes, a seeded grammar), minus
   every sentence of the held-out and unseen files in ``oprm_rag/demo/data/``;
2. trains a byte-level BPE tokenizer on it whose digits are single tokens and whose
   letter pairs are merged (a made-up key is 2-5 tokens);
3. trains a ``Mamba2ForCausalLM`` from scratch on ``[instruction, document, (question,
   answer) x n]`` sequences from ``oprm_rag.demo.recall_task``, with hard negatives:
   absent keys that are near misses of present keys (one letter changed, same prefix or
   suffix, one letter more or less, two letters swapped), keys whose fact lies outside
   the visible window, words of the prose itself, and documents without any fact.
   A curriculum makes the lookup learnable from scratch: ``--easy-steps`` of short
   facts-only sequences first (without them a 4-layer model still answered ``Error`` to
   everything after 1,400 steps; with them it found the lookup by step ~500), then
   documents grow to the full length and prose ramps in, and the hard negatives ramp in
   from ``--hard-from`` (a share of training) on;
4. evaluates, every ``--eval-every`` steps, what the benchmark's targets measure, at the
   chunk length ``chunk_tokens="auto"`` resolves to for this model (the training length
   minus room for the prompt): on chunks of held-out prose with facts every 28 tokens,
   the per-chunk false-positive rate (a chunk without the key whose most likely first
   answer token is not ``Error``), for random and for near-miss absent keys, and recall
   on chunks that hold the key.

The prompt templates written next to the weights (``oprm_prompt.json``) are the ones the
model is trained on; ``OPRMSelector`` reads them from the model folder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "training"))

from oprm_rag.demo.recall_task import (  # noqa: E402
    HELDOUT_SOURCES,
    IDK_WORD,
    UNSEEN_SOURCES,
    build_document,
    heldout_prose,
    near_miss_key,
    new_keys,
    question_for,
    random_key,
    unseen_prose,
)

#: ``{idk}`` is filled with the IDK word (``PromptTemplate`` does the same with the JSON file),
#: so a custom IDK word keeps instruction and filter consistent.
INSTRUCTION = ("Read the text and answer the question with the code. "
               "If the text does not give the code, answer {idk}.\n\nText:\n")
# The answer follows the question's last token directly. A recurrent layer looks a key up
# through its 4-token convolution window; every template token between the key and the
# answer pushes the key out of that window (v1's notes: on synthetic recall, 0.90 with one
# token between key and answer, 0.22 with four).
QUESTION_TEMPLATE = "\n\nQuestion: {question}"
ANSWER_TEMPLATE = " {answer}"
EOS = "<|endoftext|>"
PAD = "<|pad|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
TOKENS_PER_FACT = 28  # the benchmark's density
DOC_WEIGHT = 0.2  # loss weight of a document token (see ``weighted_loss``)
#: Training prose: each document draws its sentences from one source, with these odds.
SOURCE_WEIGHTS = {"stdlib": 0.25, "torch_docs": 0.2, "debian_docs": 0.35, "generated": 0.2}


def instruction_text() -> str:
    return INSTRUCTION.replace("{idk}", IDK_WORD)


def auto_chunk_tokens(train_tokens: int) -> int:
    """What ``chunk_tokens="auto"`` gives for a model trained on ``train_tokens`` (see
    ``oprm_rag/capacity.py``: the training length minus room for the prompt; the state law
    gives no positive length for a state this small)."""
    return max(64, train_tokens - min(64, train_tokens // 8))


# --------------------------------------------------------------------------- corpus
def build_corpus(cache: Path) -> dict[str, list[str]]:
    """Training sentences per source, without any sentence of the held-out or unseen files.

    Cached in ``cache`` (JSON) so that a resumed run trains on exactly the same prose.
    """
    if cache.is_file():
        return json.loads(cache.read_text(encoding="utf-8"))
    from prose_sources import disjoint, extract

    raw = {name: extract(name) for name in SOURCE_WEIGHTS}
    excluded = [s for name in HELDOUT_SOURCES for s in heldout_prose(name)]
    excluded += [s for name in UNSEEN_SOURCES for s in unseen_prose(name)]
    excluded += heldout_prose()  # v1's held-out file, while it exists
    corpus = disjoint(raw, excluded)
    for name, sents in corpus.items():
        if not sents:
            raise SystemExit(f"prose source {name!r} is empty on this machine")
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(corpus), encoding="utf-8")
    return corpus


def corpus_digest(corpus: dict[str, list[str]]) -> str:
    h = hashlib.sha256()
    for name in sorted(corpus):
        h.update(name.encode())
        for s in corpus[name]:
            h.update(s.encode())
            h.update(b"\n")
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- tokenizer
def build_tokenizer(vocab_size: int, sentences: list[str], out: Path):
    """Byte-level BPE whose digits are single tokens (a leading space may stay attached).

    A 4-digit answer is then always ``[" d", "d", "d", "d"]``: the first answer token is
    the first digit, so its entropy says how sure the model is of the code.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r" ?[0-9]"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    template = instruction_text() + QUESTION_TEMPLATE.format(question=question_for("key")) + " " + IDK_WORD
    digits = " ".join("0123456789")  # every digit after a space is one token (" 7")
    # Made-up keys teach letter-pair merges, so a key is 2-5 tokens, not up to 8 letters.
    # As many as half the prose sentences: fewer, and the prose's own merges crowd the
    # letter pairs out of the vocabulary (keys then take up to 8 tokens).
    key_rng = random.Random(0)
    keys = [f"The code of {random_key(key_rng)} is" for _ in range(max(20000, len(sentences) // 2))]
    corpus = list(sentences) + [template] * 2000 + [f"is {digits}. The code of {digits}."] * 2000 + keys
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD, unk_token=None,
        model_max_length=1 << 20,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


# --------------------------------------------------------------------------- data
_WORD = re.compile(r"\b[a-z]{4,8}\b")


class Batcher:
    """Makes training sequences ``[P, doc, (Q, A, EOS) x n]`` with a per-token loss weight.

    Documents come from one prose source each and are cut to any length up to the
    training context. Questions ask for present keys (answer: the code) and for absent
    ones (answer: ``Error``), most absent ones hard: near misses of present keys, keys
    whose fact lies outside the window, words of the prose. A curriculum starts from
    short fact-only documents (the recall mechanism is found much sooner there).
    """

    def __init__(self, tokenizer, corpus: dict[str, list[str]], seq_len: int, rng: random.Random,
                 absent_share: float = 0.5, near_share: float = 0.5, hard_from: float = 0.0) -> None:
        self.tok = tokenizer
        self.corpus = corpus
        self.sources = list(SOURCE_WEIGHTS)
        self.weights = [SOURCE_WEIGHTS[s] for s in self.sources]
        self.seq_len = seq_len
        self.rng = rng
        self.absent_share = absent_share
        self.near_share = near_share
        self.hard_from = hard_from  # progress where hard negatives start to ramp in (0: from the start)
        self.prefix = tokenizer.encode(instruction_text())
        self.eos = tokenizer.convert_tokens_to_ids(EOS)
        self.pad = tokenizer.convert_tokens_to_ids(PAD)
        self.progress = 0.0  # 0 -> 1 over training, set by the loop
        self.counts = {"present": 0, "random": 0, "near": 0, "outside": 0, "word": 0}

    def _absent_key(self, kind: str, inside: list, outside: list, words: list[str], taken: set[str]) -> str | None:
        rng = self.rng
        if kind == "near" and inside:
            return near_miss_key(rng, rng.choice(inside).key, taken)
        if kind == "outside" and outside:
            return rng.choice(outside).key
        if kind == "word" and words:
            w = rng.choice(words)
            return w if w not in taken else None
        key = random_key(rng)
        return key if key not in taken else None

    def example(self) -> tuple[list[int], list[float]]:
        rng = self.rng
        p = self.progress
        few = rng.random() < 0.35  # few questions about a long document, or many about a shorter one
        n_questions = rng.randint(2, 4) if few else rng.randint(6, 14)
        room = self.seq_len - len(self.prefix) - 17 * n_questions
        grow = min(1.0, p / 0.3)
        longest = max(24, int(min(room, 96) + max(0, room - 96) * grow))
        doc_tokens = longest if (few or rng.random() < 0.3) else rng.randint(min(24, longest), longest)
        # Prose ramps in from 5% to 30% of training; before that documents are facts only.
        ramp = min(1.0, max(0.0, (p - 0.05) / 0.25))
        r = rng.random()
        if r < 0.07:
            n_facts = 0
        elif r < 0.14:
            n_facts = rng.randint(1, 2)
        else:
            per_fact = rng.uniform(11, 11 + 49 * ramp)
            n_facts = max(1, round(doc_tokens / per_fact))
        source = rng.choices(self.sources, self.weights)[0]
        sentences = self.corpus[source]
        fact_chars = n_facts * 28
        prose = ramp if n_facts else 1.0
        target = fact_chars + int(prose * max(0, doc_tokens * 4.4 - fact_chars)) + 40
        doc = build_document(rng, sentences, n_facts, target)
        enc = self.tok(doc.text, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        start = 0 if len(ids) <= doc_tokens or rng.random() < 0.5 else rng.randint(0, len(ids) - doc_tokens)
        ids, offsets = ids[start:start + doc_tokens], offsets[start:start + doc_tokens]
        lo, hi = offsets[0][0], offsets[-1][1]
        inside = [f for f, (a, b) in zip(doc.facts, doc.fact_spans) if a >= lo and b <= hi]
        partly = {f.key for f, (a, b) in zip(doc.facts, doc.fact_spans) if b > lo and a < hi and f not in inside}
        outside = [f for f, (a, b) in zip(doc.facts, doc.fact_spans) if b <= lo or a >= hi]
        taken = {f.key for f in doc.facts}
        words = sorted(set(_WORD.findall(doc.text[lo:hi])) - taken)
        rng.shuffle(inside)

        tokens = self.prefix + ids
        weights = [0.0] * len(self.prefix) + [DOC_WEIGHT] * len(ids)
        asked: set[str] = set(partly)
        # Before ``hard_from``: fewer absent keys, all random, so that the lookup itself is
        # found first; then near misses and the full absent share ramp in.
        hard = 1.0 if self.hard_from <= 0 else min(1.0, max(0.0, (p - self.hard_from) / 0.2))
        absent_share = 0.3 + (self.absent_share - 0.3) * hard if self.hard_from > 0 else self.absent_share
        near_share = self.near_share * hard
        present_pool = list(inside)
        for _ in range(n_questions):
            if present_pool and rng.random() >= absent_share:
                fact = present_pool.pop()
                key, answer, kind = fact.key, fact.value, "present"
            else:
                u = rng.random()
                kind = ("near" if u < near_share else "outside" if u < near_share + 0.15 * hard
                        else "word" if u < near_share + 0.25 * hard else "random")
                key = self._absent_key(kind, inside, outside, words, taken | asked)
                if key is None:
                    key, kind = random_key(rng), "random"
                if key in taken or key in asked:
                    continue
                answer = IDK_WORD
            asked.add(key)
            q = self.tok.encode(QUESTION_TEMPLATE.format(question=question_for(key)))
            a = self.tok.encode(ANSWER_TEMPLATE.format(answer=answer)) + [self.eos]
            if len(tokens) + len(q) + len(a) > self.seq_len:
                break
            self.counts[kind] += 1
            tokens += q + a
            # The first answer token decides the chunk's fate (kept or dropped, and its
            # entropy): it weighs most.
            weights += [0.1] * len(q) + [8.0] + [4.0] * (len(a) - 1)
        return tokens, weights

    def easy_example(self, max_facts: int = 6) -> tuple[list[int], list[float]]:
        """A warm-up sequence: 1 to ``max_facts`` facts and nothing else, then questions
        about them (70%) and about random absent keys. A from-scratch model finds the
        key-to-code lookup here within a few hundred cheap steps; on full documents with
        hard negatives it stayed at answering ``Error`` for over 1,000 steps."""
        rng = self.rng
        facts = build_document(rng, [], rng.randint(1, max_facts), 0).facts
        rng.shuffle(facts)
        text = " ".join(f"The code of {f.key} is {f.value}." for f in facts)
        ids = self.tok.encode(text)
        tokens = self.prefix + ids
        weights = [0.0] * len(self.prefix) + [DOC_WEIGHT] * len(ids)
        taken = {f.key for f in facts}
        pool = list(facts)
        for _ in range(rng.randint(2, 8)):
            if pool and rng.random() < 0.7:
                f = pool.pop()
                key, answer = f.key, f.value
            else:
                key = random_key(rng)
                if key in taken:
                    continue
                taken.add(key)
                answer = IDK_WORD
            q = self.tok.encode(QUESTION_TEMPLATE.format(question=question_for(key)))
            a = self.tok.encode(ANSWER_TEMPLATE.format(answer=answer)) + [self.eos]
            tokens += q + a
            weights += [0.1] * len(q) + [8.0] + [4.0] * (len(a) - 1)
        return tokens, weights

    def batch(self, size: int, easy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        seqs = [self.easy_example() if easy else self.example() for _ in range(size)]
        width = max(len(t) for t, _ in seqs)
        ids = torch.full((size, width), self.pad, dtype=torch.long)
        w = torch.zeros((size, width), dtype=torch.float32)
        for row, (t, wt) in enumerate(seqs):
            ids[row, : len(t)] = torch.tensor(t)
            w[row, : len(wt)] = torch.tensor(wt)
        return ids, w


# --------------------------------------------------------------------------- eval
def make_eval_set(tok, chunk_tokens: int, per_source: int, seed: int) -> list[dict]:
    """Chunks of exactly ``chunk_tokens`` tokens of held-out prose (a fact every 28 tokens),
    each with one question: about a key it holds, a random absent key, or a near miss."""
    rng = random.Random(seed)
    items = []
    prefix = tok.encode(instruction_text())
    idk = tok.encode(ANSWER_TEMPLATE.format(answer=IDK_WORD))
    for source in HELDOUT_SOURCES:
        sentences = heldout_prose(source)
        for i in range(per_source):
            kind = ("present", "random", "random", "near")[i % 4]
            n_facts = max(1, chunk_tokens // TOKENS_PER_FACT)
            doc = build_document(rng, sentences, n_facts + 4, int(chunk_tokens * 4.6))
            enc = tok(doc.text, return_offsets_mapping=True)
            ids, offsets = enc["input_ids"], enc["offset_mapping"]
            start = rng.randint(0, max(0, len(ids) - chunk_tokens))
            ids, offsets = ids[start:start + chunk_tokens], offsets[start:start + chunk_tokens]
            lo, hi = offsets[0][0], offsets[-1][1]
            inside = [f for f, (a, b) in zip(doc.facts, doc.fact_spans) if a >= lo and b <= hi]
            taken = {f.key for f in doc.facts}
            if kind == "present" and inside:
                fact = rng.choice(inside)
                key, answer = fact.key, tok.encode(ANSWER_TEMPLATE.format(answer=fact.value))
            elif kind == "near" and inside:
                key, answer = near_miss_key(rng, rng.choice(inside).key, taken), idk
            else:
                kind = "random"  # also where a chunk happens to hold no whole fact
                key, = new_keys(rng, 1, taken)
                answer = idk
            q = tok.encode(QUESTION_TEMPLATE.format(question=question_for(key)))
            items.append({"source": source, "kind": kind, "ids": prefix + ids + q, "answer": answer})
    return items


@torch.no_grad()
def evaluate(model, items: list[dict], idk_id: int, batch: int = 32) -> dict:
    """Teacher-forced first-token statistics and exact answers on ``items``."""
    model.eval()
    rows = []
    order = sorted(range(len(items)), key=lambda i: len(items[i]["ids"]) + len(items[i]["answer"]))
    for s in range(0, len(order), batch):
        group = [items[i] for i in order[s:s + batch]]
        seqs = [it["ids"] + it["answer"] for it in group]
        width = max(len(x) for x in seqs)
        ids = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, x in enumerate(seqs):
            ids[r, : len(x)] = torch.tensor(x)
        logits = model(ids.to(next(model.parameters()).device), use_cache=False).logits.float().cpu()
        for r, it in enumerate(group):
            n, a = len(it["ids"]), it["answer"]
            out = logits[r, n - 1: n - 1 + len(a)]
            probs = torch.softmax(out[0], -1)
            rows.append({"source": it["source"], "kind": it["kind"],
                         "exact": out.argmax(-1).tolist() == a,
                         "top_idk": int(out[0].argmax()) == idk_id,
                         "p_idk": float(probs[idk_id]),
                         "entropy": float(-(probs * probs.clamp_min(1e-30).log()).sum())})
    model.train()

    def summary(sel: list[dict]) -> dict:
        pos = [r for r in sel if r["kind"] == "present"]
        rnd = [r for r in sel if r["kind"] == "random"]
        near = [r for r in sel if r["kind"] == "near"]
        out = {"recall": _mean(r["exact"] for r in pos),
               "fp_random": _mean(not r["top_idk"] for r in rnd),
               "fp_near": _mean(not r["top_idk"] for r in near),
               "n": [len(pos), len(rnd), len(near)]}
        for tau in (0.5, 0.2, 0.05):  # the "drop when P(Error) > tau" rule
            out[f"fp_random@{tau}"] = _mean(r["p_idk"] <= tau for r in rnd)
            out[f"miss@{tau}"] = _mean(r["p_idk"] > tau for r in pos)
        return out

    result = {"all": summary(rows)}
    for source in HELDOUT_SOURCES:
        result[source] = summary([r for r in rows if r["source"] == source])
    return result


def _mean(xs) -> float:
    xs = list(xs)
    return round(sum(xs) / len(xs), 4) if xs else float("nan")


# --------------------------------------------------------------------------- loss
def weighted_loss(model, ids: torch.Tensor, w: torch.Tensor, lm_sample: float, backbone=None) -> torch.Tensor:
    """Weighted next-token loss, with the output layer run only where it is needed.

    The 4096-way output layer over every position cost as much as the whole Mamba body.
    Question and answer positions always count; document positions (a language-model
    loss that keeps the prose in view) count on a random ``lm_sample`` share of them.
    """
    run = backbone or (lambda x: model.backbone(x, use_cache=False).last_hidden_state)
    hidden = run(ids)[:, :-1]
    target, weight = ids[:, 1:], w[:, 1:]
    keep = weight > 0
    doc = weight == DOC_WEIGHT
    keep &= ~doc | (torch.rand(weight.shape) < lm_sample)
    logits = model.lm_head(hidden[keep]).float()
    nll = torch.nn.functional.cross_entropy(logits, target[keep], reduction="none")
    wk = weight[keep]
    return (nll * wk).sum() / wk.sum()


# --------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, model, opt, step: int, rng: random.Random, log: list, extra: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                "py_rng": rng.getstate(), "torch_rng": torch.get_rng_state(), "log": log, **extra}, tmp)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- main
def demo_config(tok, hidden: int, layers: int, state: int, head_dim: int):
    """The demo models' ``Mamba2Config``: expand 2, one B/C group (the fast forward's
    case), a 4-tap convolution, tied embeddings."""
    from transformers import Mamba2Config

    return Mamba2Config(
        vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, state_size=state, head_dim=head_dim,
        expand=2, num_heads=2 * hidden // head_dim, n_groups=1, conv_kernel=4, chunk_size=64,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True, use_cache=True,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "demo-v2" / "model",
                   help="model folder to write at the end (the shipped one: oprm_rag/demo/model)")
    p.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "demo-v2",
                   help="checkpoints, corpus cache and log (keep it out of git)")
    p.add_argument("--resume", action="store_true", help="continue from --run-dir's checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=8000)
    p.add_argument("--decay-steps", type=int, default=None,
                   help="linear learning-rate decay over the last steps (default: 20%% of --steps)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--state", type=int, default=64)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--absent-share", type=float, default=0.5, help="share of questions about absent keys")
    p.add_argument("--near-share", type=float, default=0.5, help="share of absent keys that are near misses")
    p.add_argument("--lm-sample", type=float, default=0.25,
                   help="share of document positions that get the language-model loss")
    p.add_argument("--easy-steps", type=int, default=600,
                   help="warm-up steps on facts-only sequences (see Batcher.easy_example)")
    p.add_argument("--hard-from", type=float, default=0.08,
                   help="training progress (0-1) from which hard negatives ramp in over 0.2; 0 = from the start")
    p.add_argument("--init-from", type=Path, default=None,
                   help="fine-tune this model folder (its tokenizer and architecture) instead of training from scratch")
    p.add_argument("--progress-from", type=float, default=0.0,
                   help="curriculum position to start at (1.0: full-length documents, all prose, all hard "
                        "negatives from the first step; for --init-from)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--eval-size", type=int, default=160, help="evaluation chunks per held-out source")
    p.add_argument("--ckpt-minutes", type=float, default=15.0)
    p.add_argument("--export", type=Path, default=None,
                   help="write this checkpoint (same model arguments) to --out as a model folder, then stop")
    p.add_argument("--stop-after", type=int, default=None,
                   help="checkpoint and stop after this many steps in this session (continue with --resume)")
    p.add_argument("--no-fast-forward", action="store_true", help="train on transformers' reference forward")
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward (needs a C++ compiler)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    run_dir: Path = args.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / "checkpoint.pt"
    t0 = time.time()

    corpus = build_corpus(run_dir / "corpus.json")
    all_sentences = [s for name in SOURCE_WEIGHTS for s in corpus[name]]
    tok_dir = run_dir / "tokenizer"
    if args.init_from is not None:
        from transformers import PreTrainedTokenizerFast

        # Fine-tuning keeps the model's own tokenizer (its embeddings are indexed by it);
        # a run folder holding another one (a from-scratch run's) is refused, not used.
        tok = PreTrainedTokenizerFast.from_pretrained(args.init_from)
        if (tok_dir / "tokenizer.json").is_file() and \
                PreTrainedTokenizerFast.from_pretrained(tok_dir).get_vocab() != tok.get_vocab():
            raise SystemExit(f"{tok_dir} holds a tokenizer other than {args.init_from}'s: "
                             "use another --run-dir for this fine-tune")
        tok.save_pretrained(tok_dir)
    elif (args.resume or args.export is not None) and (tok_dir / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    else:
        tok = build_tokenizer(args.vocab, all_sentences, tok_dir)
    idk_id = tok.encode(ANSWER_TEMPLATE.format(answer=IDK_WORD))[0]
    print(f"tokenizer: {len(tok)} tokens; corpus {corpus_digest(corpus)}: "
          + ", ".join(f"{k} {len(v)}" for k, v in corpus.items()) + f" sentences ({time.time() - t0:.0f}s)",
          flush=True)

    from transformers import Mamba2ForCausalLM

    config = demo_config(tok, args.hidden, args.layers, args.state, args.head_dim)
    if args.init_from is not None:
        model = Mamba2ForCausalLM.from_pretrained(args.init_from)
        if model.config.vocab_size != len(tok):
            raise SystemExit(f"{args.init_from}: the model's vocabulary ({model.config.vocab_size}) "
                             f"does not match its tokenizer ({len(tok)})")
        print(f"fine-tuning {args.init_from}: {model.config.num_hidden_layers} layers, "
              f"hidden {model.config.hidden_size}", flush=True)
    else:
        model = Mamba2ForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)
    if not args.no_fast_forward:
        from fast_mamba2 import check_equivalence, patch_model

        print(f"fast training forward: max logit difference {check_equivalence(model, len(tok)):.1e}", flush=True)
        patch_model(model)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    warmup = min(200, args.steps // 10)
    decay_steps = args.decay_steps if args.decay_steps is not None else args.steps // 5

    def lr_at(step: int) -> float:
        """Warm-up, constant, then linear decay to 5% (a checkpoint before the decay can
        be continued to more steps without changing anything already done)."""
        if step < warmup:
            return args.lr * (step + 1) / warmup
        left = args.steps - step
        if left < decay_steps:
            return args.lr * (0.05 + 0.95 * left / decay_steps)
        return args.lr

    log: list[dict] = []
    start_step = 0
    trained_seconds = 0.0
    if args.export is not None:  # write a checkpoint as a model folder, without training
        state = torch.load(args.export, weights_only=False)
        model.load_state_dict(state["model"])
        if not args.no_fast_forward:
            from fast_mamba2 import unpatch_model

            unpatch_model(model)
        write_model(args, model, tok, n_params, corpus, state["log"], state.get("trained_seconds", 0.0), {})
        print(f"exported {args.export} (step {state['step']}) to {args.out}", flush=True)
        return
    if args.resume and ckpt_path.is_file():
        state = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        rng.setstate(state["py_rng"])
        torch.set_rng_state(state["torch_rng"])
        start_step, log = state["step"], state["log"]
        trained_seconds = state.get("trained_seconds", 0.0)
        print(f"resumed from {ckpt_path} at step {start_step}", flush=True)
    elif args.resume:
        print(f"no checkpoint in {run_dir}; starting from scratch", flush=True)

    chunk = auto_chunk_tokens(args.seq_len)
    eval_items = make_eval_set(tok, chunk, args.eval_size, seed=1234)
    batcher = Batcher(tok, corpus, args.seq_len, rng, args.absent_share, args.near_share, args.hard_from)
    t_train = time.time()
    last_ckpt = time.time()

    def elapsed() -> float:
        return trained_seconds + time.time() - t_train

    backbone = None
    if args.compile:  # inductor: about 1.35x faster per step here, after ~4 minutes of compiling
        backbone = torch.compile(lambda x: model.backbone(x, use_cache=False).last_hidden_state, dynamic=True)
    if args.init_from is not None and start_step == 0:  # what the fine-tuning starts from
        row = {"step": 0, "minutes": 0.0, **evaluate(model, eval_items, idk_id)}
        print("eval " + json.dumps(row), flush=True)
        log.append(row)
    model.train()
    for step in range(start_step, args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        easy = step < args.easy_steps
        frac = max(0, step - args.easy_steps) / max(1, args.steps - args.easy_steps)
        batcher.progress = args.progress_from + (1.0 - args.progress_from) * frac
        ids, w = batcher.batch(args.batch, easy=easy)
        loss = weighted_loss(model, ids, w, args.lm_sample, backbone)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 20 == 0 or step == args.steps - 1:
            rate = (time.time() - t_train) / (step + 1 - start_step)
            print(f"step {step} loss {loss.item():.3f} lr {lr_at(step):.2e} {rate:.2f}s/step", flush=True)
        done = step == args.steps - 1
        if (step + 1) % args.eval_every == 0 or done:
            te = time.time()
            result = evaluate(model, eval_items, idk_id)
            row = {"step": step + 1, "loss": round(loss.item(), 4), "minutes": round(elapsed() / 60, 1),
                   "eval_seconds": round(time.time() - te, 1), **result}
            print("eval " + json.dumps(row), flush=True)
            log.append(row)
        stop = args.stop_after is not None and step + 1 - start_step >= args.stop_after and not done
        if done or stop or time.time() - last_ckpt > args.ckpt_minutes * 60:
            save_checkpoint(ckpt_path, model, opt, step + 1, rng, log, {"trained_seconds": elapsed()})
            last_ckpt = time.time()
        if (step + 1) % 1000 == 0 and not done:  # milestones to branch from (each a few MB)
            save_checkpoint(run_dir / f"checkpoint_{step + 1}.pt", model, opt, step + 1, rng, log,
                            {"trained_seconds": elapsed()})
        if stop:
            print(f"stopped after step {step + 1}; continue with --resume", flush=True)
            return

    from fast_mamba2 import unpatch_model

    unpatch_model(model)
    write_model(args, model, tok, n_params, corpus, log, elapsed(), batcher.counts)
    print(f"saved to {args.out} after {elapsed() / 60:.1f} min of training", flush=True)


def write_model(args, model, tok, n_params: int, corpus: dict, log: list, seconds: float, counts: dict,
                recipe: str | None = None) -> None:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "oprm_prompt.json").write_text(json.dumps({
        "instruction": INSTRUCTION,
        "question_template": QUESTION_TEMPLATE,
        "idk_word": IDK_WORD,
        "use_chat_template": False,
    }, indent=2) + "\n")
    (out / "training_log.json").write_text(json.dumps({
        "recipe": recipe or ("v2" if args.init_from is None else f"v2 fine-tune of {args.init_from}"),
        # A fine-tune takes its architecture and tokenizer from --init-from: those flags did nothing.
        "args": {k: str(v) for k, v in vars(args).items()
                 if args.init_from is None or k not in ("vocab", "hidden", "layers", "state", "head_dim")},
        "architecture": {k: getattr(model.config, k) for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                                                               "state_size", "head_dim", "num_heads")},
        "parameters": n_params,
        "train_context_tokens": args.seq_len,
        "eval_chunk_tokens": auto_chunk_tokens(args.seq_len),
        "training_sentences": {k: len(v) for k, v in corpus.items()},
        "corpus_sha256_16": corpus_digest(corpus),
        "source_weights": SOURCE_WEIGHTS,
        "questions_asked_in_last_session": counts,
        "train_minutes": round(seconds / 60, 1),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "eval": log,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
