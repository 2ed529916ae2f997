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
