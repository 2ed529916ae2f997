"""Our scans against the textbook step-by-step recurrences."""

import pytest
import torch

from oprm_rag.kernels.selective_scan import selective_scan, selective_scan_reference
from oprm_rag.kernels.ssd import SSDParams, discretise_dt, ssd_reference, ssd_scan


def _mamba1_inputs(b=2, d=6, t=37, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, t, generator=g)
    dt = torch.randn(b, d, t, generator=g)
    A = -torch.rand(d, n, generator=g) * 4
    B = torch.randn(b, t, n, generator=g)
    C = torch.randn(b, t, n, generator=g)
    D = torch.randn(d, generator=g)
    z = torch.randn(b, d, t, generator=g)
    bias = torch.randn(d, generator=g)
    h0 = torch.randn(b, d, n, generator=g)
    return x, dt, A, B, C, D, z, bias, h0


@pytest.mark.parametrize("t", [1, 5, 37, 130])
def test_selective_scan_matches_recurrence_from_a_state(t):
    args = _mamba1_inputs(t=t)
    y, h = selective_scan(*args)
    y_ref, h_ref = selective_scan_reference(*args)
    assert torch.allclose(y, y_ref, atol=1e-5)
    assert torch.allclose(h, h_ref, atol=1e-5)


def test_selective_scan_split_equals_whole():
    x, dt, A, B, C, D, z, bias, h0 = _mamba1_inputs(t=40)
    y, h = selective_scan(x, dt, A, B, C, D, z, bias, h0)
    y1, h1 = selective_scan(x[..., :17], dt[..., :17], A, B[:, :17], C[:, :17], D, z[..., :17], bias, h0)
    y2, h2 = selective_scan(x[..., 17:], dt[..., 17:], A, B[:, 17:], C[:, 17:], D, z[..., 17:], bias, h1)
    assert torch.allclose(torch.cat([y1, y2], -1), y, atol=1e-5)
    assert torch.allclose(h2, h, atol=1e-5)


def test_selective_scan_mask_keeps_state_through_pads():
    x, dt, A, B, C, D, z, bias, h0 = _mamba1_inputs(t=10)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[:, :4] = False
    _, h_masked = selective_scan(x * mask[:, None], dt, A, B, C, D, z, bias, h0, mask=mask)
    _, h_tail = selective_scan(x[..., 4:], dt[..., 4:], A, B[:, 4:], C[:, 4:], D, z[..., 4:], bias, h0)
    assert torch.allclose(h_masked, h_tail, atol=1e-6)


def _ssd_inputs(b=2, t=45, h=4, p=3, g=2, n=5, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, h, p, generator=gen)
    dt = discretise_dt(torch.randn(b, t, h, generator=gen), torch.randn(h, generator=gen), (0.0, float("inf")))
    A = -torch.rand(h, generator=gen) * 3
    B = torch.randn(b, t, g, n, generator=gen)
    C = torch.randn(b, t, g, n, generator=gen)
    h0 = torch.randn(b, h, p, n, generator=gen)
    return x, dt, A, B, C, h0


@pytest.mark.parametrize("chunk", [1, 4, 16, 64])
@pytest.mark.parametrize("t", [1, 7, 45])
def test_ssd_chunked_matches_recurrence(chunk, t):
    x, dt, A, B, C, h0 = _ssd_inputs(t=t)
    y, h = ssd_scan(x, dt, A, B, C, h0, chunk_size=chunk)
    y_ref, h_ref = ssd_reference(x, dt, A, B, C, h0)
    assert torch.allclose(y, y_ref, atol=1e-4)
    assert torch.allclose(h, h_ref, atol=1e-4)


def test_ssd_mitigation_scales_match_recurrence():
    x, dt, A, B, C, h0 = _ssd_inputs()
    params = SSDParams(alpha_scale=0.97, b_scale=0.75)
    y, h = ssd_scan(x, dt, A, B, C, h0, chunk_size=8, params=params)
    y_ref, h_ref = ssd_reference(x, dt, A, B, C, h0, params)
    assert torch.allclose(y, y_ref, atol=1e-4) and torch.allclose(h, h_ref, atol=1e-4)
    y_plain, _ = ssd_scan(x, dt, A, B, C, h0, chunk_size=8)
    assert not torch.allclose(y, y_plain, atol=1e-3)  # the option does change the model


def test_ssd_normalised_state_has_unit_norm():
    x, dt, A, B, C, h0 = _ssd_inputs()
    _, h = ssd_scan(x, dt, A, B, C, h0, params=SSDParams(normalize_state=True))
    norms = h.flatten(2).norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


@pytest.mark.parametrize("window", [1, 3, 8, 30])
def test_window_equals_a_plain_run_over_the_last_r_tokens(window):
    from oprm_rag.kernels.ssd import ssd_window_scan

    x, dt, A, B, C, _ = _ssd_inputs(t=26)
    y, _ = ssd_window_scan(x, dt, A, B, C, window, block=5)
    zero = torch.zeros(2, 4, 3, 5)
    for t in range(26):
        lo = max(0, t - window + 1)
        ref, _ = ssd_scan(x[:, lo:t + 1], dt[:, lo:t + 1], A, B[:, lo:t + 1], C[:, lo:t + 1], zero, chunk_size=4)
        assert torch.allclose(y[:, t], ref[:, -1], atol=1e-4), t


def test_window_at_infinity_is_the_plain_scan_and_history_continues():
    from oprm_rag.kernels.ssd import ssd_window_scan

    x, dt, A, B, C, _ = _ssd_inputs(t=30)
    zero = torch.zeros(2, 4, 3, 5)
    plain, _ = ssd_scan(x, dt, A, B, C, zero, chunk_size=8)
    y, _ = ssd_window_scan(x, dt, A, B, C, 10**4, block=7)
    assert torch.allclose(y, plain, atol=1e-4)
    # pieces with carried history equal the whole
    whole, _ = ssd_window_scan(x, dt, A, B, C, 9)
    y1, hist = ssd_window_scan(x[:, :11], dt[:, :11], A, B[:, :11], C[:, :11], 9)
    y2, _ = ssd_window_scan(x[:, 11:], dt[:, 11:], A, B[:, 11:], C[:, 11:], 9, history=hist)
    assert torch.allclose(torch.cat([y1, y2], 1), whole, atol=1e-5)


# ---------------------------------------------------------------------- short inputs (no padding to a chunk)
@pytest.mark.parametrize("t,chunk,expected", [(1, 64, 1), (13, 64, 13), (31, 64, 31), (64, 64, 64), (65, 64, 33),
                                              (100, 64, 50), (130, 64, 44), (4096, 64, 64)])
def test_chunk_length_never_pads_a_short_input(t, chunk, expected):
    from oprm_rag.kernels.ssd import chunk_length

    assert chunk_length(t, chunk) == expected
    length = chunk_length(t, chunk)
    assert length <= chunk and (-t) % length < -(-t // chunk)  # less padding than one token per chunk


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("t", [2, 13, 31, 65, 100])
def test_ssd_short_and_balanced_chunks_match_recurrence(t, groups):
    x, dt, A, B, C, h0 = _ssd_inputs(t=t, g=groups)
    y, h = ssd_scan(x, dt, A, B, C, h0, chunk_size=64)
    y_ref, h_ref = ssd_reference(x, dt, A, B, C, h0)
    assert torch.allclose(y, y_ref, atol=1e-4) and torch.allclose(h, h_ref, atol=1e-4)


def test_ssd_short_input_with_pads_and_mitigation_keeps_state_through_pads():
    x, dt, A, B, C, h0 = _ssd_inputs(t=12)
    dt = dt.clone()
    dt[0, :5] = 0.0  # row 0: five left pads (a zero step is a no-op)
    params = SSDParams(alpha_scale=0.95, b_scale=0.8)
    y, h = ssd_scan(x, dt, A, B, C, h0, chunk_size=64, params=params)
    y_ref, h_ref = ssd_reference(x, dt, A, B, C, h0, params)
    assert torch.allclose(y, y_ref, atol=1e-4) and torch.allclose(h, h_ref, atol=1e-4)
    alone, h_alone = ssd_scan(x[:1, 5:], dt[:1, 5:], A, B[:1, 5:], C[:1, 5:], h0[:1], chunk_size=64, params=params)
    assert torch.allclose(h[:1], h_alone, atol=1e-4) and torch.allclose(y[:1, 5:], alone, atol=1e-4)


# ---------------------------------------------------------------------- native C kernels (and their fallback)
def _native():
    from oprm_rag.kernels import native

    if native.library() is None:
        pytest.skip(f"native kernels unavailable here: {native.BUILD_ERROR}")
    return native


def test_native_kernels_build_where_a_compiler_exists():
    """`make install` builds them; with a C compiler on the machine they must load."""
    import shutil

    from oprm_rag.kernels import native

    if not native.enabled() or not any(shutil.which(c) for c in ("cc", "gcc", "clang")):
        pytest.skip("no C compiler (or OPRM_NATIVE=0): the torch kernels are used")
    assert native.library() is not None, native.BUILD_ERROR


def test_a_fresh_build_compiles_and_loads(tmp_path, monkeypatch):
    """What `make install` does on a fresh machine: compile the C file into an empty folder."""
    import ctypes
    import shutil

    from oprm_rag.kernels import native

    if not any(shutil.which(c) for c in ("cc", "gcc", "clang")):
        pytest.skip("no C compiler here: the torch kernels are used")
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")  # the first candidate cannot be created: the next one is used
    monkeypatch.setattr(native, "_candidate_dirs", lambda: [blocked / "build", tmp_path])
    path = native.build(force=True)
    assert path.parent == tmp_path and path.stat().st_size > 0
    lib = native._bind(ctypes.CDLL(str(path)))
    x = torch.linspace(-5.0, 5.0, 101)
    out = torch.empty_like(x)
    lib.oprm_exp(x.numel(), x.data_ptr(), out.data_ptr())
    assert torch.allclose(out, torch.exp(x), rtol=1e-6)


def test_native_exp_and_softplus_match_torch():
    native = _native()
    x = torch.cat([torch.linspace(-87.0, 88.0, 20001), torch.tensor([0.0, -1e-7, 1e-7])])
    ref = torch.exp(x.double())
    assert ((native.native_exp(x).double() - ref).abs() / ref).max().item() < 3e-7
    s = torch.cat([torch.linspace(-80.0, 80.0, 20001), torch.tensor([19.999, 20.0, 20.001, 0.0])])
    sref = torch.nn.functional.softplus(s.double())
    assert ((native.native_softplus(s).double() - sref).abs() / sref).max().item() < 3e-7


def _tm_case(b=3, d=21, t=9, n=5, seed=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, d, generator=g)
    dt_raw = torch.randn(b, t, d, generator=g)
    A = -torch.rand(d, n, generator=g) * 4
    wide = torch.randn(b, t, 3 + 2 * n, generator=g)  # B and C as views of a wider projection
    B, C = wide[..., 3:3 + n], wide[..., 3 + n:]
    D = torch.randn(d, generator=g)
    zx = torch.randn(b, t, 2 * d, generator=g)
    z = zx[..., d:]  # a view with time stride 2d
    bias = torch.randn(d, generator=g)
    h0 = torch.randn(b, d, n, generator=g)
    return x, dt_raw, A, B, C, D, z, bias, h0


@pytest.mark.parametrize("t", [1, 9, 40])
@pytest.mark.parametrize("pads", [None, [0, 3, 1]])
def test_native_time_major_scan_matches_the_recurrence(t, pads):
    """Partial channel blocks (d = 21), strided views, fused softplus, pads, in-place state."""
    from oprm_rag.kernels.selective_scan import selective_scan_reference, selective_scan_time_major

    _native()
    x, dt_raw, A, B, C, D, z, bias, h0 = _tm_case(t=t)
    pad_left = None if pads is None else torch.tensor([min(p, t - 1) for p in pads])
    if pad_left is not None:
        keep = torch.arange(t)[None, :] >= pad_left[:, None]
        x = x * keep[..., None]
    y, h = selective_scan_time_major(x, dt_raw, A, B, C, D, z, bias, h0, pad_left=pad_left)
    y_torch, h_torch = selective_scan_time_major(x, dt_raw, A, B, C, D, z, bias, h0, pad_left=pad_left, native=False)
    assert torch.allclose(y, y_torch, atol=1e-5) and torch.allclose(h, h_torch, atol=1e-5)
    for r in range(3):  # each row alone, from its first real token, in the textbook recurrence
        p = 0 if pad_left is None else int(pad_left[r])
        sl = slice(p, t)
        y_ref, h_ref = selective_scan_reference(x[r:r + 1, sl].transpose(1, 2), dt_raw[r:r + 1, sl].transpose(1, 2), A,
                                                B[r:r + 1, sl], C[r:r + 1, sl], D, z[r:r + 1, sl].transpose(1, 2),
                                                bias, h0[r:r + 1])
        assert torch.allclose(y[r:r + 1, sl], y_ref.transpose(1, 2), atol=1e-5)
        assert torch.allclose(h[r:r + 1], h_ref, atol=1e-5)
        assert y[r, :p].abs().max().item() == 0.0 if p else True
    owned = h0.clone()
    selective_scan_time_major(x, dt_raw, A, B, C, D, z, bias, owned, pad_left=pad_left, in_place=True)
    assert torch.allclose(owned, h, atol=1e-6)


@pytest.mark.parametrize("K", [2, 4])
@pytest.mark.parametrize("t", [1, 2, 9, 70])  # 70: units of 32 tokens, the last one partial
@pytest.mark.parametrize("silu", [True, False])
def test_native_conv_matches_conv1d_with_pads_and_state(K, t, silu):
    from oprm_rag.backends.base import shifted_conv_input

    native = _native()
    g = torch.Generator().manual_seed(K * 10 + t)
    b, d = 3, 21
    x = torch.randn(b, t, 2 * d, generator=g)[..., :d]  # a view, as the in_proj split gives
    state = torch.randn(b, d, K - 1, generator=g)
    w, bias = torch.randn(d, K, generator=g), torch.randn(d, generator=g)
    for pad_left in (None, torch.tensor([0, min(2, t - 1), t - 1]), torch.tensor([min(40, t - 1), 0, 1 % t])):
        out, new_state = native.causal_conv_tm(x, state, w, bias, pad_left, silu=silu, threads=2)
        xc = x.transpose(1, 2)
        if pad_left is not None:
            keep = torch.arange(t)[None, :] >= pad_left[:, None]
            xc = xc * keep[:, None, :]
        conv_in = shifted_conv_input(state, xc, pad_left)
        ref = torch.nn.functional.conv1d(conv_in, w[:, None, :], bias, groups=d)
        ref = (torch.nn.functional.silu(ref) if silu else ref).transpose(1, 2)
        if pad_left is not None:
            ref = ref * keep[..., None]
        assert torch.allclose(out, ref, atol=1e-5)
        assert torch.allclose(new_state, conv_in[..., -(K - 1):], atol=0)


def test_parallel_rows_cover_every_row_once():
    from oprm_rag.kernels.native import parallel_rows

    seen = []
    parallel_rows(1000, lambda a, b: seen.append((a, b)), threads=3, work_per_row=1 << 20)
    assert sorted(seen)[0][0] == 0 and sorted(seen)[-1][1] == 1000 and len(seen) == 3
    assert sum(b - a for a, b in seen) == 1000
    small = []
    parallel_rows(1000, lambda a, b: small.append((a, b)), threads=3, work_per_row=1)
    assert small == [(0, 1000)]  # too little work to split


def test_without_the_native_kernels_everything_falls_back_to_torch(load_lm, monkeypatch):
    """No compiler: the library is None (once, with the reason) and the backends give the
    same results through torch."""
    from oprm_rag.kernels import native

    lm = load_lm("mamba")
    ids = torch.randint(2, 300, (2, 19), generator=torch.Generator().manual_seed(9))
    pads = torch.tensor([0, 4])
    with_native = lm.backend.forward(ids, pad_left=pads, all_logits=True)
    monkeypatch.setattr(native, "_lib", False)
    monkeypatch.setattr(native, "BUILD_ERROR", None)
    monkeypatch.setattr(native, "_compiler", lambda: None)
    monkeypatch.setattr(native, "_candidate_dirs", lambda: [])
    assert native.library() is None and "no C compiler" in native.BUILD_ERROR
    without = lm.backend.forward(ids, pad_left=pads, all_logits=True)
    assert (with_native.logits - without.logits).abs().max().item() < 1e-4
    assert with_native.state.same_as(without.state, atol=1e-5)
    monkeypatch.setattr(native, "_lib", False)  # the next test loads the real library again


def test_native_kernels_can_be_turned_off(monkeypatch):
    from oprm_rag.kernels import native

    monkeypatch.setenv("OPRM_NATIVE", "0")
    assert not native.enabled() and native.library() is None
