"""Train the demo model's version 3 in resumable pieces (``make train-demo-model``).

Version 3 is a larger Mamba-2 (about 3M parameters against version 2's 0.63M) trained
from scratch, with hard negatives and the ``Error`` answer from the first step, on
chunks exactly as the selector scores them (``chunk_batcher.py``: ``[P, C, Q]``, the
selector's own chunker, one question per branch from the chunk's state). See
``training/README.md`` for the reasoning and the compute estimate.

It runs in pieces. Every run resumes from the checkpoint in ``--ckpt-dir`` (default
``training/checkpoints/demo-v3/checkpoint.pt``, in the repository) when there is one:
weights, optimiser, step, and every random generator (the data are drawn from them, so
that is the data position too). It writes the checkpoint again every ``--ckpt-minutes``
of wall time, at ``--stop-after`` steps, at the last step, and on SIGTERM or SIGINT
(after the step in progress), always as one file replaced in place, with its log
(``train_log.jsonl``) beside it. A resumed run is bit-for-bit the run that did not stop
(tested). At ``--steps`` it writes the model folder ``--out``.

    python training/train_demo_v3.py                      # start or resume
    python training/train_demo_v3.py --stop-after 500     # one piece of 500 steps
    python training/train_demo_v3.py --export-to DIR      # the checkpoint as a model folder, no training
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "training"))

import checkpointing as ckpt  # noqa: E402
import train_demo_model as v2  # noqa: E402
from chunk_batcher import ChunkBatcher  # noqa: E402

from oprm_rag.demo.recall_task import IDK_WORD  # noqa: E402

#: Flags that define the run: a resumed run must have the same (the others, such as
#: ``--threads`` or ``--ckpt-minutes``, may change between pieces).
RECIPE_KEYS = ("seed", "steps", "warmup", "decay_steps", "batch", "per_chunk", "train_tokens", "hidden", "layers",
               "state", "head_dim", "lr", "weight_decay", "absent_share", "absent_ramp", "free_share", "lm_sample", "margin",
               "margin_weight", "eval_size")


def chunk_tokens_for(train_tokens: int) -> int:
    """The chunk length the selector's ``chunk_tokens="auto"`` gives a model trained on
    ``train_tokens``-token contexts (so that is the length it trains on)."""
    return v2.auto_chunk_tokens(train_tokens)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt-dir", type=Path, default=ROOT / "training" / "checkpoints" / "demo-v3",
                   help="the checkpoint, its log and its tokenizer (in the repository)")
    p.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "demo-v3",
                   help="the corpus cache (out of git; rebuilt from this machine's files, checked by hash)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "demo-v3" / "model",
                   help="model folder written after the last step")
    p.add_argument("--tokenizer-from", type=Path, default=ROOT / "oprm_rag" / "demo" / "model",
                   help="a fresh run copies this tokenizer into --ckpt-dir (version 2's: digits single, keys 2-5 tokens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--decay-steps", type=int, default=None, help="linear decay over the last steps (default 20%%)")
    p.add_argument("--batch", type=int, default=8, help="chunks per step")
    p.add_argument("--per-chunk", type=int, default=16, help="questions per chunk, each from the chunk's state")
    p.add_argument("--train-tokens", type=int, default=384,
                   help="training context; chunks are the selector's auto size for it (384 -> 336)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--state", type=int, default=128)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--absent-share", type=float, default=0.65, help="share of questions about absent keys")
    p.add_argument("--absent-ramp", type=float, default=0.05,
                   help="share of training over which the absent share rises from 0.3 to --absent-share")
    p.add_argument("--free-share", type=float, default=0.1, help="share of chunks without any fact")
    p.add_argument("--lm-sample", type=float, default=0.25, help="share of chunk positions with the LM loss")
    p.add_argument("--margin", type=float, default=1.0,
                   help="first answer token: the right token should beat every other by this many logits")
    p.add_argument("--margin-weight", type=float, default=1.0, help="weight of that hinge (0: off)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu",
                   help="cpu, cuda, or auto (cuda when there is one): minutes on a GPU are hours here. The data "
                        "and every random draw stay on the CPU, so a piece may run on either")
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument("--eval-size", type=int, default=64, help="evaluation chunks per held-out source")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--ckpt-minutes", type=float, default=15.0)
    p.add_argument("--stop-after", type=int, default=None, help="checkpoint and stop after this many steps")
    p.add_argument("--export-to", type=Path, default=None,
                   help="write the checkpoint as a model folder to this path, then stop (no training)")
    return p.parse_args(argv)


def load_corpus(args: argparse.Namespace) -> dict[str, list[str]]:
    """The training prose, from ``corpus.json.xz`` beside the checkpoint (2.4 MB, written by
    a fresh run): a later piece on another machine trains on the same sentences even where
    that machine's docstrings or /usr/share/doc differ, or the held-out files changed."""
    import lzma

    packed = args.ckpt_dir / "corpus.json.xz"
    if packed.is_file():
        return json.loads(lzma.decompress(packed.read_bytes()).decode("utf-8"))
    corpus = v2.build_corpus(args.run_dir / "corpus.json")
    args.ckpt_dir.mkdir(parents=True, exist_ok=True)
    packed.write_bytes(lzma.compress(json.dumps(corpus).encode("utf-8"), preset=9))
    return corpus


def build_model(args: argparse.Namespace, tok):
    from transformers import Mamba2ForCausalLM

    return Mamba2ForCausalLM(v2.demo_config(tok, args.hidden, args.layers, args.state, args.head_dim))


def lr_at(args: argparse.Namespace, step: int) -> float:
    """Warm-up, constant, linear decay to 5% over the last ``decay_steps``."""
    decay = args.decay_steps if args.decay_steps is not None else args.steps // 5
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    left = args.steps - step
    return args.lr * (0.05 + 0.95 * left / decay) if left < decay else args.lr


def loss_fn(model, batch, args: argparse.Namespace, idk_id: int) -> tuple[torch.Tensor, dict]:
    """Weighted next-token loss on the chunk (sampled) and on every question and answer,
    plus a hinge on the first answer token: the token that decides whether the selector
    keeps the chunk must beat every other token by ``margin`` logits."""
    from fast_mamba2 import branch_forward

    h_doc, h_br = branch_forward(model, batch.docs, batch.doc_mask, batch.branches, batch.per_chunk)
    dw = batch.doc_weight[:, :-1]
    keep = (dw > 0) & (torch.rand(dw.shape) < args.lm_sample).to(dw.device)  # drawn on the CPU generator
    bw = batch.branch_weight[:, :-1]
    bkeep = bw > 0
    hidden = torch.cat([h_doc[:, :-1][keep], h_br[:, :-1][bkeep]])
    target = torch.cat([batch.docs[:, 1:][keep], batch.branches[:, 1:][bkeep]])
    weight = torch.cat([dw[keep], bw[bkeep]])
    logits = model.lm_head(hidden).float()
    nll = F.cross_entropy(logits, target, reduction="none")
    loss = (nll * weight).sum() / weight.sum()
    rows = torch.arange(len(batch.first_answer), device=h_br.device)
    first_logits = model.lm_head(h_br[rows, batch.first_answer]).float()
    first_target = batch.branches[rows, batch.first_answer + 1]
    right = first_logits.gather(1, first_target[:, None])[:, 0]
    others = first_logits.scatter(1, first_target[:, None], float("-inf")).max(dim=1).values
    hinge = F.softplus(others - right + args.margin)
    total = loss + args.margin_weight * hinge.mean()
    with torch.no_grad():
        top = first_logits.argmax(1)
        fp = ((top != idk_id) & batch.answer_is_idk).sum() / batch.answer_is_idk.sum().clamp_min(1)
        acc = (top == first_target)[~batch.answer_is_idk].float().mean() if (~batch.answer_is_idk).any() \
            else torch.tensor(float("nan"))
    return total, {"loss": round(float(loss.detach()), 4), "hinge": round(float(hinge.detach().mean()), 4),
                   "train_fp": round(float(fp), 4), "train_first_acc": round(float(acc), 4)}


def _load_tokenizer(args: argparse.Namespace):
    from transformers import PreTrainedTokenizerFast

    args.ckpt_dir.mkdir(parents=True, exist_ok=True)
    if not (args.ckpt_dir / "tokenizer.json").is_file():
        tok = PreTrainedTokenizerFast.from_pretrained(args.tokenizer_from)
        tok.save_pretrained(args.ckpt_dir)
    return PreTrainedTokenizerFast.from_pretrained(args.ckpt_dir)


def _check_same_recipe(saved: dict, args: argparse.Namespace, path: Path) -> None:
    diff = {k: (saved.get(k), getattr(args, k)) for k in RECIPE_KEYS if saved.get(k) != getattr(args, k)}
    if diff:
        said = ", ".join(f"--{k.replace('_', '-')}: {a!r} there, {b!r} here" for k, (a, b) in diff.items())
        raise SystemExit(f"{path} was trained with other settings ({said}); resume with its settings "
                         f"({path.parent / 'run_config.json'}) or use another --ckpt-dir")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    path = args.ckpt_dir / "checkpoint.pt"
    log = ckpt.TrainLog(args.ckpt_dir / "train_log.jsonl")
    t0 = time.time()

    if args.export_to is not None:  # the checkpoint's own settings build its architecture
        if not path.is_file():
            raise SystemExit(f"no checkpoint at {path} to export")
        saved = torch.load(path, weights_only=False, map_location="cpu")["meta"]["recipe"]
        for k in RECIPE_KEYS:
            setattr(args, k, saved[k])
    corpus = load_corpus(args)
    digest = v2.corpus_digest(corpus)
    tok = _load_tokenizer(args)
    idk_id = tok.encode(v2.ANSWER_TEMPLATE.format(answer=IDK_WORD))[0]
    model = build_model(args, tok)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    n_params = sum(p.numel() for p in model.parameters())
    from fast_mamba2 import patch_model, unpatch_model

    patch_model(model)
    model.to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    recipe = {k: getattr(args, k) for k in RECIPE_KEYS}
    start, seconds, counts = 0, 0.0, None
    if path.is_file():
        state = ckpt.load(path, model, None if args.export_to else opt, None if args.export_to else rng)
        meta = state["meta"]
        if args.export_to is None:
            _check_same_recipe(meta["recipe"], args, path)
        if meta["corpus_sha256_16"] != digest:
            raise SystemExit(f"the training prose on this machine (corpus {digest}) is not the prose {path} was "
                             f"trained on ({meta['corpus_sha256_16']}): build_corpus reads this machine's docstrings "
                             "and /usr/share/doc; resume on a machine with the same files, or start another --ckpt-dir")
        start, seconds, counts = state["step"], meta["trained_seconds"], meta.get("counts")
        log.truncate_after(start)
        print(f"resumed from {path} at step {start} ({seconds / 3600:.2f} h trained)", flush=True)
    else:
        (args.ckpt_dir / "run_config.json").write_text(json.dumps(
            {"command": "python training/train_demo_v3.py " + " ".join(argv if argv is not None else sys.argv[1:]),
             **{k: (str(v) if isinstance(v, Path) else v) for k, v in recipe.items()}}, indent=2) + "\n")
        log.truncate_after(0)
    chunk = chunk_tokens_for(args.train_tokens)
    print(f"model {n_params / 1e6:.2f}M parameters on {device}; chunks of {chunk} tokens; corpus {digest}; "
          f"tokenizer {len(tok)} ({time.time() - t0:.0f}s)", flush=True)

    def export(where: Path) -> None:
        unpatch_model(model)
        model.cpu()
        ns = argparse.Namespace(**{**vars(args), "out": where, "init_from": None, "seq_len": args.train_tokens})
        evals = [r for r in log.rows() if "eval" in r]
        v2.write_model(ns, model, tok, n_params, corpus, evals, seconds, counts or {},
                       recipe=f"v3 from scratch, step {start} of {args.steps}")
        patch_model(model)
        model.to(device)

    if args.export_to is not None:
        export(args.export_to)
        print(f"exported {path} (step {start}) to {args.export_to}", flush=True)
        return

    batcher = ChunkBatcher(tok, corpus, v2.SOURCE_WEIGHTS, v2.instruction_text(), v2.QUESTION_TEMPLATE,
                           v2.ANSWER_TEMPLATE, v2.EOS, chunk, rng, per_chunk=args.per_chunk,
                           absent_share=args.absent_share, free_share=args.free_share, absent_ramp=args.absent_ramp)
    if counts:
        batcher.counts.update(counts)
    eval_items = v2.make_eval_set(tok, chunk, args.eval_size, seed=1234)
    t_piece, last_save, done_here = time.time(), time.time(), 0

    def meta() -> dict:
        return {"recipe": recipe, "corpus_sha256_16": digest, "trained_seconds": seconds + time.time() - t_piece,
                "counts": batcher.counts, "parameters": n_params, "chunk_tokens": chunk,
                "torch": torch.__version__, "python": sys.version.split()[0]}

    def write(step: int, why: str) -> None:
        size = ckpt.save(path, model, opt, step, rng, meta())
        log.append({"step": step, "checkpoint": why, "bytes": size,
                    "hours": round(meta()["trained_seconds"] / 3600, 3)})
        print(f"checkpoint at step {step} ({why}, {size / 2**20:.1f} MiB)", flush=True)

    model.train()
    step = start
    with ckpt.StopFlag() as stop:
        while step < args.steps:
            for group in opt.param_groups:
                group["lr"] = lr_at(args, step)
            batcher.progress = step / args.steps
            ts, cs = time.time(), time.process_time()
            batch = batcher.batch(args.batch).to(device)
            loss, stats = loss_fn(model, batch, args, idk_id)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            ckpt.round_moments(opt)
            step += 1
            done_here += 1
            if step % args.log_every == 0 or step == args.steps:
                row = {"step": step, **stats, "lr": lr_at(args, step - 1), "sec_per_step": round(time.time() - ts, 2),
                       "cpu_sec_per_step": round(time.process_time() - cs, 2),
                       "hours": round(meta()["trained_seconds"] / 3600, 3)}
                log.append(row)
                print(json.dumps(row), flush=True)
            if step % args.eval_every == 0 or step == args.steps:
                te = time.time()
                result = v2.evaluate(model, eval_items, idk_id)
                log.append({"step": step, "eval": result, "eval_seconds": round(time.time() - te, 1)})
                print("eval", json.dumps(result["all"]), flush=True)
            if step == args.steps:
                write(step, "last step")
            elif stop:
                write(step, f"signal {stop.signal}")
                print("stopped by signal; run the same command to resume", flush=True)
                return
            elif args.stop_after is not None and done_here >= args.stop_after:
                write(step, "stop-after")
                print("stopped; run the same command to resume", flush=True)
                return
            elif time.time() - last_save > args.ckpt_minutes * 60:
                write(step, "timer")
                last_save = time.time()
    seconds = meta()["trained_seconds"]
    start = step
    counts = batcher.counts
    export(args.out)
    print(f"saved the model to {args.out} after {seconds / 3600:.2f} h of training", flush=True)


if __name__ == "__main__":
    main()
