"""Every benchmark's ``--quick`` mode runs here, so the scripts cannot rot.

Each one runs in its own process on the shipped model, writes its JSON and PNG into a
temporary folder (never over the committed full results), and the JSON is checked for
the fields the README quotes. Wall-clock numbers are written, never asserted.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from oprm_rag import DEMO_MODEL

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(DEMO_MODEL, "model.safetensors").is_file(),
                       reason="the shipped demo model is missing: run `make train-demo-model-v2`"),
]


def _run(name: str, out: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / f"{name}_quick.json").read_text())
    assert data["quick"] is True and data["benchmark"] == name
    assert (out / f"{name}_quick.png").stat().st_size > 1000
    return data


def _finite(*xs: float) -> bool:
    return all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in xs)


def test_mamba1_scan_quick(tmp_path):
    data = _run("mamba1_scan", tmp_path)
    for row in data["rows"]:
        assert row["max_abs_logit_diff"] < 1e-3  # the fast scan is the same function
        assert _finite(row["transformers_tok_s"], row["ours_tok_s"], row["speedup"])


def test_decode_quick(tmp_path):
    data = _run("decode", tmp_path)
    rows = {(r["condition"], r["batch"]) for r in data["rows"]}
    assert rows == {("quiet", 1), ("quiet", 8), ("spin", 1), ("spin", 8)}  # the benchmark ran its competitor
    for row in data["rows"]:
        assert _finite(row["step_path_tok_s"], row["forward_per_token_tok_s"], row["speedup"],
                       row["step_path_tok_per_cpu_s"])


def test_follow_up_quick(tmp_path):
    data = _run("follow_up", tmp_path)
    assert [c["cache_tier"] for c in data["cases"]] == ["memory", "disk"]
    for case in data["cases"]:
        assert case["same_answer"] is True  # the cached follow-up answers exactly as from scratch
        assert case["follow_up_cached_chunks"] == case["chunks"]  # every chunk state came from the cache
        assert _finite(case["speedup"], case["token_bound"])


def test_oprm_vs_plain_quick(tmp_path):
    data = _run("oprm_vs_plain", tmp_path)
    assert _finite(data["ratio"], data["plain_prefill_seconds"], data["oprm_select_seconds"])


def test_memory_quick(tmp_path):
    data = _run("memory", tmp_path)
    assert [r["tokens"] > 0 for r in data["rows"]] == [True, True]
    assert data["rows"][1]["chunks"] > data["rows"][0]["chunks"]
    assert _finite(*(r["ratio_to_smallest"] for r in data["rows"]))


def test_associative_recall_quick(tmp_path):
    data = _run("associative_recall", tmp_path)
    assert data["rows"] and all(0.0 <= v <= 1.0 for r in data["rows"] for k, v in r.items()
                                if k.startswith(("plain", "oprm")))
    # every source is its own row, next to the pooled one
    assert {r["source"] for r in data["rows"]} == set(data["sources"]) | {"all"}
    fp = data["false_positives"]["all"]
    assert fp["key_free_pairs"] > 0 and set(data["false_positives"]["by_source"]) == set(data["sources"])
    # the per-source and per-count tallies are partitions of the pooled one
    for axis in ("by_source", "by_facts"):
        parts = data["false_positives"][axis].values()
        assert sum(p["key_free_pairs"] for p in parts) == fp["key_free_pairs"]
        assert sum(p["paper"]["kept"] for p in parts) == fp["paper"]["kept"]


def test_document_bootstrap_is_wider_than_the_binomial_interval_when_documents_differ():
    from benchmarks.associative_recall import clopper_pearson, document_bootstrap

    # 40 documents of 100 key-free pairs: half keep 1, half keep 19 (pooled rate 0.10)
    per_doc = [(100, {"paper": 1 if i % 2 else 19}) for i in range(40)]
    lo, hi = document_bootstrap(per_doc, "paper")
    blo, bhi = clopper_pearson(400, 4000)
    assert lo < 0.1 < hi and hi - lo > 1.5 * (bhi - blo)
    # identical documents: no spread between documents, a degenerate interval at the rate
    assert document_bootstrap([(50, {"paper": 5})] * 10, "paper") == (0.1, 0.1)


def test_clopper_pearson_interval_is_exact():
    from benchmarks.associative_recall import clopper_pearson

    lo, hi = clopper_pearson(0, 5000)
    assert lo == 0.0 and abs(hi - (1 - 0.025 ** (1 / 5000))) < 1e-6  # the closed form at k = 0
    lo, hi = clopper_pearson(10, 100)
    assert abs(lo - 0.0490) < 5e-4 and abs(hi - 0.1762) < 5e-4  # textbook values


def test_state_collapse_quick(tmp_path):
    data = _run("state_collapse", tmp_path)
    curves = data["loss_by_position"]
    assert curves and all(math.isfinite(x) for curve in curves.values() for x in curve)
    assert all(0.0 <= a <= 1.0 for accs in data["recall"].values() for a in accs)


def test_peers_quick(tmp_path):
    data = _run("peers", tmp_path)
    assert set(data["results"]) == {"llm_rerank", "question_perplexity", "oprm_cold", "oprm"}
    for row in data["results"].values():
        assert 0.0 <= row["hit_rate"] <= 1.0 and _finite(row["seconds_per_question"])


def test_handoff_quick(tmp_path):
    summary = _run("handoff", tmp_path)["summary"]
    # Every chat turn after a selection resumes from the selected state, and says so;
    # the resumed answer equals the one from a full prefill, and prefills fewer tokens.
    assert summary["hits"] == summary["questions"] > 0
    assert summary["all_same_answers"] is True
    assert summary["prefill_tokens_with"] < summary["prefill_tokens_without"]


def test_served_quick(tmp_path):
    data = _run("served", tmp_path)
    assert data["selection_agreement_exact"] >= 0.95  # served and in-process pick the same chunks
    tokens = data["evaluated_tokens"]
    assert tokens["no_cache_prompt"]["server_reported"] and tokens["cache_prompt"]["server_reported"]
    # without the prompt cache the server evaluates every token it is sent
    assert tokens["no_cache_prompt"]["first"]["evaluated_tokens"] == tokens["no_cache_prompt"]["first"]["prompt_tokens"]


def test_exactness_quick(tmp_path):
    data = _run("exactness", tmp_path)
    families = {r["class"] for r in data["rows"]}
    assert {"MambaForCausalLM", "FalconMambaForCausalLM", "Mamba2ForCausalLM", "RwkvForCausalLM",
            "RecurrentGemmaForCausalLM"} <= families
    assert data["worst"] < 1e-4


def test_rwkv67_follow_up_quick(tmp_path):
    data = _run("rwkv67_follow_up", tmp_path)
    assert [r["family"] for r in data["families"]] == ["rwkv6", "rwkv7"]
    for row in data["families"]:
        assert row["same_answer_as_uncached"] is True and row["cached_chunks"] == row["chunks"]
        assert row["follow_up_embedded_fraction_of_doc"] < 0.5  # the document is not embedded again
        assert _finite(row["speedup_vs_first"], row["speedup_vs_uncached"], row["state_bytes_per_chunk"])


def test_hybrid_follow_up_quick(tmp_path):
    from oprm_rag.testing import CACHE_FAMILIES

    data = _run("hybrid_follow_up", tmp_path)
    assert [r["family"] for r in data["families"]] == list(CACHE_FAMILIES)
    for row in data["families"]:
        assert row["backend"] == "CacheBackend" and row["cached_chunks"] == row["chunks"]
        assert row["same_answer_as_replay"] is True  # the cached follow-up answers as the replay does
        assert row["follow_up_embedded_fraction_of_doc"] < 0.5  # the document is not embedded again
        assert _finite(row["speedup_vs_first"], row["speedup_vs_replay"], row["state_bytes_per_chunk"])


def test_real_size_quick(tmp_path):
    data = _run("real_size", tmp_path)
    assert data["parameters"] > 1e6 and data["chunks"] >= 2
    for rows in (data["ours_f32"], data["ours_bf16"]):
        for row in rows.values():
            assert _finite(row["plain_prefill_tok_s"], row["oprm_select_tok_s"], row["decode_tok_s"])
    assert _finite(data["transformers_forward_tok_s"], data["ratios"]["plain_prefill_vs_transformers"])
    peer = data["llama_cpp"]
    if "skipped" in peer:  # never a made-up peer: the reason names the missing binary
        assert "llama-server" in peer["skipped"]
    else:
        assert all(_finite(r["prompt_tok_s"], r["decode_tok_s"]) for r in peer["by_threads"].values())
        assert _finite(data["ratios"]["oprm_select_vs_llama_prompt"], data["ratios"]["decode_vs_llama_decode"])
    assert all(_finite(b["read_GB_s"], b["copy_GB_s"]) for b in data["bandwidth"].values())
    assert data["bf16"]["vs_f32"]["this_model"]["max_entropy_error_nats"] >= 0.0
    assert [r["family"] for r in data["layers_7b"]] == ["falcon_mamba", "mamba2"]
