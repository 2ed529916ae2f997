"""State collapse past the training length, and what the Stuffed-Mamba mitigations do.

Two measurements on the shipped Mamba-2 model:

1. **Loss against position.** Per-token negative log-likelihood on held-out prose
   (with facts), far past the training length, averaged in position bins, for plain
   inference, each mitigation ("forget more, remember less" at several constants,
   state normalisation, a sliding window) and OPRM-style chunked prefill (every chunk
   starts again from the instruction's state, so no state ever runs past one chunk).
2. **Recall against document length.** Accuracy of ``What is the code of KEY?`` with
   the whole document in one state (plain, and each mitigation) against OPRM.

The cost on short inputs is the loss and accuracy inside the training length.

    python -m benchmarks.state_collapse            # ~10 min on 2 cores
    python -m benchmarks.state_collapse --quick
"""

from __future__ import annotations

import random
import time

import torch

from benchmarks.common import parser, recall_document, setup, write
from oprm_rag import resolve


def _nll_by_position(lm, ids: list[int], prefix: list[int], chunk: int | None, bin_size: int) -> list[float]:
    """Mean NLL per position bin, running the document in one state (chunk=None) or in
    chunks that each restart from the instruction's state."""
    nll = []
    pieces = [ids] if chunk is None else [ids[i:i + chunk] for i in range(0, len(ids), chunk)]
    for piece in pieces:
        start = resolve(lm).start(prefix)  # computed once per model, then reused
        state, prev = start.states, start.logits[0]
        for i in range(0, len(piece), 1024):
            part = torch.tensor([piece[i:i + 1024]])
            out = lm.forward(part, state, all_logits=True)
            logits = torch.cat([prev[None], out.logits[0, :-1]], 0)
            nll += torch.nn.functional.cross_entropy(logits, part[0], reduction="none").tolist()
            state, prev = out.state, out.logits[0, -1]
    return [sum(nll[i:i + bin_size]) / len(nll[i:i + bin_size]) for i in range(0, len(nll), bin_size)]


def main() -> None:
    p = parser(__doc__)
    args = p.parse_args()
    base = setup(args)
    from oprm_rag import OPRMSelector, RecurrentLM
    from oprm_rag.demo.recall_task import question_for

    train = base.training_context_tokens or 512
    doc_tokens = 2 * train if args.quick else 16 * train
    chunk = max(64, train - 64)
    configs = {
        "plain": None,
        "forget (0.9999, 0.75)": {"alpha_scale": 0.9999, "b_scale": 0.75},
        "forget (0.99, 0.75)": {"alpha_scale": 0.99, "b_scale": 0.75},
        "forget (0.95, 1.0)": {"alpha_scale": 0.95, "b_scale": 1.0},
        "normalize state": {"normalize_state": True},
        f"window {train}": {"window": train},
    }
    if args.quick:
        configs = {k: v for k, v in configs.items() if k in ("plain", "forget (0.99, 0.75)", f"window {train}")}
    models = {name: (base if spec is None else RecurrentLM(base.model, base.tokenizer, name=base.name,
                                                           collapse_mitigation=spec)) for name, spec in configs.items()}
    sel0 = OPRMSelector(base, chunk_tokens=chunk, cache=False)
    prefix = sel0._prefix_ids()
    doc = recall_document(base, doc_tokens // 28, doc_tokens, seed=11)
    ids = base.encode(doc.text)[:doc_tokens]
    bin_size = max(64, train // 2)
    t0 = time.perf_counter()
    loss = {name: _nll_by_position(lm, ids, prefix, None, bin_size) for name, lm in models.items()}
    loss[f"OPRM chunks of {chunk}"] = _nll_by_position(base, ids, prefix, chunk, bin_size)
    print({k: [round(x, 2) for x in v[:: max(1, len(v) // 8)]] for k, v in loss.items()}, flush=True)

    lengths = [train // 2, 2 * train, 8 * train] if not args.quick else [train // 2, 2 * train]
    n_q = 4 if args.quick else 24
    recall = {name: [] for name in [*models, "OPRM"]}
    for L in lengths:
        rng = random.Random(L)
        doc = recall_document(base, max(2, L // 28), L, seed=L)
        asks = [(f.key, f.value) for f in rng.sample(doc.facts, min(n_q, len(doc.facts)))]
        for name, lm in models.items():
            sel = OPRMSelector(lm, chunk_tokens=None)
            hits = sum(sel.answer(question_for(k), doc.text, max_new_tokens=6).text.strip() == v for k, v in asks)
            recall[name].append(hits / len(asks))
        sel = OPRMSelector(base, chunk_tokens=chunk, boundary="sentence")
        hits = sum(sel.answer(question_for(k), doc.text, max_new_tokens=6).text.strip() == v for k, v in asks)
        recall["OPRM"].append(hits / len(asks))
        print(L, {k: v[-1] for k, v in recall.items()}, flush=True)

    in_train_bins = max(1, train // bin_size)
    summary = {name: {"loss_within_training_length": sum(v[:in_train_bins]) / in_train_bins,
                      "loss_last_bin": v[-1], "loss_max": max(v)} for name, v in loss.items()}

    def plot(fig) -> None:
        ax1 = fig.add_subplot(121)
        for name, v in loss.items():
            xs = [(i + 0.5) * bin_size for i in range(len(v))]
            ax1.plot(xs, v, label=name, lw=1.4, ls="--" if name.startswith("OPRM") else "-")
        ax1.axvline(train, color="k", lw=0.8, ls=":")
        ax1.text(train, ax1.get_ylim()[1], " training length", fontsize=7, va="top")
        ax1.set_xlabel("position (tokens)")
        ax1.set_ylabel("next-token loss (nats)")
        ax1.set_title("Loss against position", fontsize=9)
        ax1.legend(fontsize=6)
        ax2 = fig.add_subplot(122)
        for name, v in recall.items():
            ax2.plot(lengths, v, marker="o", label=name, ls="--" if name == "OPRM" else "-")
        ax2.set_xscale("log", base=2)
        ax2.set_xlabel("document tokens")
        ax2.set_ylabel("recall accuracy")
        ax2.set_ylim(-0.02, 1.02)
        ax2.set_title("Recall against length", fontsize=9)
        ax2.legend(fontsize=6)

    write("state_collapse", args.out, {
        "model": base.name, "train_context_tokens": train, "doc_tokens": len(ids), "bin_tokens": bin_size,
        "chunk_tokens": chunk, "configs": {k: v for k, v in configs.items()}, "loss_by_position": loss,
        "loss_summary": summary, "recall_lengths": lengths, "recall": recall,
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }, plot, quick=args.quick)


if __name__ == "__main__":
    main()
