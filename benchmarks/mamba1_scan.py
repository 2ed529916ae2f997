"""Our Mamba-1 selective scan against transformers' CPU path: prefill tokens/s, same model.

A Mamba-130M-shaped model (d_model 768, 24 layers, d_state 16; random weights: speed does
not depend on them) prefills the same tokens through transformers' forward (its
Python loop over time) and through our backend. Outputs are checked equal.

    python -m benchmarks.mamba1_scan
    python -m benchmarks.mamba1_scan --quick     # 2 layers, 96 tokens, batch 1
"""

from __future__ import annotations

import torch

from benchmarks.common import parser, timed, write


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--tokens", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import MambaConfig, MambaForCausalLM

    from oprm_rag.backends.mamba import MambaBackend

    layers = 2 if args.quick else 24
    tokens = args.tokens or (96 if args.quick else 1024)
    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(vocab_size=50280, hidden_size=768, num_hidden_layers=layers,
                                         state_size=16)).eval()
    backend = MambaBackend(model, kernels="torch")
    rows = []
    for batch in ((1,) if args.quick else (1, 4)):
        ids = torch.randint(0, 50280, (batch, tokens))
        with torch.no_grad():
            t_hf, ref = timed(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1], 2)
        t_ours, out = timed(lambda: backend.forward(ids).logits, 2)
        err = (out - ref.float()).abs().max().item()
        rows.append({"batch": batch, "tokens": tokens, "transformers_tok_s": batch * tokens / t_hf,
                     "ours_tok_s": batch * tokens / t_ours, "speedup": t_hf / t_ours, "max_abs_logit_diff": err})
        print(rows[-1], flush=True)

    def plot(fig) -> None:
        ax = fig.add_subplot(111)
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r["transformers_tok_s"] for r in rows], 0.4, label="transformers (CPU loop)")
        ax.bar([x + 0.2 for x in xs], [r["ours_tok_s"] for r in rows], 0.4, label="oprm-rag scan")
        ax.set_xticks(list(xs), [f"batch {r['batch']}" for r in rows])
        ax.set_ylabel("prefill tokens / s")
        ax.set_title(f"Mamba-1 ({layers} layers x 768) prefill: "
                     + ", ".join(f"{r['speedup']:.1f}x" for r in rows), fontsize=9)
        ax.legend(fontsize=8)

    write("mamba1_scan", args.out, {"layers": layers, "hidden": 768, "rows": rows, "target_speedup": 5}, plot,
          quick=args.quick)


if __name__ == "__main__":
    main()
