"""Our Mamba-1 prefill against transformers' CPU path: prefill tokens/s, same model, same outputs.

A Mamba-130M-shaped model (d_model 768, 24 layers, d_state 16; random weights: speed does
not depend on them) prefills the same tokens through transformers' forward (its Python
loop over time) and through our backend, with the native C scan (``kernels/native.py``)
and with the pure-torch scan. Outputs are checked equal. Two more measurements say what
is possible at all:

* ``ceiling``: our backend with the scan replaced by zeros. The projections (matmuls)
  are the same work on both sides, so transformers' time over this time is the largest
  speed-up any scan could give at these shapes;
* a Falcon-Mamba-7B-shaped layer (d_model 4096, d_state 16, one layer): what a 7B model
  would get per layer on this CPU, with the whole-model rate extrapolated to 64 layers;
* ``exactness``: each float32 path's distance from a float64 run of the same model. Over
  24 random layers float32 rounding alone moves logits by ~1e-3 (transformers' own path
  included), so ``max_abs_logit_diff`` between two float32 paths is of that order.

    python -m benchmarks.mamba1_scan
    python -m benchmarks.mamba1_scan --quick     # 2 layers, 96 tokens, batch 1; 7B layer on 32 tokens
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from benchmarks.common import parser, timed, write


@contextlib.contextmanager
def scan_mode(mode: str) -> Iterator[None]:
    """``native`` (default), ``torch`` (the native kernels off) or ``zeros`` (no scan at all)."""
    import oprm_rag.backends.mamba as mamba_backend
    from oprm_rag.kernels import native

    real_scan, real_enabled = mamba_backend.selective_scan_time_major, native.enabled

    def zeros(x, dt, A, B, C, D, z, dt_bias, h0, pad_left=None, **_):
        return torch.zeros_like(x), h0.float().clone()

    if mode == "zeros":
        mamba_backend.selective_scan_time_major = zeros
    elif mode == "torch":
        native.enabled = lambda: False  # type: ignore[assignment]
    try:
        yield
    finally:
        mamba_backend.selective_scan_time_major = real_scan
        native.enabled = real_enabled  # type: ignore[assignment]


def compare(model: Any, ids: torch.Tensor, repeat: int, modes: tuple[str, ...]) -> dict[str, Any]:
    from oprm_rag.backends.mamba import MambaBackend

    backend = MambaBackend(model, kernels="torch")
    n = ids.numel()
    with torch.no_grad():
        t_hf, ref = timed(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1], repeat)
    row: dict[str, Any] = {"batch": ids.shape[0], "tokens": ids.shape[1], "transformers_tok_s": n / t_hf}
    for mode in modes:
        with scan_mode(mode):
            t, out = timed(lambda: backend.forward(ids).logits, repeat)
        key = {"native": "ours", "torch": "ours_torch_scan", "zeros": "no_scan"}[mode]
        row[f"{key}_tok_s"] = n / t
        row[f"{key}_speedup"] = t_hf / t
        if mode != "zeros":
            row[f"{key}_max_abs_logit_diff"] = (out - ref.float()).abs().max().item()
    row["speedup"] = row["ours_speedup"]
    row["max_abs_logit_diff"] = row["ours_max_abs_logit_diff"]
    if "no_scan_speedup" in row:
        row["ceiling"] = row.pop("no_scan_speedup")
    print(row, flush=True)
    return row


def float64_errors(model: Any, ids: torch.Tensor) -> dict[str, Any]:
    """How far each float32 path is from the same model run in float64 (max |logit error|).

    Over many random layers float32 rounding alone moves the logits by about 1e-3, so
    comparing two float32 paths with each other says little; against float64, ours and
    transformers' own are equally close.
    """
    import copy

    from oprm_rag.backends.mamba import MambaBackend

    with torch.no_grad():
        ref = copy.deepcopy(model).double()(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1]
        hf = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1]
    backend = MambaBackend(model, kernels="torch")
    out = {"tokens": ids.shape[1], "logit_scale": ref.abs().max().item(),
           "transformers_error_vs_float64": (hf.double() - ref).abs().max().item()}
    for mode in ("native", "torch"):
        with scan_mode(mode):
            logits = backend.forward(ids).logits
        out[f"ours_{mode}_error_vs_float64"] = (logits.double() - ref).abs().max().item()
    print(out, flush=True)
    return out


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import FalconMambaConfig, FalconMambaForCausalLM, MambaConfig, MambaForCausalLM

    from oprm_rag.kernels import native

    layers = 2 if args.quick else 24
    tokens = args.tokens or (96 if args.quick else 1024)
    repeat = 1 if args.quick else args.repeat
    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(vocab_size=50280, hidden_size=768, num_hidden_layers=layers,
                                         state_size=16)).eval()
    rows = [compare(model, torch.randint(0, 50280, (batch, tokens)), repeat, ("native", "torch", "zeros"))
            for batch in ((1,) if args.quick else (1, 4))]
    exactness = float64_errors(model, torch.randint(0, 50280, (1, min(tokens, 256))))
    del model

    # One Falcon-Mamba-7B layer (d_model 4096, d_inner 8192, d_state 16, dt rank 256); a
    # small vocabulary, since the embedding and head are not what is measured.
    big_tokens = 32 if args.quick else 512
    big = FalconMambaForCausalLM(FalconMambaConfig(vocab_size=1024, hidden_size=4096, num_hidden_layers=1,
                                                   state_size=16, expand=2)).eval()
    seven = compare(big, torch.randint(0, 1024, (1, big_tokens)), repeat, ("native", "zeros"))
    seven["model_layers"] = 64
    seven["extrapolated_7b_prefill_tok_s"] = seven["ours_tok_s"] / 64
    seven["extrapolated_7b_transformers_tok_s"] = seven["transformers_tok_s"] / 64
    del big

    result = {"layers": layers, "hidden": 768, "rows": rows, "target_speedup": 5, "exactness": exactness,
              "native_kernels": native.library() is not None, "native_build_error": native.BUILD_ERROR,
              "falcon_mamba_7b_layer": seven}

    def plot(fig) -> None:
        ax = fig.add_subplot(111)
        items = [(f"batch {r['batch']}", r) for r in rows] + [("7B layer", seven)]
        xs = range(len(items))
        keys = [("transformers_tok_s", "transformers (CPU loop)", "#7f7f7f"),
                ("ours_torch_scan_tok_s", "oprm-rag, torch scan", "#aec7e8"),
                ("ours_tok_s", "oprm-rag, native scan", "#1f77b4"),
                ("no_scan_tok_s", "scan replaced by zeros (ceiling)", "#2ca02c")]
        width = 0.2
        for j, (key, label, color) in enumerate(keys):
            ax.bar([x + (j - 1.5) * width for x in xs], [r.get(key, 0) for _, r in items], width, label=label,
                   color=color)
        ax.set_yscale("log")
        ax.set_xticks(list(xs), [name for name, _ in items])
        ax.set_ylabel("prefill tokens / s")
        ax.set_title(f"Mamba-1 ({layers} x 768) prefill: "
                     + ", ".join(f"{r['speedup']:.1f}x (ceiling {r['ceiling']:.1f}x)" for r in rows)
                     + f"; 7B layer {seven['speedup']:.1f}x", fontsize=8)
        ax.legend(fontsize=7)

    write("mamba1_scan", args.out, result, plot, quick=args.quick)


if __name__ == "__main__":
    main()
