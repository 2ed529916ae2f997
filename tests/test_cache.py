"""Document state cache: exact answers from cached states, a safe disk tier, threads."""

import logging
import subprocess
import sys
import threading
import textwrap

import pytest

from oprm_rag import OPRMSelector
from oprm_rag.cache import DocumentStateCache

DOC = ("The code of alpha is 1234. Mamba models keep a fixed size state. " * 8
       + "OPRM splits the context into chunks. The code of beta is 5678. " * 5)
Q1, Q2 = "What is the code of alpha?", "What is the code of beta?"


def _scores(res):
    return [(c.token_start, round(c.entropy, 5), c.top_token_id) for c in res.chunks]


@pytest.mark.parametrize("family", ["mamba", "falcon_mamba", "mamba2", "rwkv", "recurrent_gemma"])
def test_disk_round_trip_gives_the_same_answer(load_lm, family, tmp_path):
    lm = load_lm(family)
    fresh = OPRMSelector(lm, chunk_tokens=32, cache=False)
    want = fresh.answer(Q2, DOC, max_new_tokens=4)
    writer = OPRMSelector(lm, chunk_tokens=32, cache=DocumentStateCache(directory=tmp_path))
    writer.select(Q1, DOC)
    files = list(tmp_path.glob("*/*.safetensors"))
    assert len(files) == 1
    reader = OPRMSelector(lm, chunk_tokens=32, cache=DocumentStateCache(directory=tmp_path))
    got = reader.answer(Q2, DOC, max_new_tokens=4)
    assert reader.cache.stats()["disk_hits"] == 1 and reader.cache.stats()["misses"] == 0
    assert got.text == want.text and _scores(got) == _scores(want)
    assert got.usage["cached_chunks"] == len(got.chunks)


def test_a_new_process_reads_the_states_written_by_another(model_dir, load_lm, tmp_path):
    path = model_dir("mamba2")
    script = textwrap.dedent(f"""
        from oprm_rag import RecurrentLM, OPRMSelector
        from oprm_rag.cache import DocumentStateCache
        lm = RecurrentLM.from_pretrained({str(path)!r})
        sel = OPRMSelector(lm, chunk_tokens=32, cache=DocumentStateCache(directory={str(tmp_path)!r}))
        print(sel.prepare({DOC!r}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert int(out.stdout.strip().splitlines()[-1]) > 3
    lm = load_lm("mamba2")
    sel = OPRMSelector(lm, chunk_tokens=32, cache=DocumentStateCache(directory=tmp_path))
    res = sel.select(Q1, DOC)
    assert sel.cache.stats()["disk_hits"] == 1
    assert _scores(res) == _scores(OPRMSelector(lm, chunk_tokens=32, cache=False).select(Q1, DOC))


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "other_key"])
def test_bad_files_are_logged_dropped_and_recomputed(load_lm, tmp_path, caplog, damage):
    lm = load_lm("mamba")
    OPRMSelector(lm, chunk_tokens=32, cache=DocumentStateCache(directory=tmp_path)).prepare(DOC)
    (f,) = list(tmp_path.glob("*/*.safetensors"))
    raw = bytearray(f.read_bytes())
    if damage == "flip":
        raw[-3] ^= 0x55
        f.write_bytes(bytes(raw))
    elif damage == "truncate":
        f.write_bytes(bytes(raw[: len(raw) * 2 // 3]))
    elif damage == "garbage":
        f.write_bytes(b"not a safetensors file at all")
    else:  # a valid file of another document, moved under this key
        other = OPRMSelector(lm, chunk_tokens=32, cache=DocumentStateCache(directory=tmp_path / "o"))
        other.prepare("A different document entirely, with other words in it.")
        (g,) = list((tmp_path / "o").glob("*/*.safetensors"))
        f.write_bytes(g.read_bytes())
    sel = OPRMSelector(lm, chunk_tokens=32, cache=DocumentStateCache(directory=tmp_path))
    with caplog.at_level(logging.WARNING, logger="oprm_rag"):
        res = sel.select(Q1, DOC)
    assert sel.cache.stats()["bad_files"] == 1 and sel.cache.stats()["misses"] == 1
    assert "dropping bad cache file" in caplog.text
    assert _scores(res) == _scores(OPRMSelector(lm, chunk_tokens=32, cache=False).select(Q1, DOC))
    assert len(list(tmp_path.glob("??/*.safetensors"))) == 1  # rewritten, healthy


def test_memory_budget_evicts_least_recently_used(load_lm):
    lm = load_lm("mamba")
    probe = OPRMSelector(lm, chunk_tokens=32, cache=DocumentStateCache())
    probe.prepare(DOC)
    one = probe.cache.stats()["bytes"]
    cache = DocumentStateCache(max_bytes=int(one * 2.5))
    sel = OPRMSelector(lm, chunk_tokens=32, cache=cache)
    docs = [DOC + f" Variant {i}." for i in range(4)]
    for d in docs:
        sel.prepare(d)
    st = cache.stats()
    assert st["entries"] == 2 and st["evictions"] == 2 and st["bytes"] <= cache.max_bytes
    before = cache.stats()["hits"]
    sel.select(Q1, docs[-1])
    assert cache.stats()["hits"] == before + 1
    sel.select(Q1, docs[0])  # evicted: recomputed
    assert cache.stats()["misses"] == st["misses"] + 1


def test_keys_never_become_paths_unhashed(tmp_path):
    cache = DocumentStateCache(directory=tmp_path)
    for key in ["../../etc/passwd", "a" * 63 + "/", "A" * 64]:
        with pytest.raises(ValueError):
            cache._path(key)


def test_two_threads_prefill_a_new_document_once(load_lm):
    lm = load_lm("mamba2")
    sel = OPRMSelector(lm, chunk_tokens=32, cache=DocumentStateCache())
    doc = DOC + " Threads."
    barrier = threading.Barrier(2)
    results, errors = {}, []

    def ask(name, q):
        try:
            barrier.wait()
            results[name] = sel.select(q, doc)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    before = lm.counters["prefill_tokens"]
    threads = [threading.Thread(target=ask, args=(n, q)) for n, q in (("a", Q1), ("b", Q2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    st = sel.cache.stats()
    assert st["misses"] == 1 and st["hits"] == 1
    chunk_tokens = sum(c.token_end - c.token_start for c in results["a"].chunks)
    q_tokens = sum(len(sel._question_ids(q)) * len(results["a"].chunks) for q in (Q1, Q2))
    assert lm.counters["prefill_tokens"] - before == chunk_tokens + q_tokens
    assert _scores(results["a"]) == _scores(OPRMSelector(lm, chunk_tokens=32, cache=False).select(Q1, doc))


def test_documents_too_big_for_the_budget_are_streamed_not_kept(load_lm):
    lm = load_lm("mamba")
    cache = DocumentStateCache(max_bytes=10_000)
    sel = OPRMSelector(lm, chunk_tokens=32, cache=cache)
    res = sel.select(Q1, DOC)
    assert cache.stats()["entries"] == 0 and cache.stats()["misses"] == 0 and len(res.chunks) > 3
