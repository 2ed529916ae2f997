"""Train the shipped demo model: a small Mamba-2 that learns the associative-recall task.

One command, reproducible from a seed, CPU only::

    python training/train_demo_model.py --out oprm_rag/demo/model

It builds a byte-level BPE tokenizer on the standard library's docstrings, then trains
a ``Mamba2ForCausalLM`` from scratch on documents made by ``oprm_rag.demo.recall_task``:
``[instruction, document, question, answer]`` sequences, several questions per
document, half of them about keys the document lacks (answer: ``Error``).

The prompt templates written next to the weights (``oprm_prompt.json``) are the ones
the model is trained on; ``OPRMSelector`` reads them from the model folder.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from oprm_rag.demo.recall_task import (  # noqa: E402
    IDK_WORD,
    build_document,
    heldout_prose,
    question_for,
    random_key,
    stdlib_prose,
)

INSTRUCTION = (
    "Read the text and answer the question with the code. "
    f"If the text does not give the code, answer {IDK_WORD}.\n\nText:\n"
)
# The answer follows the question's last token directly. A recurrent layer looks a key up
# through its 4-token convolution window; every template token between the key and the
# answer pushes the key out of that window. On synthetic associative recall (2 layers,
# 3-token keys, 200 steps) accuracy was 0.90 with one token between key and answer and
# 0.22 with four, so the template adds nothing after the question.
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


# --------------------------------------------------------------------------- tokenizer
def build_tokenizer(vocab_size: int, sentences: tuple[str, ...], out: Path):
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
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    template = INSTRUCTION + QUESTION_TEMPLATE.format(question=question_for("key")) + " " + IDK_WORD
    # Every digit after a space must be one token ("Ġ7"), or an answer's first token would
    # be a bare space for some codes: teach those merges explicitly.
    digits = " ".join("0123456789")
    # Keys are random letter strings. Left to the prose's merges they split into single
    # letters (up to 9 tokens), too long for a small model to bind to a value; made-up keys
    # in the tokenizer's corpus teach it letter-pair merges, so a key is 2-5 tokens.
    key_rng = random.Random(0)
    keys = [f"The code of {random_key(key_rng)} is" for _ in range(20000)]
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
class Batcher:
    """Makes training sequences ``[P, doc, (Q, A, EOS) x n]`` with a per-token loss weight.

    Many questions per document (most about keys the document holds) give the recall
    signal a dense supervision; a curriculum grows the documents from short to the full
    training length over the first half of training.
    """

    def __init__(self, tokenizer, sentences, seq_len: int, rng: random.Random):
        self.tok = tokenizer
        self.sentences = sentences
        self.seq_len = seq_len
        self.rng = rng
        self.prefix = tokenizer.encode(INSTRUCTION)
        self.eos = tokenizer.convert_tokens_to_ids(EOS)
        self.pad = tokenizer.convert_tokens_to_ids(PAD)
        self.progress = 0.0  # 0 -> 1 over training, set by the loop

    def example(self) -> tuple[list[int], list[float]]:
        rng = self.rng
        # Mostly many questions about a shorter document; sometimes few about a long one,
        # so documents reach the full training length too.
        n_questions = rng.randint(2, 4) if rng.random() < 0.3 else rng.randint(6, 12)
        room = self.seq_len - len(self.prefix) - 22 * n_questions
        longest = int(min(room, 120) + max(0, room - 120) * min(1.0, 2.0 * self.progress))
        doc_tokens = rng.randint(min(24, longest), longest) if rng.random() < 0.75 else longest
        # Filler ramps in: documents start as facts only (every token matters for recall),
        # and reach one fact per 12-42 tokens of prose by 45% of training.
        ramp = min(1.0, max(0.0, (self.progress - 0.12) / 0.33))
        per_fact = rng.uniform(11 + 1 * ramp, 11 + 30 * ramp)
        n_facts = 0 if rng.random() < 0.04 else max(1, round(doc_tokens / per_fact))
        fact_chars = n_facts * 28
        target = fact_chars + int(ramp * max(0, doc_tokens * 4.0 - fact_chars)) + (160 if n_facts == 0 else 0)
        doc = build_document(rng, self.sentences, n_facts, target)
        enc = self.tok(doc.text, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        start = 0 if len(ids) <= doc_tokens or rng.random() < 0.7 else rng.randint(0, len(ids) - doc_tokens)
        ids, offsets = ids[start:start + doc_tokens], offsets[start:start + doc_tokens]
        lo, hi = offsets[0][0], offsets[-1][1]
        inside = [f for f, (a, b) in zip(doc.facts, doc.fact_spans) if a >= lo and b <= hi]
        partly = {f.key for f, (a, b) in zip(doc.facts, doc.fact_spans) if b > lo and a < hi}
        rng.shuffle(inside)

        tokens = self.prefix + ids
        weights = [0.0] * len(self.prefix) + [0.5] * len(ids)
        # About 70% of the questions ask for codes the document holds, the rest for absent keys.
        n_present = min(len(inside), round(0.7 * n_questions))
        plan = [True] * n_present + [False] * max(1, n_questions - n_present - (len(inside) < round(0.7 * n_questions)))
        rng.shuffle(plan)
        asked: set[str] = set()
        for present in plan:
            if present:
                fact = inside.pop()
                key, answer = fact.key, fact.value
            else:
                key = random_key(rng)
                if key in partly or key in asked:
                    continue
                answer = IDK_WORD
            asked.add(key)
            q = self.tok.encode(QUESTION_TEMPLATE.format(question=question_for(key)))
            a = self.tok.encode(ANSWER_TEMPLATE.format(answer=answer)) + [self.eos]
            if len(tokens) + len(q) + len(a) > self.seq_len:
                break
            tokens += q + a
            weights += [0.1] * len(q) + [6.0] * len(a)
        return tokens, weights

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        seqs = [self.example() for _ in range(size)]
        width = max(len(t) for t, _ in seqs)
        ids = torch.full((size, width), self.pad, dtype=torch.long)
        w = torch.zeros((size, width), dtype=torch.float32)
        for row, (t, wt) in enumerate(seqs):
            ids[row, : len(t)] = torch.tensor(t)
            w[row, : len(wt)] = torch.tensor(wt)
        return ids, w


# --------------------------------------------------------------------------- eval
@torch.no_grad()
def recall_accuracy(model, tok, n_facts: int, doc_tokens: int, trials: int, seed: int) -> tuple[float, float]:
    """Greedy first-token check on held-out prose: (accuracy on present keys, on absent keys)."""
    rng = random.Random(seed)
    sentences = heldout_prose()
    prefix = tok.encode(INSTRUCTION)
    good_present = good_absent = 0
    for t in range(trials):
        doc = build_document(rng, sentences, n_facts, int(doc_tokens * 4.2))
        present = t % 2 == 0
        key = rng.choice(doc.facts).key if present and doc.facts else random_key(rng)
        answer = doc.answer_for(key)
        ids = prefix + tok.encode(doc.text) + tok.encode(QUESTION_TEMPLATE.format(question=question_for(key)))
        target = tok.encode(ANSWER_TEMPLATE.format(answer=answer))
        seq = torch.tensor([ids + target])
        logits = model(seq).logits[0, len(ids) - 1 : len(ids) - 1 + len(target)]
        ok = logits.argmax(-1).tolist() == target
        if answer == IDK_WORD:
            good_absent += ok
        else:
            good_present += ok
    half = max(1, trials // 2)
    return good_present / half, good_absent / max(1, trials - half)


# --------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "oprm_rag" / "demo_model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--vocab", type=int, default=3072)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--state", type=int, default=64)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--probe", type=int, default=0, help="only time this many steps")
    args = p.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    sentences = stdlib_prose()
    tok = build_tokenizer(args.vocab, sentences, args.out)
    print(f"tokenizer: {len(tok)} tokens, {len(sentences)} training sentences ({time.time() - t0:.0f}s)", flush=True)

    from transformers import Mamba2Config, Mamba2ForCausalLM

    config = Mamba2Config(
        vocab_size=len(tok), hidden_size=args.hidden, num_hidden_layers=args.layers,
        state_size=args.state, head_dim=args.head_dim, expand=2,
        num_heads=2 * args.hidden // args.head_dim, n_groups=1, conv_kernel=4, chunk_size=64,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True, use_cache=True,
    )
    model = Mamba2ForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    warmup = min(100, args.steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    batcher = Batcher(tok, sentences, args.seq_len, rng)
    log = []
    steps = args.probe or args.steps
    t_train = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        batcher.progress = step / max(1, steps)
        ids, w = batcher.batch(args.batch)
        model.train()
        logits = model(ids).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), reduction="none")
        weight = w[:, 1:].reshape(-1)
        loss = (nll * weight).sum() / weight.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 20 == 0 or step == steps - 1:
            el = time.time() - t_train
            print(f"step {step} loss {loss.item():.3f} lr {lr_at(step):.2e} {el / (step + 1):.2f}s/step", flush=True)
        if not args.probe and ((step + 1) % args.eval_every == 0 or step == steps - 1):
            model.eval()
            row = {"step": step + 1, "loss": round(loss.item(), 4), "minutes": round((time.time() - t_train) / 60, 1)}
            for n_facts, length in ((2, 64), (8, 256), (16, 448)):
                acc, idk = recall_accuracy(model, tok, n_facts, length, 32, seed=1234)
                row[f"recall@{n_facts}"] = acc
                row[f"idk@{n_facts}"] = idk
            print("eval", row, flush=True)
            log.append(row)
            model.save_pretrained(args.out)
    if args.probe:
        return

    model.save_pretrained(args.out)
    (args.out / "oprm_prompt.json").write_text(json.dumps({
        "instruction": INSTRUCTION,
        "question_template": QUESTION_TEMPLATE,
        "idk_word": IDK_WORD,
        "use_chat_template": False,
    }, indent=2) + "\n")
    (args.out / "training_log.json").write_text(json.dumps({
        "args": {k: str(v) for k, v in vars(args).items()},
        "parameters": n_params,
        "training_sentences": len(sentences),
        "train_context_tokens": args.seq_len,
        "wall_minutes": round((time.time() - t0) / 60, 1),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "eval": log,
    }, indent=2) + "\n")
    print(f"saved to {args.out} after {(time.time() - t0) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
