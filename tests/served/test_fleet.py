"""A fleet: two real llama.cpp ``llama-server`` replicas behind a real nginx on 127.0.0.1.

What a deployment that scales out relies on, proven end to end with the shipped model:

* the fleet selects the same chunks and gives the same answers as one server;
* the rows of one question spread over the replicas (counted from nginx's access log);
* a replica killed in the middle of a question costs nothing but time: the requests it
  held come back 502 from nginx, the client's retries reach the live replica, and every
  selection and answer is still the one-server one.

Small on purpose (2 cores): the 2.6 MB demo model, one thread and two slots per replica,
three questions.
"""

from __future__ import annotations

import os
import random
import signal
import threading
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import pytest

import oprm_rag
from oprm_rag import OPRMSelector
from oprm_rag.demo.recall_task import build_document, heldout_prose, question_for
from oprm_rag.served import OpenAICompatibleLM
from oprm_rag.served.llama_server import LlamaServer

from .balancer import Nginx, find_nginx
from .conftest import _missing, _need_llama_server

CHUNK = 128
NEW_TOKENS = 6


def _cases() -> list[tuple[str, str]]:
    rng = random.Random(11)
    doc = build_document(rng, heldout_prose(), 6, 3000)
    return [(question_for(f.key), doc.text) for f in doc.facts[:3]]


def _replicas(gguf: Path, n: int = 2) -> list[LlamaServer]:
    binary = _need_llama_server()
    return [LlamaServer(gguf, alias="oprm-demo", slots=2, slot_context=512, threads=1, binary=binary).start()
            for _ in range(n)]


def _addr(srv: LlamaServer) -> str:
    return f"127.0.0.1:{srv.port}"


@pytest.fixture(scope="module")
def fleet(demo_gguf: Path) -> Iterator[tuple[list[LlamaServer], Nginx]]:
    if find_nginx() is None:
        _missing("nginx (Debian's package)")
    replicas = _replicas(demo_gguf)
    try:
        with Nginx([_addr(r) for r in replicas]) as lb:
            yield replicas, lb
    finally:
        for r in replicas:
            r.stop()


@pytest.fixture(scope="module")
def reference(fleet) -> list[tuple[int, str, list[float]]]:
    """The one-server run: straight to the first replica, no balancer."""
    with _engine(fleet[0][0].base_url) as one:
        return _run(one, _cases())


def _engine(base_url: str, **kw: Any) -> OpenAICompatibleLM:
    return OpenAICompatibleLM(base_url, "oprm-demo", tokenizer=oprm_rag.DEMO_MODEL, max_concurrency=4, **kw)


def _run(lm: OpenAICompatibleLM, cases: list[tuple[str, str]]) -> list[tuple[int, str, list[float]]]:
    sel = OPRMSelector(lm, chunk_tokens=CHUNK)
    out = []
    for question, doc in cases:
        ans = sel.answer(question, doc, max_new_tokens=NEW_TOKENS)
        assert ans.chunk is not None
        out.append((ans.chunk.chunk.index, ans.text, [c.entropy for c in ans.chunks]))
    return out


def _same(got: list[tuple[int, str, list[float]]], ref: list[tuple[int, str, list[float]]]) -> None:
    for (chunk, text, ent), (rchunk, rtext, rent) in zip(got, ref, strict=True):
        assert (chunk, text) == (rchunk, rtext)
        assert max(abs(a - b) for a, b in zip(ent, rent, strict=True)) < 1e-3  # f32 server numerics


def test_fleet_selects_and_answers_as_one_server_and_spreads_the_rows(fleet, reference) -> None:
    replicas, lb = fleet
    cases = _cases()
    before = len(lb.hops())
    with _engine(lb.base_url) as lm:
        sel = OPRMSelector(lm, chunk_tokens=CHUNK)
        res = sel.select(*cases[0])
        rows = len(res.chunks)
        hops = [h for h in lb.hops()[before:] if h.path == "/v1/completions"]
        per_replica = Counter(h.upstreams[-1] for h in hops)
        print(f"\nrows of one question per replica: {dict(per_replica)}")
        assert len(hops) == rows > 4
        assert set(per_replica) == {_addr(r) for r in replicas}, per_replica  # both replicas scored rows
        assert min(per_replica.values()) >= rows // 4, per_replica
        _same(_run(lm, cases), reference)
    assert all(h.status == 200 for h in lb.hops())


@pytest.mark.parametrize("tries", [1, 0], ids=["client-retries", "nginx-fails-over"])
def test_a_replica_killed_mid_question_costs_nothing_but_time(demo_gguf: Path, reference, tries: int) -> None:
    """Replica B is frozen (SIGSTOP) as the questions start, so nginx hands it requests
    that hang; then it is killed (SIGKILL). With ``proxy_next_upstream_tries 1`` nginx
    answers those requests 502 and every retry is the client's: the access log must show
    the 502s, so the test knows the client's retry path ran. With nginx's default (no
    limit) nginx re-sends what it can itself (a request on a dropped keep-alive connection,
    a refused connection) and the client retries the rest. Either way nginx marks B failed,
    the retries reach A, and the answers are the one-server answers."""
    cases = _cases()[:2]
    a, b = _replicas(demo_gguf)
    try:
        with Nginx([_addr(a), _addr(b)], tries=tries) as lb, _engine(lb.base_url, max_retries=3, timeout=60) as lm:
            lm.client.info()  # the model list, before the freeze
            assert b.process is not None
            pid = b.process.pid
            os.kill(pid, signal.SIGSTOP)
            killer = threading.Timer(1.5, os.kill, (pid, signal.SIGKILL))
            killer.start()
            try:
                got = _run(lm, cases)
            finally:
                killer.cancel()
                if b.process.poll() is None:
                    os.kill(pid, signal.SIGKILL)
            _same(got, reference[:2])
            hops = lb.hops()
            failed = [i for i, h in enumerate(hops) if h.status == 502 or "502" in h.upstream_status]
            assert failed, "no request was caught on the frozen replica: the failover path did not run"
            print(f"\ntries={tries}: {len(failed)} requests failed on the killed replica "
                  f"({sum(hops[i].status == 502 for i in failed)} answered 502, retried by the client); "
                  f"{len(hops)} requests in all")
            assert all(hops[i].upstreams[0] == _addr(b) for i in failed)
            if tries == 1:
                assert all(hops[i].status == 502 for i in failed)  # each one retried by the client
    finally:
        a.stop()
        b.stop()
