"""Document state cache: exact answers from cached states, a safe disk tier, threads."""

import logging
import subprocess
import sys
import threading
import textwrap

import pytest

from oprm_rag import OPRMSelector
from oprm_rag.storage.cache import DocumentStateCache
from oprm_rag import resolve

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
    assert got.usage.cached_chunks == len(got.chunks)


def test_a_new_process_reads_the_states_written_by_another(model_dir, load_lm, tmp_path):
    path = model_dir("mamba2")
    script = textwrap.dedent(f"""
        from oprm_rag import RecurrentLM, OPRMSelector
        from oprm_rag.storage.cache import DocumentStateCache
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


# ====================================================================== issue 16: hardening
import errno
import json
import os
import struct
import time

import torch

from oprm_rag.errors import InputError, StateFormatError
from oprm_rag.state import RecurrentState

KEY_A, KEY_B = "a" * 64, "b" * 64


def _states(rows, width=8, fill=None):
    """A synthetic batch of states: row r holds ``fill[r]`` (default: its index) everywhere."""
    fill = list(range(len(rows))) if fill is None else fill
    vals = torch.tensor([float(f) for f in fill])
    return RecurrentState("mamba", {
        "position": torch.tensor([int(f) for f in fill], dtype=torch.long),
        "ssm.0": vals[:, None, None].expand(len(rows), 4, width).contiguous(),
        "conv.0": vals[:, None].to(torch.bfloat16).expand(len(rows), 3).contiguous(),
    })


def _write_entry(cache, key, n=6, width=8, batches=((0, 1, 2), (5, 3), (4,)), meta=None):
    """Write an n-chunk synthetic entry through open_writer, batches in any order."""
    claim = cache.claim(key, "model-x")
    assert claim.status == "own"
    spans = [(i * 10, i * 10 + 10) for i in range(n)]
    with cache.open_writer(key, "model-x", spans, meta or {"chunking": "test"}) as w:
        for idx in batches:
            w.add(list(idx), _states(idx, width, fill=list(idx)), torch.tensor([[float(i)] * 5 for i in idx]))
        kept = w.commit()
    return kept, spans


# ---------------------------------------------------------------- the entry writer
def test_entry_writer_streams_rows_in_any_order_and_reads_them_back(tmp_path):
    cache = DocumentStateCache(max_bytes=0, directory=tmp_path)  # nothing in memory: disk only
    kept, spans = _write_entry(cache, KEY_A)
    assert kept and len(cache) == 0
    reader = DocumentStateCache(max_bytes=0, directory=tmp_path)
    claim = reader.claim(KEY_A, "model-x")
    assert claim.status == "hit" and reader.stats()["disk_hits"] == 1
    entry = claim.entry
    assert entry.spans == spans and entry.n_chunks == 6
    states, logits = entry.rows([4, 1])
    assert states.positions == [4, 1] and states.tensors["conv.0"].dtype == torch.bfloat16
    assert torch.equal(states.tensors["ssm.0"][0], torch.full((4, 8), 4.0))
    assert torch.equal(logits, torch.tensor([[4.0] * 5, [1.0] * 5]))
    from safetensors import safe_open  # the file is a plain safetensors file

    with safe_open(str(cache._path(KEY_A)), framework="pt") as fh:
        assert torch.equal(fh.get_tensor("state.ssm.0")[5], torch.full((4, 8), 5.0))


def test_entry_writer_keeps_an_entry_that_fits_in_memory_within_the_budget(tmp_path):
    one = _states(range(6)).nbytes + 6 * 5 * 4
    cache = DocumentStateCache(max_bytes=int(one * 1.5), directory=tmp_path)
    assert _write_entry(cache, KEY_A)[0]
    assert cache.stats()["entries"] == 1 and cache.stats()["bytes"] == one
    states, _ = cache.claim(KEY_A, "model-x").entry.rows([2])
    assert states.positions == [2]
    _write_entry(cache, KEY_B)  # the budget holds one: the older is evicted before the new is built
    st = cache.stats()
    assert st["entries"] == 1 and st["evictions"] == 1 and st["bytes"] <= cache.max_bytes


def test_an_incomplete_or_aborted_entry_is_not_kept_and_waiters_are_released(tmp_path, caplog):
    cache = DocumentStateCache(directory=tmp_path)
    with caplog.at_level(logging.WARNING, logger="oprm_rag"):
        assert not _write_entry(cache, KEY_A, batches=((0, 1), (2,)))[0]
    assert "incomplete" in caplog.text and not [p for p in tmp_path.rglob("*") if p.is_file()]
    assert cache.claim(KEY_A, "model-x").status == "own"  # not kept, and the claim was released
    w = cache.open_writer(KEY_A, "model-x", [(0, 1)])
    waiter = cache.claim(KEY_A, "model-x")
    w.add(0, _states([0]))
    w.abort()
    assert waiter.event.is_set() and not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_a_row_changed_after_opening_is_detected_when_read(tmp_path):
    cache = DocumentStateCache(max_bytes=0, directory=tmp_path)
    _write_entry(cache, KEY_A)
    entry = DocumentStateCache(max_bytes=0, directory=tmp_path).claim(KEY_A, "model-x").entry
    path = cache._path(KEY_A)
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    start = 8 + n + header["state.ssm.0"]["data_offsets"][0] + 3 * 4 * 8 * 4  # row 3
    with open(path, "r+b") as fh:  # in place: the open entry sees it
        fh.seek(start)
        fh.write(b"\x00\x00\x80\x7f")
    assert entry.rows([2])[0].positions == [2]
    with pytest.raises(StateFormatError, match="row 3"):
        entry.rows([3])


# ---------------------------------------------------------------- a full disk never fails a question
@pytest.mark.parametrize("fault", ["enospc_at_allocation", "enospc_mid_write", "foreign_exception"])
def test_a_failed_cache_write_logs_a_warning_and_the_answer_goes_through(load_lm, tmp_path, caplog, monkeypatch,
                                                                           fault):
    import oprm_rag.storage.rowfile as io_utils

    lm = load_lm("mamba2")
    want = OPRMSelector(lm, chunk_tokens=32, cache=False).answer(Q1, DOC, max_new_tokens=4)
    if fault == "enospc_at_allocation":
        def fallocate(fd, offset, length):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(io_utils.os, "posix_fallocate", fallocate)
    else:
        real, calls = io_utils._write_all, []

        def write_all(fd, data, offset):
            calls.append(1)
            if len(calls) > 3:
                if fault == "foreign_exception":  # what safetensors' SafetensorError looks like: not an OSError
                    raise RuntimeError("Error while serializing: IoError(No space left on device)")
                raise OSError(errno.ENOSPC, "No space left on device")
            real(fd, data, offset)
        monkeypatch.setattr(io_utils, "_write_all", write_all)
    sel = OPRMSelector(lm, chunk_tokens=32, cache=DocumentStateCache(max_bytes=0, directory=tmp_path))
    with caplog.at_level(logging.WARNING, logger="oprm_rag"):
        got = sel.answer(Q1, DOC, max_new_tokens=4)
    assert got.text == want.text and _scores(got) == _scores(want)
    assert "the answer is not affected" in caplog.text or "dropped" in caplog.text
    assert sel.cache.stats()["write_errors"] >= 1
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # no partial file, no temp file


def test_a_real_file_size_limit_does_not_fail_the_question(model_dir, tmp_path):
    """A process-wide file size limit (RLIMIT_FSIZE): the write really fails in the kernel."""
    resource = pytest.importorskip("resource")
    path = model_dir("mamba2")
    script = textwrap.dedent(f"""
        import logging, resource, signal
        logging.basicConfig(level=logging.WARNING)
        from oprm_rag import RecurrentLM, OPRMSelector
        from oprm_rag.storage.cache import DocumentStateCache
        lm = RecurrentLM.from_pretrained({str(path)!r})
        want = OPRMSelector(lm, chunk_tokens=32, cache=False).answer({Q1!r}, {DOC!r}, max_new_tokens=4).text
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
        sel = OPRMSelector(lm, chunk_tokens=32, cache=DocumentStateCache(directory={str(tmp_path / "c")!r}))
        got = sel.answer({Q1!r}, {DOC!r}, max_new_tokens=4).text
        print("SAME" if got == want else "DIFFERENT")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "SAME"
    assert "WARNING" in out.stderr and "cache" in out.stderr
    assert not [p for p in (tmp_path / "c").rglob("*") if p.is_file()]


def test_put_never_raises_for_a_storage_failure(tmp_path, monkeypatch, caplog):
    import oprm_rag.storage.rowfile as io_utils

    def fallocate(fd, offset, length):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")
    monkeypatch.setattr(io_utils.os, "posix_fallocate", fallocate)
    cache = DocumentStateCache(directory=tmp_path)
    from oprm_rag.storage.cache import DocStates

    with caplog.at_level(logging.WARNING, logger="oprm_rag"):
        cache.put(KEY_A, DocStates(_states(range(3)), torch.zeros(3, 5), [(0, 1), (1, 2), (2, 3)]), "model-x")
    assert cache.claim(KEY_A, "model-x").status == "hit"  # the memory tier still has it
    assert "quota" in caplog.text and not [p for p in tmp_path.rglob("*") if p.is_file()]


# ---------------------------------------------------------------- orphans
def test_temp_files_of_killed_writers_are_removed_when_a_cache_opens(tmp_path):
    shard = tmp_path / "ab"
    shard.mkdir()
    old = shard / f".{'ab' + 'c' * 62}.safetensors.1a2b3c.tmp"
    fresh = shard / f".{'ab' + 'd' * 62}.safetensors.4d5e6f.tmp"
    user_file = shard / ".my-notes.tmp"
    outside = tmp_path.parent / f"outside-{tmp_path.name}.txt"
    outside.write_text("keep me")
    link = shard / f".{'ab' + 'e' * 62}.safetensors.777777.tmp"
    link.symlink_to(outside)
    for p in (old, fresh, user_file):
        p.write_bytes(b"partial")
    hours_ago = time.time() - 2 * 3600
    for p in (old, user_file):
        os.utime(p, (hours_ago, hours_ago))
    os.utime(link, (hours_ago, hours_ago), follow_symlinks=False)
    DocumentStateCache(directory=tmp_path)
    assert not old.exists()
    assert fresh.exists() and user_file.exists() and link.is_symlink() and outside.read_text() == "keep me"


# ---------------------------------------------------------------- clear() deletes only its own entries
def test_clear_deletes_only_entries_it_wrote_and_follows_no_links(load_lm, tmp_path):
    lm = load_lm("mamba2")
    cache_dir, elsewhere = tmp_path / "cache", tmp_path / "elsewhere"
    elsewhere.mkdir()
    sel = OPRMSelector(lm, chunk_tokens=32, cache=DocumentStateCache(directory=cache_dir))
    sel.prepare(DOC)
    (ours,) = list(cache_dir.glob("??/*.safetensors"))
    from safetensors.torch import save_file

    user_model = cache_dir / "model.safetensors"
    save_file({"w": torch.zeros(2)}, user_model)
    (cache_dir / "ab").mkdir(exist_ok=True)
    in_shard = cache_dir / "ab" / "model.safetensors"
    save_file({"w": torch.zeros(2)}, in_shard)
    lookalike = cache_dir / "ab" / f"{'ab' + 'f' * 62}.safetensors"  # right name, not our header
    save_file({"w": torch.zeros(2)}, lookalike, metadata={"format": "something-else"})
    mislabelled = cache_dir / "ab" / f"{'ab' + '1' * 62}.safetensors"  # our format, another key
    mislabelled.write_bytes(ours.read_bytes())
    victim = elsewhere / f"{'cd' + '2' * 62}.safetensors"  # a valid entry of ours, outside the cache
    victim.write_bytes(ours.read_bytes().replace(ours.stem.encode(), ("cd" + "2" * 62).encode()))
    (cache_dir / "cd").symlink_to(elsewhere, target_is_directory=True)
    target_file = elsewhere / "precious.safetensors"
    target_file.write_bytes(ours.read_bytes())
    shard = ours.parent
    (shard / f"{shard.name + '3' * 62}.safetensors").symlink_to(target_file)
    before = {p: p.read_bytes() for p in (user_model, in_shard, lookalike, mislabelled, victim, target_file)}
    removed = sel.cache.clear(disk=True)
    assert removed == 1 and not ours.exists()
    for p, data in before.items():
        assert p.read_bytes() == data, p
    assert (cache_dir / "cd").is_symlink() and (shard / f"{shard.name + '3' * 62}.safetensors").is_symlink()


# ---------------------------------------------------------------- planted links never redirect reads or writes
def test_a_symlinked_shard_folder_is_refused_for_writes(load_lm, tmp_path, caplog):
    lm = load_lm("mamba2")
    probe = OPRMSelector(lm, chunk_tokens=32, cache=DocumentStateCache(directory=tmp_path / "probe"))
    probe.prepare(DOC)
    (entry,) = list((tmp_path / "probe").glob("??/*.safetensors"))
    cache_dir, outside = tmp_path / "cache", tmp_path / "outside"
    cache_dir.mkdir()
    outside.mkdir()
    (cache_dir / entry.parent.name).symlink_to(outside, target_is_directory=True)
    sel = OPRMSelector(lm, chunk_tokens=32, cache=DocumentStateCache(directory=cache_dir))
    with caplog.at_level(logging.WARNING, logger="oprm_rag"):
        res = sel.select(Q1, DOC)
    assert list(outside.iterdir()) == []
    assert "symbolic link" in caplog.text and sel.cache.stats()["refused_links"] >= 1
    assert _scores(res) == _scores(probe.select(Q1, DOC))


def test_a_symlinked_entry_is_never_read_and_its_target_never_written(load_lm, tmp_path, caplog):
    lm = load_lm("mamba2")
    first = OPRMSelector(lm, chunk_tokens=32, cache=DocumentStateCache(directory=tmp_path / "a"))
    first.prepare(DOC)
    (entry,) = list((tmp_path / "a").glob("??/*.safetensors"))
    cache_dir = tmp_path / "b"
    (cache_dir / entry.parent.name).mkdir(parents=True)
    planted = cache_dir / entry.parent.name / entry.name
    planted.symlink_to(entry)  # a valid entry, reached through a link
    original = entry.read_bytes()
    sel = OPRMSelector(lm, chunk_tokens=32, cache=DocumentStateCache(directory=cache_dir))
    with caplog.at_level(logging.WARNING, logger="oprm_rag"):
        sel.select(Q1, DOC)
    st = sel.cache.stats()
    assert st["disk_hits"] == 0 and st["misses"] == 1 and st["refused_links"] == 1
    assert entry.read_bytes() == original  # the link's target was neither read as ours nor overwritten
    assert not planted.is_symlink() and planted.is_file()  # our own entry replaced the link, inside the folder


# ---------------------------------------------------------------- the cache folder option
def test_a_cache_directory_that_is_a_file_is_an_input_error(tmp_path):
    f = tmp_path / "cache.txt"
    f.write_text("not a folder")
    with pytest.raises(InputError, match="is a file, not a folder"):
        DocumentStateCache(directory=f)
    with pytest.raises(InputError, match="a part of that path is a file"):
        DocumentStateCache(directory=f / "sub")
    assert f.read_text() == "not a folder"


# ---------------------------------------------------------------- keyed checksums for shared folders
def _relabel(path, new_key, key=None):
    """What someone who can write the folder (but has no secret) can do: change an entry's
    key and recompute its plain checksum."""
    from oprm_rag.storage.rowfile import ENTRY_DIGEST_KEY, ROW_DIGESTS, _entry_digest

    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__")
    meta["key"] = new_key
    layout = {k: [v["dtype"], v["shape"], v["data_offsets"]] for k, v in header.items()}
    a, b = header[ROW_DIGESTS]["data_offsets"]
    meta[ENTRY_DIGEST_KEY] = _entry_digest(meta, layout, raw[8 + n + a:8 + n + b], key)
    body = json.dumps({"__metadata__": meta, **header}, separators=(",", ":")).encode()
    body += b" " * (n - len(body))
    assert len(body) == n
    return raw[:8] + body + raw[8 + n:]


def test_without_a_key_a_relabelled_entry_is_believed_the_documented_trust_boundary(tmp_path):
    cache = DocumentStateCache(max_bytes=0, directory=tmp_path)
    _write_entry(cache, KEY_A)
    forged = cache._path(KEY_B)
    forged.parent.mkdir(exist_ok=True)
    forged.write_bytes(_relabel(cache._path(KEY_A), KEY_B))
    assert DocumentStateCache(max_bytes=0, directory=tmp_path).claim(KEY_B, "model-x").status == "hit"


def test_with_a_key_relabelled_tampered_and_unkeyed_entries_are_rejected(tmp_path, monkeypatch):
    secret = "s3cret-shared-by-the-team"
    cache = DocumentStateCache(max_bytes=0, directory=tmp_path, hmac_key=secret)
    assert cache.keyed
    _write_entry(cache, KEY_A)
    assert DocumentStateCache(max_bytes=0, directory=tmp_path, hmac_key=secret).claim(KEY_A, "model-x").status == "hit"
    monkeypatch.setenv("OPRM_RAG_CACHE_KEY", secret)  # the same key from the environment
    assert DocumentStateCache(max_bytes=0, directory=tmp_path).claim(KEY_A, "model-x").status == "hit"
    monkeypatch.delenv("OPRM_RAG_CACHE_KEY")
    forged = cache._path(KEY_B)
    forged.parent.mkdir(exist_ok=True)
    cases = {
        "relabelled with a plain checksum": _relabel(cache._path(KEY_A), KEY_B),
        "relabelled under a guessed key": _relabel(cache._path(KEY_A), KEY_B, key=b"guess"),
    }
    for what, data in cases.items():
        forged.write_bytes(data)
        reader = DocumentStateCache(max_bytes=0, directory=tmp_path, hmac_key=secret)
        assert reader.claim(KEY_B, "model-x").status == "own", what
        assert reader.stats()["bad_files"] == 1 and not forged.exists(), what
    plain = DocumentStateCache(max_bytes=0, directory=tmp_path / "plain")
    _write_entry(plain, KEY_A)  # an entry written without the key
    keyed_reader = DocumentStateCache(max_bytes=0, directory=tmp_path / "plain", hmac_key=secret)
    assert keyed_reader.claim(KEY_A, "model-x").status == "own"
    other_key = DocumentStateCache(max_bytes=0, directory=tmp_path, hmac_key="another")
    assert other_key.claim(KEY_A, "model-x").status == "own" and other_key.stats()["bad_files"] == 1


# ---------------------------------------------------------------- memory stays bounded
_RSS_SCRIPT = r"""
import json, os, resource, sys, torch
torch.set_num_threads(1)
from oprm_rag.storage.cache import DocumentStateCache
from oprm_rag.state import RecurrentState

MiB = 2**20
n, batch, row_floats = int(sys.argv[2]), int(sys.argv[3]), 2**18  # 1 MiB per row
key = "c" * 64

def rows(idx):
    vals = torch.tensor([float(i) for i in idx])
    return RecurrentState("mamba", {"position": torch.tensor(idx, dtype=torch.long),
                                    "ssm.0": vals[:, None].expand(len(idx), row_floats).contiguous()})

def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB

rows([0] * batch); rows([0] * batch)  # warm the allocator
base = peak()
cache = DocumentStateCache(max_bytes=16 * MiB, directory=sys.argv[1])
assert cache.claim(key, "m").status == "own"
with cache.open_writer(key, "m", [(i, i + 1) for i in range(n)]) as w:
    for first in range(0, n, batch):
        idx = list(range(first, min(n, first + batch)))
        w.add(idx, rows(idx), torch.full((len(idx), 64), 1.0))
    assert w.commit() and w.on_disk and not w.in_memory
write_peak = peak() - base
reader = DocumentStateCache(max_bytes=16 * MiB, directory=sys.argv[1])
entry = reader.claim(key, "m").entry
ok = type(entry).__name__ == "DiskEntry"
for first in range(0, n, batch):
    idx = list(range(first, min(n, first + batch)))
    st, lg = entry.rows(idx)
    ok = ok and st.positions == idx and float(st.tensors["ssm.0"][-1, -1]) == idx[-1]
print(json.dumps({"entry_mib": n, "write_peak_mib": write_peak / MiB, "read_peak_mib": (peak() - base) / MiB,
                  "ok": ok}))
"""


def test_writing_and_reading_a_large_entry_keeps_memory_within_the_budget_plus_a_batch(tmp_path):
    """A 96 MiB entry, max_bytes=16 MiB, batches of 4 MiB: the process never grows by the entry."""
    pytest.importorskip("resource")
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(tmp_path), "96", "4"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["ok"]
    bound = 16 + 3 * 4 + 8  # the budget, a few batches in flight, allocator slack
    assert got["write_peak_mib"] < bound and got["read_peak_mib"] < bound, got


def test_the_models_shared_cache_can_be_replaced(load_lm, tmp_path):
    """``resolve(lm).use_document_cache`` swaps the cache every selector on the model shares."""
    from oprm_rag import OPRMSelector

    lm = load_lm("mamba2")
    before = resolve(lm).document_cache()
    try:
        cache = resolve(lm).use_document_cache(max_bytes=1 << 20, directory=tmp_path / "c")
        assert OPRMSelector(lm, chunk_tokens=32).cache is cache and cache is not before
        OPRMSelector(lm, chunk_tokens=32).select("What is the code of alpha?", "The code of alpha is 1234. " * 8)
        assert any((tmp_path / "c").rglob("*.safetensors"))
    finally:
        resolve(lm).use_document_cache(before)
