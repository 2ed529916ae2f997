"""Speed at real model sizes: a 130M-shaped Mamba-2 against transformers and llama.cpp, in one run.

Every figure below comes from one process on one machine, so compare the ratios:

* builds a random-init Mamba-2 of ``mamba2-130m``'s shape offline (24 layers, d_model
  768, state 128, head 64, vocabulary 50,288; nothing downloaded), exports it with
  ``oprm-rag export-gguf`` (float32) and starts the ``llama-server`` that ``make
  served-test`` builds on it (skipped, with the reason, when no binary is built: the peer
  is never faked);
* on a ~4,096-token held-out document: transformers' ``model(input_ids)``, our plain
  prefill, OPRM selection in 512-token chunks, decoding at batch 1 from the prefilled
  state, and llama.cpp's prompt processing and decoding from its own ``/completion``
  timings; in float32, and with bf16 projections (``matmul_dtype="bfloat16"``) where the
  CPU has bf16 instructions, with the bf16 entropy error and selection agreement against
  float32 on held-out questions (on this model and on the shipped, trained demo model);
* a memory-bandwidth probe (a read pass and a copy over 512 MiB) and the decode bound it
  implies for the weights' bytes (float32 and bf16);
* one Falcon-Mamba-7B-shaped layer and one Nemotron-H-8B-shaped Mamba-2 layer (a hybrid's
  SSM layer): tokens/s per layer, ours against transformers;
* 1 thread against all of torch's threads, for our prefill, decoding and llama.cpp.

    python -m benchmarks.real_size             # the 130M shape, 4K tokens, 7B-shaped layers
    python -m benchmarks.real_size --quick     # a small Mamba-2 (a minute): the same code paths

The machine may be shared: the JSON records the load average before and after; on a
busy machine the ratios hold better than the absolute rates.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks.common import recall_document, write

SHAPE_130M = dict(hidden_size=768, num_hidden_layers=24, state_size=128, head_dim=64, num_heads=24, expand=2,
                  n_groups=1, vocab_size=50288, chunk_size=256)
SHAPE_QUICK = dict(hidden_size=256, num_hidden_layers=2, state_size=64, head_dim=32, num_heads=16, expand=2,
                   n_groups=1, vocab_size=8192, chunk_size=256)
#: One layer of each 7B-class shape (from the models' published configs).
LAYERS_7B = {
    "falcon-mamba-7b (Mamba-1)": ("falcon_mamba", dict(hidden_size=4096, intermediate_size=8192, state_size=16,
                                                       time_step_rank=256, conv_kernel=4)),
    "nemotron-h-8b mamba-2 layer": ("mamba2", dict(hidden_size=4096, num_heads=128, head_dim=64, state_size=128,
                                                   n_groups=8, expand=2, chunk_size=256)),
}
LAYERS_QUICK = {
    "falcon-mamba-7b (Mamba-1) at 1/8 width": ("falcon_mamba", dict(hidden_size=512, intermediate_size=1024,
                                                                    state_size=16, time_step_rank=32,
                                                                    conv_kernel=4)),
    "nemotron-h-8b mamba-2 layer at 1/8 width": ("mamba2", dict(hidden_size=512, num_heads=16, head_dim=64,
                                                                state_size=128, n_groups=8, expand=2,
                                                                chunk_size=256)),
}


# ---------------------------------------------------------------------- building
def build_model(folder: Path, shape: dict[str, Any], seed: int = 0) -> Path:
    """A random-init Mamba-2 folder of ``shape`` with the tests' byte-level tokenizer (its
    ids are a subset of the embedding rows; nothing is downloaded)."""
    import transformers as tf

    from oprm_rag.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = tf.Mamba2Config(**shape, tie_word_embeddings=True, eos_token_id=tok.eos_token_id,
                          bos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, max_position_embeddings=4096)
    model = tf.Mamba2ForCausalLM(cfg).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def layer_model(family: str, shape: dict[str, Any], seed: int = 0) -> Any:
    """A one-layer model of a 7B-class layer shape (a tiny vocabulary: the layer is what is timed)."""
    import transformers as tf

    torch.manual_seed(seed)
    if family == "falcon_mamba":
        cfg = tf.FalconMambaConfig(num_hidden_layers=1, vocab_size=512, **shape)
        return tf.FalconMambaForCausalLM(cfg).eval()
    cfg = tf.Mamba2Config(num_hidden_layers=1, vocab_size=512, **shape)
    return tf.Mamba2ForCausalLM(cfg).eval()


# ---------------------------------------------------------------------- timing
def best_of(fn: Callable[[], Any], repeat: int) -> float:
    """The fastest of ``repeat`` runs (seconds): on a shared machine the least disturbed one."""
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def with_threads(n: int | None, fn: Callable[[], Any]) -> Any:
    if n is None:
        return fn()
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def bandwidth_probe(mib: int = 512, repeat: int = 3) -> dict[str, float]:
    """Memory read and copy rates (GB/s) with torch on this thread's threads."""
    n = mib * (1 << 20) // 4
    src = torch.ones(n)
    dst = torch.empty_like(src)
    src.sum(), dst.copy_(src)  # touch every page first
    t_read = best_of(lambda: src.sum(), repeat)
    t_copy = best_of(lambda: dst.copy_(src), repeat)
    return {"read_GB_s": n * 4 / t_read / 1e9, "copy_GB_s": 2 * n * 4 / t_copy / 1e9}


def decode_rate(lm: Any, state: Any, first: int, tokens: int, repeat: int) -> float:
    """Greedy tokens/s at batch 1 through the backend's decode session (the library's step path)."""
    from oprm_rag.backends.base import call_threads
    from oprm_rag.threads import intra_op_threads

    def run() -> None:  # as the library's decoding loop does: the argmax on the step's threads
        session = lm.backend.session(state)
        tok = torch.tensor([[first]])
        threads = call_threads(lm.backend, 1)
        for _ in range(tokens):
            logits = session.step(tok)
            with intra_op_threads(threads):
                tok = logits.argmax(-1, keepdim=True)

    run()  # builds the step constants (and any bf16 weight copies) once
    return tokens / best_of(run, repeat)


# ---------------------------------------------------------------------- llama.cpp
def _post(url: str, body: dict[str, Any], timeout: float = 600.0) -> dict[str, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def llama_cpp(model_dir: Path, work: Path, prompt: list[int], decode_tokens: int, threads: list[int],
              repeat: int) -> dict[str, Any]:
    """llama-server's prompt processing and decoding on the f32 GGUF export of ``model_dir``
    (its own ``timings``), per thread count; or why it was skipped."""
    from oprm_rag.served.llama_server import ENV_VAR, LlamaServer, find_llama_server

    binary = find_llama_server()
    if binary is None:
        return {"skipped": "no llama-server binary is built: run `make served-test` (or set "
                           f"{ENV_VAR}); llama.cpp was not measured"}
    gguf = work / "model-f32.gguf"
    cli = Path(sys.executable).with_name("oprm-rag")
    cmd = [str(cli)] if cli.is_file() else [sys.executable, "-m", "oprm_rag"]
    subprocess.run([*cmd, "export-gguf", str(model_dir), str(gguf), "--context-length", "4096"], check=True,
                   capture_output=True, text=True)
    out: dict[str, Any] = {"binary": str(binary), "gguf": "f32 (oprm-rag export-gguf)",
                           "gguf_bytes": gguf.stat().st_size, "by_threads": {}}
    for n in threads:
        with LlamaServer(gguf, alias="real-size", slots=1, slot_context=len(prompt) + decode_tokens + 64, threads=n,
                         binary=binary, startup_timeout=300) as srv:
            url = srv.root_url + "/completion"
            pp, tg = [], []
            _post(url, {"prompt": prompt[:32], "n_predict": 1, "cache_prompt": False})  # warm-up
            for _ in range(repeat):
                r = _post(url, {"prompt": prompt, "n_predict": 1, "cache_prompt": False, "temperature": 0})
                pp.append(r["timings"]["prompt_per_second"])
                r = _post(url, {"prompt": prompt[:64], "n_predict": decode_tokens, "cache_prompt": False,
                                "temperature": 0, "ignore_eos": True})
                tg.append(r["timings"]["predicted_per_second"])
                assert r["timings"]["predicted_n"] == decode_tokens, r["timings"]
            out["by_threads"][str(n)] = {"prompt_tok_s": max(pp), "decode_tok_s": max(tg),
                                         "prompt_tokens": r["timings"].get("prompt_n")}
    return out


# ---------------------------------------------------------------------- our side
def _start_prefix(lm: Any, prefix: list[int]) -> None:
    try:
        from oprm_rag import resolve
    except ImportError:  # before the one-engine refactor
        lm.context.start(prefix)
        return
    resolve(lm).start(prefix)


def ours(lm: Any, doc: Any, question: str, chunk: int, decode_tokens: int, repeat: int,
         threads: list[int]) -> dict[str, Any]:
    """Plain prefill, OPRM selection and decoding on ``lm`` as it is configured."""
    from oprm_rag import OPRMSelector

    sel = OPRMSelector(lm, chunk_tokens=chunk, cache=False)
    prefix, q_ids = sel._prefix_ids(), sel._question_ids(question)
    doc_ids = lm.encode(doc.text)
    full = prefix + doc_ids + q_ids
    _start_prefix(lm, prefix)  # the shared prefix: computed once, kept (as in oprm_vs_plain)
    res = sel.select(question, doc.text)  # warm-up, and the selection compared across precisions
    out: dict[str, Any] = {"doc_tokens": len(doc_ids), "chunks": len(res.chunks), "by_threads": {}}
    out["entropies"] = [c.entropy for c in res.chunks]
    out["selected"] = [c.chunk.index for c in res.selected]
    start = lm.prefill(full)
    first = int(start.logits.reshape(-1).argmax())
    for n in threads:
        t_plain = with_threads(n, lambda: best_of(lambda: lm.prefill(full), repeat))
        t_sel = with_threads(n, lambda: best_of(lambda: sel.select(question, doc.text), repeat))
        dec = with_threads(n, lambda: decode_rate(lm, start.state, first, decode_tokens, repeat))
        out["by_threads"][str(n)] = {"plain_prefill_tok_s": len(full) / t_plain,
                                     "oprm_select_tok_s": len(doc_ids) / t_sel, "decode_tok_s": dec}
    return out


def transformers_forward(model: Any, ids: list[int], repeat: int) -> float:
    x = torch.tensor([ids])

    def run() -> None:
        with torch.no_grad():
            model(x)

    return len(ids) / best_of(run, repeat)


def agreement(f32: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    e0, e1 = f32["entropies"], other["entropies"]
    return {"max_entropy_error_nats": max(abs(a - b) for a, b in zip(e0, e1)),
            "same_selection": f32["selected"] == other["selected"]}


def heldout_agreement(model_path: str, questions: int, doc_tokens: int, chunk: int) -> dict[str, Any]:
    """bf16 against float32 on ``questions`` held-out recall questions: entropy error and
    whether the same chunks are selected."""
    from oprm_rag import OPRMSelector, RecurrentLM
    from oprm_rag.demo.recall_task import question_for

    lms = {name: RecurrentLM.from_pretrained(model_path, matmul_dtype=dt) for name, dt in
           (("f32", None), ("bf16", "bfloat16"))}
    errors, same = [], 0
    for q in range(questions):
        doc = recall_document(lms["f32"], max(2, doc_tokens // 200), doc_tokens, seed=100 + q)
        question = question_for(doc.facts[q % len(doc.facts)].key)
        res = {name: OPRMSelector(lm, chunk_tokens=chunk, cache=False).select(question, doc.text)
               for name, lm in lms.items()}
        errors += [abs(a.entropy - b.entropy) for a, b in zip(res["f32"].chunks, res["bf16"].chunks)]
        same += [c.chunk.index for c in res["f32"].selected] == [c.chunk.index for c in res["bf16"].selected]
    return {"model": model_path, "questions": questions, "doc_tokens": doc_tokens, "chunk_tokens": chunk,
            "selection_agreement": same / questions, "max_entropy_error_nats": max(errors),
            "mean_entropy_error_nats": sum(errors) / len(errors)}


def layers(specs: dict[str, tuple[str, dict[str, Any]]], tokens: int, repeat: int) -> list[dict[str, Any]]:
    """Tokens/s through one 7B-class layer: ours (float32, and bf16 projections) against transformers."""
    from oprm_rag import RecurrentLM
    from oprm_rag.testing import tiny_tokenizer

    rows = []
    for name, (family, shape) in specs.items():
        model = layer_model(family, shape)
        ids = torch.randint(3, 500, (1, tokens), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            model(ids[:, :16])
        hf = transformers_forward(model, ids[0].tolist(), repeat)
        lm = RecurrentLM(model, tiny_tokenizer(), name=name)
        lm.backend.forward(ids[:, :16])
        t32 = best_of(lambda: lm.backend.forward(ids), repeat)
        lm.backend.set_matmul_dtype("bfloat16")
        lm.backend.forward(ids[:, :16])
        t16 = best_of(lambda: lm.backend.forward(ids), repeat)
        params = sum(p.numel() for p in model.backbone.layers[0].parameters())
        rows.append({"layer": name, "family": family, "layer_params": params, "tokens": tokens,
                     "transformers_tok_s": hf, "ours_f32_tok_s": tokens / t32, "ours_bf16_tok_s": tokens / t16,
                     "speedup_f32": tokens / t32 / hf})
        print(rows[-1], flush=True)
        del model, lm
    return rows


# ---------------------------------------------------------------------- main
def main() -> None:
    from benchmarks.common import parser

    p = parser(__doc__)
    p.add_argument("--doc-tokens", type=int, default=None)
    p.add_argument("--chunk-tokens", type=int, default=None)
    p.add_argument("--repeat", type=int, default=None)
    p.add_argument("--no-layers", action="store_true", help="skip the 7B-class layers")
    args = p.parse_args()
    from oprm_rag import DEMO_MODEL, RecurrentLM
    from oprm_rag.demo.recall_task import question_for
    from oprm_rag.kernels.precision import cpu_bf16_support, resolve_matmul_dtype
    from oprm_rag.threads import step_threads

    quick = args.quick
    doc_tokens = args.doc_tokens or (512 if quick else 4096)
    chunk = args.chunk_tokens or (128 if quick else 512)
    decode_tokens = 8 if quick else 64
    repeat = args.repeat or (1 if quick else 2)
    all_threads = args.threads or torch.get_num_threads()
    threads = [all_threads] if quick or all_threads == 1 else [1, all_threads]
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="oprm-real-size-"))
    try:
        shape = SHAPE_QUICK if quick else SHAPE_130M
        model_dir = build_model(work / "model", shape)
        f32 = RecurrentLM.from_pretrained(str(model_dir))
        params = sum(p.numel() for p in f32.model.parameters())
        doc = recall_document(f32, max(2, doc_tokens // 200), doc_tokens, seed=7)
        question = question_for(doc.facts[1].key)
        print(f"model: {params / 1e6:.1f}M parameters, document {f32.count_tokens(doc.text)} tokens", flush=True)

        # float32: transformers, ours, llama.cpp on the same weights
        doc_ids = f32.encode(doc.text)
        hf = transformers_forward(f32.model, doc_ids, repeat)
        print(f"transformers forward: {hf:.0f} tok/s", flush=True)
        ours_f32 = ours(f32, doc, question, chunk, decode_tokens, repeat, threads)
        print("ours f32:", ours_f32["by_threads"], flush=True)
        prompt = f32.encode(doc.text)
        peer = llama_cpp(model_dir, work, prompt, decode_tokens, threads, repeat)
        print("llama.cpp:", peer.get("skipped") or peer["by_threads"], flush=True)
        del f32

        # bf16 projections, recurrence float32
        support = cpu_bf16_support()
        bf16 = RecurrentLM.from_pretrained(str(model_dir), matmul_dtype="bfloat16")
        ours_bf16 = ours(bf16, doc, question, chunk, decode_tokens, repeat, threads)
        print("ours bf16:", ours_bf16["by_threads"], flush=True)
        del bf16
        auto = resolve_matmul_dtype("auto", torch.device("cpu"), torch.float32)

        bw = {str(n): with_threads(n, bandwidth_probe) for n in threads}
        weight_bytes = params * 4
        bounds = {n: {"f32_tok_s": b["read_GB_s"] * 1e9 / weight_bytes,
                      "bf16_tok_s": b["read_GB_s"] * 1e9 / (weight_bytes / 2)} for n, b in bw.items()}
        held = {"this_model": agreement(ours_f32, ours_bf16)}
        if Path(DEMO_MODEL, "model.safetensors").is_file():
            held["shipped_demo_model"] = heldout_agreement(DEMO_MODEL, 2 if quick else 12, 1024 if quick else 4096,
                                                           128 if quick else 512)
        layer_rows = [] if args.no_layers else layers(LAYERS_QUICK if quick else LAYERS_7B, 64 if quick else 512,
                                                      repeat)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    n = str(all_threads)
    mine, peer_n = ours_f32["by_threads"][n], (peer.get("by_threads") or {}).get(n)
    ratios: dict[str, Any] = {"plain_prefill_vs_transformers": mine["plain_prefill_tok_s"] / hf}
    if peer_n:
        ratios.update({
            "oprm_select_vs_llama_prompt": mine["oprm_select_tok_s"] / peer_n["prompt_tok_s"],
            "plain_prefill_vs_llama_prompt": mine["plain_prefill_tok_s"] / peer_n["prompt_tok_s"],
            "decode_vs_llama_decode": mine["decode_tok_s"] / peer_n["decode_tok_s"],
            "bf16_oprm_select_vs_llama_f32_prompt": ours_bf16["by_threads"][n]["oprm_select_tok_s"]
            / peer_n["prompt_tok_s"],
            "bf16_decode_vs_llama_f32_decode": ours_bf16["by_threads"][n]["decode_tok_s"] / peer_n["decode_tok_s"],
        })
    ratios["decode_f32_vs_bandwidth_bound"] = mine["decode_tok_s"] / bounds[n]["f32_tok_s"]
    ratios["decode_bf16_vs_bandwidth_bound"] = ours_bf16["by_threads"][n]["decode_tok_s"] / bounds[n]["bf16_tok_s"]
    result = {
        "shape": shape, "parameters": params, "weight_bytes_f32": weight_bytes, "doc_tokens": ours_f32["doc_tokens"],
        "chunk_tokens": chunk, "chunks": ours_f32["chunks"], "decode_tokens": decode_tokens, "threads": threads,
        "transformers_forward_tok_s": hf, "ours_f32": ours_f32["by_threads"], "ours_bf16": ours_bf16["by_threads"],
        "llama_cpp": peer, "bandwidth": bw, "decode_bound": bounds, "ratios": ratios,
        "bf16": {"cpu": support, "auto_resolves_to": auto.label(), "vs_f32": held},
        "layers_7b": layer_rows, "step_threads_130m_batch1": step_threads(params),
        "load_average_before_after": [load_before, os.getloadavg()],
        "note": "one process, one machine; on a shared machine compare the ratios",
    }
    print(json.dumps(ratios, indent=1))

    def plot(fig) -> None:
        ax = fig.add_subplot(121)
        labels, vals, colors = ["transformers\nforward"], [hf], ["#7f7f7f"]
        for tag, rows, color in (("ours f32", ours_f32["by_threads"][n], "#1f77b4"),
                                 ("ours bf16", ours_bf16["by_threads"][n], "#17becf")):
            labels += [f"{tag}\nprefill", f"{tag}\nOPRM", f"{tag}\ndecode"]
            vals += [rows["plain_prefill_tok_s"], rows["oprm_select_tok_s"], rows["decode_tok_s"]]
            colors += [color] * 3
        if peer_n:
            labels += ["llama.cpp\nprompt", "llama.cpp\ndecode"]
            vals += [peer_n["prompt_tok_s"], peer_n["decode_tok_s"]]
            colors += ["#d62728"] * 2
        ax.bar(range(len(vals)), vals, color=colors)
        ax.axhline(bounds[n]["f32_tok_s"], color="#1f77b4", ls=":", lw=1, label="decode bound f32 (bus)")
        ax.axhline(bounds[n]["bf16_tok_s"], color="#17becf", ls=":", lw=1, label="decode bound bf16 (bus)")
        ax.set_yscale("log")
        ax.set_xticks(range(len(vals)), labels, fontsize=5)
        ax.set_ylabel("tokens / s")
        ax.set_title(f"{params / 1e6:.0f}M Mamba-2, {ours_f32['doc_tokens']} tokens, {n} threads", fontsize=8)
        ax.legend(fontsize=6)
        ax2 = fig.add_subplot(122)
        if layer_rows:
            xs = range(len(layer_rows))
            ax2.bar([x - 0.27 for x in xs], [r["transformers_tok_s"] for r in layer_rows], 0.27, color="#7f7f7f",
                    label="transformers")
            ax2.bar(list(xs), [r["ours_f32_tok_s"] for r in layer_rows], 0.27, color="#1f77b4", label="ours f32")
            ax2.bar([x + 0.27 for x in xs], [r["ours_bf16_tok_s"] for r in layer_rows], 0.27, color="#17becf",
                    label="ours bf16")
            ax2.set_xticks(list(xs), [r["layer"].split(" (")[0].replace(" mamba-2 layer", "") for r in layer_rows],
                           fontsize=6)
            ax2.set_ylabel("tokens / s through one layer")
            ax2.set_title("7B-class layers, prefill", fontsize=8)
            ax2.legend(fontsize=6)

    write("real_size", args.out, result, plot, quick=quick)


if __name__ == "__main__":
    main()
