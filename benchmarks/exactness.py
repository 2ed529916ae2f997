"""How exact is every shortcut? Max |logit difference| against a plain forward from scratch.

For each supported family (a small random-init model built offline, as the tests do)
and for the shipped demo model, on random token ids:

* ``full``: our backend's forward against ``model(input_ids, use_cache=False)``;
* ``continuation``: prefill a prefix, keep its state, continue over the rest (the
  shared-prefix and cached-chunk path) against the same plain forward;
* ``decode``: token-by-token decoding from a stored state (the answer path);
* ``batch``: one state expanded to a batch, each row continued (chunk scoring).

``transformers_continuation`` is transformers' own multi-token continuation from its
cache, where it has one, for contrast: the reason the state backends exist.

    python -m benchmarks.exactness
    python -m benchmarks.exactness --quick   # fewer splits
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from benchmarks.common import parser, write


def _measure(lm, ids, splits) -> dict[str, float]:
    import torch

    with torch.no_grad():
        ref = lm.model(input_ids=ids, use_cache=False).logits.float()
    err = {"full": (lm.backend.forward(ids, all_logits=True).logits - ref).abs().max().item()}
    cont = []
    for split in splits:
        first = lm.backend.forward(ids[:, :split])
        second = lm.backend.forward(ids[:, split:], first.state, all_logits=True)
        cont.append((second.logits - ref[:, split:]).abs().max().item())
    err["continuation"] = max(cont)
    split = splits[0]
    state = lm.backend.forward(ids[:1, :split]).state
    session = lm.backend.session(state)
    dec = []
    for i in range(split, ids.shape[1]):
        logits = session.step(ids[:1, i:i + 1])
        dec.append((logits - ref[:1, i]).abs().max().item())
    err["decode"] = max(dec)
    rows = 3
    out = lm.backend.forward(ids[:1, split:].expand(rows, -1), state, all_logits=True)
    err["batch"] = (out.logits - ref[:1, split:]).abs().max().item()
    return err


def _transformers_continuation(lm, ids, split) -> float | None:
    import torch

    try:
        from transformers import DynamicCache

        with torch.no_grad():
            ref = lm.model(input_ids=ids, use_cache=False).logits.float()
            cache = DynamicCache(config=lm.model.config)
            lm.model(input_ids=ids[:, :split], cache_params=cache, past_key_values=cache, use_cache=True)
            hf = lm.model(input_ids=ids[:, split:], cache_params=cache, past_key_values=cache,
                          use_cache=True).logits.float()
        return (hf - ref[:, split:]).abs().max().item()
    except Exception:  # noqa: BLE001 - a family without a continuable cache: nothing to contrast
        return None


def main() -> None:
    p = parser(__doc__)
    args = p.parse_args()
    import torch

    from oprm_rag import DEMO_MODEL, RecurrentLM
    from oprm_rag.testing import EXACT_FAMILIES, FALLBACK_FAMILIES, save_tiny_model

    if args.threads:
        torch.set_num_threads(args.threads)
    splits = [9] if args.quick else [1, 9, 17, 30]
    g = torch.Generator().manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in (*EXACT_FAMILIES, *FALLBACK_FAMILIES):
            path = save_tiny_model(family, Path(tmp) / family)
            lm = RecurrentLM.from_pretrained(path, device="cpu", dtype=torch.float32)
            ids = torch.randint(2, 300, (2, 40), generator=g)
            row = {"model": f"tiny {family}", "class": type(lm.model).__name__, "exact_backend": lm.backend.exact_continuation,
                   **_measure(lm, ids, splits),
                   "transformers_continuation": _transformers_continuation(lm, ids[:1], splits[0])}
            rows.append(row)
            print(row, flush=True)
    if Path(DEMO_MODEL, "model.safetensors").is_file():
        lm = RecurrentLM.from_pretrained(args.model or DEMO_MODEL, device="cpu", dtype=torch.float32)
        ids = torch.randint(2, len(lm.tokenizer), (2, 300), generator=g)
        row = {"model": "shipped demo model", "class": type(lm.model).__name__, "exact_backend": lm.backend.exact_continuation,
               **_measure(lm, ids, [s * 8 for s in splits]),
               "transformers_continuation": _transformers_continuation(lm, ids[:1], splits[0] * 8)}
        rows.append(row)
        print(row, flush=True)
    kinds = ["full", "continuation", "decode", "batch"]
    worst = max(r[k] for r in rows for k in kinds)

    def plot(fig) -> None:
        import numpy as np

        ax = fig.add_subplot(111)
        x = np.arange(len(rows))
        for i, k in enumerate(kinds):
            ax.bar(x + (i - 1.5) * 0.2, [max(r[k], 1e-9) for r in rows], 0.2, label=k)
        ax.axhline(1e-4, color="k", ls="--", lw=0.8, label="test tolerance 1e-4")
        ax.set_yscale("log")
        ax.set_xticks(x, [r["model"].replace("tiny ", "") for r in rows], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("max |logit difference| vs plain forward")
        ax.set_title(f"Every shortcut against a forward from scratch (fp32): worst {worst:.1e}", fontsize=9)
        ax.legend(fontsize=7)

    write("exactness", args.out, {"rows": rows, "worst": worst, "dtype": "float32", "tolerance": 1e-4}, plot,
          quick=args.quick)


if __name__ == "__main__":
    main()
