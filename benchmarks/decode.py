"""Decoding speed from a stored state: tokens/s at batch 1 and 8, on a quiet and a busy machine.

An answer is decoded from the state after a prompt (as OPRM does from the winning
chunk's state) through the library's own decode loop: ``TokenStream`` at batch 1 (text
pieces streamed), ``Decoder`` at batch 8. Each row decodes exactly ``--tokens`` tokens
(no stop at EOS). Each condition runs twice in the same process: through the backend's
single-token step path (what decoding uses), and with one ``forward`` call per token
(the path decoding took before the step paths existed, on today's forward), so the gain
of the step path is a ratio measured side by side. Besides wall-clock rates it records
tokens per CPU second of the decoding thread, which a shared machine distorts less.

"Busy" starts a competing CPU-bound process for the duration of the measurement
(``--competitor spin``: ``python -c "while True: pass"``; ``torch``: a float32 matmul loop
on two torch threads) and stops it after. Targets (issue 14): >= 2,000 tok/s at batch 1
quiet, >= 1,000 tok/s at batch 1 with one competing process.

    python -m benchmarks.decode
    python -m benchmarks.decode --quick       # 32 tokens, one repeat, spin competitor only
"""

from __future__ import annotations

import contextlib
import statistics
import subprocess
import sys
import time
from typing import Any, Iterator

import torch

from benchmarks.common import parser, setup, write

_COMPETITORS = {
    "spin": "while True: pass",
    "torch": ("import torch; torch.set_num_threads(2); a = torch.randn(512, 512)\n"
              "while True: a = torch.tanh(a @ a) "),
}


@contextlib.contextmanager
def competitor(kind: str | None) -> Iterator[None]:
    """Run a CPU-bound process next to the block (None: none)."""
    if kind is None:
        yield
        return
    proc = subprocess.Popen([sys.executable, "-c", _COMPETITORS[kind]], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0 if kind == "torch" else 0.3)  # let it start burning
        if proc.poll() is not None:
            raise RuntimeError(f"the {kind} competitor exited at once (code {proc.returncode})")
        yield
    finally:
        proc.kill()
        proc.wait()


class _ForwardEachToken:
    """Decoding through ``forward`` once per token, for the side-by-side ratio."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    def session(self, state: Any) -> Any:
        from oprm_rag.backends.base import DecodeSession

        return DecodeSession(self.backend, state)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)


@contextlib.contextmanager
def forward_per_token(lm: Any) -> Iterator[None]:
    real = lm.backend
    lm.backend = _ForwardEachToken(real)
    try:
        yield
    finally:
        lm.backend = real


def decode_rate(lm: Any, state: Any, logits: torch.Tensor, batch: int, tokens: int,
                repeat: int) -> tuple[float, float]:
    """Median generated tokens per second (all rows) over ``repeat`` runs: per wall-clock
    second, and per CPU second of the decoding thread (what one quiet core would give)."""
    from oprm_rag.decoding.loop import Decoder, TokenStream
    from oprm_rag.decoding.config import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=tokens, stop_at_eos=False)
    states, first = (state, logits) if batch == 1 else (state.expand(batch), logits.expand(batch, -1))
    rates, cpu_rates = [], []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.thread_time()
        if batch == 1:
            stream = TokenStream(lm, states, first, cfg)
            stream.text()
            made = len(stream.result.token_ids)
        else:
            made = sum(len(g.token_ids) for g in Decoder(lm, states, first, cfg).run())
        rates.append(made / (time.perf_counter() - t0))
        cpu_rates.append(made / max(time.thread_time() - c0, 1e-9))
    return statistics.median(rates), statistics.median(cpu_rates)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--tokens", type=int, default=None, help="tokens per row (default 256; quick 64)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--competitor", choices=sorted(_COMPETITORS), nargs="*", default=None,
                   help="busy conditions to measure (default: spin, and torch unless --quick)")
    args = p.parse_args()
    lm = setup(args)
    from oprm_rag.demo.recall_task import question_for
    from oprm_rag.threads import per_thread_control, step_threads

    tokens = args.tokens or (32 if args.quick else 256)
    repeat = 1 if args.quick else args.repeat
    old_repeat = 1  # forward per token is slow: once is enough for the ratio
    busy = args.competitor if args.competitor is not None else (["spin"] if args.quick else ["spin", "torch"])
    from benchmarks.common import recall_document

    doc = recall_document(lm, 8, 400, seed=7)
    prompt = lm.encode(doc.text + "\n" + question_for(doc.facts[2].key))
    start = lm.prefill(prompt)  # the stored state decoding resumes from
    state, logits = start.state, start.logits.reshape(1, -1)
    decode_rate(lm, state, logits, 1, 8, 1)  # warm-up

    rows = []
    for condition in [None, *busy]:
        with competitor(condition):
            for batch in (1, 8):
                new, new_cpu = decode_rate(lm, state, logits, batch, tokens, repeat)
                with forward_per_token(lm):
                    old, _ = decode_rate(lm, state, logits, batch, tokens, old_repeat)
                rows.append({"condition": condition or "quiet", "batch": batch, "tokens_per_row": tokens,
                             "step_path_tok_s": new, "forward_per_token_tok_s": old, "speedup": new / old,
                             "step_path_tok_per_cpu_s": new_cpu})
                print(rows[-1], flush=True)
    params = sum(p.numel() for p in lm.model.parameters())
    result = {
        "model": lm.name, "family": lm.family, "parameters": params, "prompt_tokens": len(prompt), "rows": rows,
        "per_thread_control": per_thread_control(), "step_threads_batch1": step_threads(params),
        "targets_tok_s": {"quiet_batch1": 2000, "busy_batch1": 1000},
    }

    def plot(fig) -> None:
        ax = fig.add_subplot(111)
        labels = [f"{r['condition']}\nbatch {r['batch']}" for r in rows]
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r["forward_per_token_tok_s"] for r in rows], 0.4, label="forward per token",
               color="#7f7f7f")
        ax.bar([x + 0.2 for x in xs], [r["step_path_tok_s"] for r in rows], 0.4, label="single-token step path",
               color="#1f77b4")
        ax.axhline(2000, color="#2ca02c", ls="--", lw=1, label="target, quiet batch 1")
        ax.axhline(1000, color="#d62728", ls=":", lw=1, label="target, busy batch 1")
        ax.set_yscale("log")
        ax.set_xticks(list(xs), labels, fontsize=8)
        ax.set_ylabel("generated tokens / s (all rows)")
        ax.set_title(f"Decoding {tokens} tokens from a stored state ({lm.family}, {params / 1e6:.2f}M params)",
                     fontsize=9)
        ax.legend(fontsize=7)

    write("decode", args.out, result, plot, quick=args.quick)


if __name__ == "__main__":
    main()
