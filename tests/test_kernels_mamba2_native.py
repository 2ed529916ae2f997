"""The Mamba-2 scan and decode-step products in C, and bf16 projections, against the plain paths.

Each fast path is checked against the textbook one: the C scan against the step-by-step
recurrence (and the chunked torch scan), the C matrix-vector product against
``F.linear``, a model run with bf16 projections against the same model in float32 (the
tolerance is the one measured for bf16 rounding, not the exact paths' 1e-4), the decode
step against the forward pass.
"""

import os
import time

import pytest
import torch
import torch.nn.functional as F

from oprm_rag.kernels.ssd import CPU_CHUNK, SSDParams, discretise_dt, ssd_reference, ssd_scan


def _native():
    from oprm_rag.kernels import native

    if native.library() is None:
        pytest.skip(f"native kernels unavailable here: {native.BUILD_ERROR}")
    return native


def _inputs(b=2, t=45, h=4, p=20, g=2, n=12, seed=3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, h, p, generator=gen)
    dt = discretise_dt(torch.randn(b, t, h, generator=gen), torch.randn(h, generator=gen), (0.0, float("inf")))
    A = -torch.rand(h, generator=gen) * 3
    # B and C as views of one wider projection (time stride larger than g * n), as the backend passes them
    wide = torch.randn(b, t, 5 + 2 * g * n, generator=gen)
    B, C = wide[..., 5:5 + g * n], wide[..., 5 + g * n:]
    h0 = torch.randn(b, h, p, n, generator=gen)
    return x, dt, A, B, C, h0


@pytest.mark.parametrize("t,g", [(1, 1), (7, 2), (45, 4), (130, 1)])
def test_native_mamba2_scan_matches_the_recurrence(t, g):
    native = _native()
    x, dt, A, B, C, h0 = _inputs(t=t, g=g)
    b, _, heads, p = x.shape
    n = h0.shape[-1]
    h = h0.clone()
    y = native.mamba2_scan_tm(x.reshape(b, t, heads * p), dt, A, B, C, h)
    y_ref, h_ref = ssd_reference(x, dt, A, B.reshape(b, t, g, n), C.reshape(b, t, g, n), h0)
    assert torch.allclose(y.view(b, t, heads, p), y_ref, atol=1e-4)
    assert torch.allclose(h, h_ref, atol=1e-4)
    # p = 20 is not a multiple of the 16 rows a unit takes: the last block is partial, still exact


def test_native_mamba2_scan_mitigation_scales_and_pads():
    native = _native()
    x, dt, A, B, C, h0 = _inputs(t=12, g=2)
    dt = dt.clone()
    dt[0, :5] = 0.0  # row 0: five pads (a zero step keeps the state exactly, also with alpha < 1)
    params = SSDParams(alpha_scale=0.95, b_scale=0.8)
    b, t, heads, p = x.shape
    h = h0.clone()
    y = native.mamba2_scan_tm(x.reshape(b, t, -1), dt, A, B, C, h, params.alpha_scale, params.b_scale)
    y_ref, h_ref = ssd_reference(x, dt, A, B.reshape(b, t, 2, -1), C.reshape(b, t, 2, -1), h0, params)
    assert torch.allclose(y.view_as(y_ref), y_ref, atol=1e-4) and torch.allclose(h, h_ref, atol=1e-4)


def test_native_mamba2_scan_rejects_mismatched_shapes():
    native = _native()
    x, dt, A, B, C, h0 = _inputs(t=5)
    with pytest.raises(ValueError, match="do not fit"):
        native.mamba2_scan_tm(x.reshape(2, 5, -1)[:, :, :-1], dt, A, B, C, h0.clone())
    with pytest.raises(ValueError, match="contiguous float32"):
        native.mamba2_scan_tm(x.reshape(2, 5, -1), dt, A, B, C, h0.transpose(-1, -2))


@pytest.mark.parametrize("chunk", [CPU_CHUNK, 256])
def test_chunked_scan_at_real_head_sizes_matches_the_recurrence(chunk):
    """A 130M-shaped head (p 64, n 128) over several chunks: the in-place decay form stays exact."""
    gen = torch.Generator().manual_seed(0)
    b, t, h, p, n = 1, 300, 2, 64, 128
    x = torch.randn(b, t, h, p, generator=gen)
    dt = discretise_dt(torch.randn(b, t, h, generator=gen) - 2, torch.zeros(h), (0.0, float("inf")))
    A = -torch.rand(h, generator=gen) * 8 - 1
    B, C = torch.randn(b, t, 1, n, generator=gen) / 11, torch.randn(b, t, 1, n, generator=gen) / 11
    h0 = torch.randn(b, h, p, n, generator=gen)
    y, hf = ssd_scan(x, dt, A, B, C, h0, chunk_size=chunk)
    y_ref, h_ref = ssd_reference(x, dt, A, B, C, h0)
    assert torch.allclose(y, y_ref, atol=1e-4) and torch.allclose(hf, h_ref, atol=1e-4)


@pytest.mark.parametrize("rows,k,batch", [(37, 24, 1), (300, 96, 3), (5, 7, 2)])
def test_step_linear_matches_f_linear(rows, k, batch):
    native = _native()
    gen = torch.Generator().manual_seed(1)
    w, bias, x = torch.randn(rows, k, generator=gen), torch.randn(rows, generator=gen), torch.randn(batch, k, generator=gen)
    out = native.StepLinear(native.library(), w, bias, threads=2)(x)
    assert torch.allclose(out, F.linear(x, w, bias), atol=1e-5)
    lin16 = native.StepLinear(native.library(), w, None, torch.bfloat16, threads=2)
    assert lin16.bf16 == (k % 2 == 0)  # an odd k cannot be read in pairs: float32 kept, exact
    w16 = w.bfloat16().float() if lin16.bf16 else w  # the widened bf16 weights, float32 arithmetic
    assert torch.allclose(lin16(x), F.linear(x, w16), atol=1e-4)
    many = torch.randn(20, k, generator=gen)  # over the kernel's batch: F.linear on the same weights
    assert torch.allclose(lin16(many), F.linear(many, w16), atol=1e-4)


@pytest.mark.parametrize("threads", [2, 3, 5])
def test_step_linear_on_the_c_pool_matches_f_linear_from_concurrent_callers(threads):
    """Products big enough to be split over the C thread pool (rows not a multiple of the
    4-row blocks), from several Python threads at once: one of them holds the pool, the
    others run alone; every caller gets its own exact result."""
    import threading

    native = _native()
    gen = torch.Generator().manual_seed(threads)
    w, bias = torch.randn(1027, 256, generator=gen), torch.randn(1027, generator=gen)
    lin = native.StepLinear(native.library(), w, bias, threads=threads)
    lin16 = native.StepLinear(native.library(), w, None, torch.bfloat16, threads=threads)
    xs = [torch.randn(1 + i % 3, 256, generator=gen) for i in range(6)]
    w16 = w.bfloat16().float()
    failures: list[str] = []

    def caller(i: int) -> None:
        for _ in range(20):
            if not torch.allclose(lin(xs[i]), F.linear(xs[i], w, bias), atol=1e-4):
                failures.append(f"float32, caller {i}")
            if not torch.allclose(lin16(xs[i]), F.linear(xs[i], w16), atol=1e-3):
                failures.append(f"bf16, caller {i}")

    workers = [threading.Thread(target=caller, args=(i,)) for i in range(len(xs))]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in workers), "the C pool deadlocked"
    assert not failures, failures


def test_matmul_dtype_resolves_by_hardware(monkeypatch):
    from oprm_rag.kernels import precision

    cpu = torch.device("cpu")
    assert precision.resolve_matmul_dtype(None, cpu, torch.float32).exact
    assert precision.resolve_matmul_dtype("float32", cpu, torch.float32).exact
    both = precision.resolve_matmul_dtype("bfloat16", cpu, torch.float32)
    assert both.prefill is torch.bfloat16 and both.step is torch.bfloat16
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: {"amx": False, "avx512_bf16": False})
    assert precision.resolve_matmul_dtype("auto", cpu, torch.float32).exact  # no bf16 hardware: float32
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: {"amx": False, "avx512_bf16": True})
    auto = precision.resolve_matmul_dtype("auto", cpu, torch.float32)
    assert auto.prefill is None and auto.step is torch.bfloat16  # no AMX: bf16 products do not pay
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: {"amx": True, "avx512_bf16": True})
    assert precision.resolve_matmul_dtype("auto", cpu, torch.float32).prefill is torch.bfloat16
    assert precision.resolve_matmul_dtype("bfloat16", cpu, torch.bfloat16).exact  # a bf16 model is as loaded
    with pytest.raises(ValueError, match="matmul_dtype"):
        precision.resolve_matmul_dtype("int4", cpu, torch.float32)


@pytest.fixture()
def mamba2_lm(model_dir):
    from oprm_rag import RecurrentLM

    return RecurrentLM.from_pretrained(model_dir("mamba2"), device="cpu", dtype=torch.float32)


def test_bf16_projections_stay_close_to_float32_and_the_step_path_agrees(mamba2_lm):
    ids = torch.tensor([[5, 17, 42, 9, 100, 3, 77, 12, 8, 61]])
    ref = mamba2_lm.backend.forward(ids, all_logits=True)
    try:
        assert mamba2_lm.backend.set_matmul_dtype("bfloat16").prefill is torch.bfloat16
        out = mamba2_lm.backend.forward(ids, all_logits=True)
        lp, lp_ref = out.logits.log_softmax(-1), ref.logits.log_softmax(-1)
        scale = ref.logits.abs().max().item()  # the test model's logits are sharpened 8x: errors scale with them
        err = (lp - lp_ref).abs().max().item()
        assert 0.0 < err < 0.02 * scale  # bf16 rounding moves log-probs (measured 0.8% of the scale)
        # the decode step (bf16 weights, float32 activations) follows the bf16 forward pass
        state = mamba2_lm.backend.forward(ids[:, :6]).state
        session = mamba2_lm.backend.session(state)
        for j in range(6, 10):
            step_logits = session.step(ids[:, j:j + 1])
            step_err = (step_logits.log_softmax(-1) - lp_ref[:, j]).abs().max().item()
            assert step_err < 0.02 * scale
    finally:
        mamba2_lm.backend.set_matmul_dtype(None)
    again = mamba2_lm.backend.forward(ids, all_logits=True)
    assert torch.equal(again.logits, ref.logits)  # back to float32: exactly the plain path


def test_native_scan_in_the_backend_equals_the_torch_scan(mamba2_lm, monkeypatch):
    from oprm_rag.kernels import native

    _native()
    ids = torch.randint(3, 300, (2, 40), generator=torch.Generator().manual_seed(2))
    fast = mamba2_lm.backend.forward(ids, all_logits=True)
    monkeypatch.setattr(native, "mamba2_scan_tm", lambda *a, **k: None)  # the torch chunked scan
    slow = mamba2_lm.backend.forward(ids, all_logits=True)
    assert torch.allclose(fast.logits, slow.logits, atol=1e-4)
    for key, value in fast.state.tensors.items():
        assert torch.allclose(value.float(), slow.state.tensors[key].float(), atol=1e-4), key


@pytest.mark.parametrize("group_size", [40, 80])
def test_native_gated_norm_matches_transformers_norm(group_size):
    from transformers.models.mamba2.modeling_mamba2 import MambaRMSNormGated

    native = _native()
    gen = torch.Generator().manual_seed(5)
    b, t, heads, p = 2, 9, 4, 20
    norm = MambaRMSNormGated(heads * p, group_size=group_size, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(heads * p, generator=gen))
    y = torch.randn(b, t, heads, p, generator=gen)
    wide = torch.randn(b, t, 3 * heads * p, generator=gen)  # x and z as views of one projection
    x, z = wide[..., :heads * p], wide[..., 2 * heads * p:]
    D = torch.randn(heads, generator=gen)
    ref = norm((y + x.view(b, t, heads, p) * D[:, None]).reshape(b, t, -1), z)
    out = native.gated_norm_tm(y.clone(), x, z, D, norm.weight, heads * p // group_size, 1e-5)
    assert torch.allclose(out.reshape(b, t, -1), ref, atol=1e-5)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_c_pool_works_in_a_forked_child():
    """A forked child has none of the parent's pool threads: it starts a pool of its own
    instead of waiting on workers that do not exist there."""
    native = _native()
    w, x = torch.randn(1027, 256), torch.randn(1, 256)
    lin = native.StepLinear(native.library(), w, None, threads=2)
    lin(x)  # the parent's pool exists now
    expected = F.linear(x, w)  # here: torch's own OpenMP threads are not fork-safe
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only when the split product is right
        ok = bool((lin(x) - expected).abs().max() < 1e-4)
        os._exit(0 if ok else 1)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            assert code == 0, f"the child exited with {code}"
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    pytest.fail("the forked child's product hung on the parent's pool")
