"""SSD scan: chunked == sequential recurrence == the paper's quadratic (matrix) form."""

import pytest
import torch

from hybridlm.model.ssd import segsum, ssd_chunked, ssd_sequential, ssd_step


def make_inputs(b, l, h, p, g, n, dtype=torch.float64, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    t = dict(
        x=r(b, l, h, p),
        dt=torch.nn.functional.softplus(r(b, l, h) - 1.0),
        A=-(torch.rand(h, generator=gen, dtype=dtype) * 3 + 0.05),
        B=r(b, l, g, n),
        C=r(b, l, g, n),
        D=r(h),
        initial_state=r(b, h, p, n),
    )
    if requires_grad:
        for v in t.values():
            v.requires_grad_(True)
    return t


def ssd_matrix_form(x, dt, A, B, C, D, initial_state):
    """Mamba-2 paper, SSD as a (masked) matrix: y_t = sum_{s<=t} C_t.B_s exp(sum_{k=s+1}^t dt_k A) dt_s x_s."""
    b, l, h, p = x.shape
    r = h // B.shape[2]
    Bh, Ch = B.repeat_interleave(r, 2), C.repeat_interleave(r, 2)          # (b, l, h, n)
    cum = torch.cumsum(dt * A, dim=1)                                         # (b, l, h)
    diff = cum[:, :, None, :] - cum[:, None, :, :]                            # (b, t, s, h)
    causal = torch.ones(l, l, dtype=torch.bool).tril()[None, :, :, None]
    decay = torch.where(causal, torch.exp(diff.masked_fill(~causal, 0)), torch.zeros_like(diff))
    M = torch.einsum("bthn,bshn->btsh", Ch, Bh) * decay * dt[:, None, :, :]
    y = torch.einsum("btsh,bshp->bthp", M, x) + D[:, None] * x
    # the initial state decays into every position: C_t . (exp(cum_t) * S0)
    y = y + torch.einsum("bthn,bhpn,bth->bthp", Ch, initial_state, torch.exp(cum))
    return y


SHAPES = [  # (b, l, h, p, g, n, chunk)
    (2, 37, 4, 3, 2, 5, 8),      # odd length, 2 groups
    (1, 64, 6, 4, 3, 4, 16),     # exact multiple, 3 groups
    (2, 5, 2, 2, 1, 3, 8),       # shorter than one chunk
    (1, 100, 8, 8, 4, 16, 32),   # several chunks + tail
    (3, 1, 2, 2, 2, 2, 4),       # a single token
    (1, 33, 4, 2, 4, 3, 1),      # chunk of one step
]


@pytest.mark.parametrize("b,l,h,p,g,n,chunk", SHAPES)
def test_chunked_equals_sequential_float64(b, l, h, p, g, n, chunk):
    t = make_inputs(b, l, h, p, g, n)
    y_seq, s_seq = ssd_sequential(**t)
    y_chk, s_chk = ssd_chunked(chunk_size=chunk, **t)
    assert (y_seq - y_chk).abs().max() < 1e-10
    assert (s_seq - s_chk).abs().max() < 1e-10


@pytest.mark.parametrize("b,l,h,p,g,n,chunk", SHAPES[:4])
def test_both_scans_match_matrix_form(b, l, h, p, g, n, chunk):
    t = make_inputs(b, l, h, p, g, n, seed=1)
    y_ref = ssd_matrix_form(**t)
    assert (ssd_sequential(**t)[0] - y_ref).abs().max() < 1e-10
    assert (ssd_chunked(chunk_size=chunk, **t)[0] - y_ref).abs().max() < 1e-10


def test_no_initial_state_is_zero_state():
    t = make_inputs(2, 19, 4, 3, 2, 5)
    t_zero = dict(t, initial_state=torch.zeros_like(t["initial_state"]))
    t_none = dict(t, initial_state=None)
    assert torch.equal(ssd_chunked(chunk_size=8, **t_zero)[0], ssd_chunked(chunk_size=8, **t_none)[0])


@pytest.mark.parametrize("b,l,h,p,g,n,chunk", [(2, 23, 4, 3, 2, 5, 8), (1, 16, 2, 2, 1, 3, 4)])
def test_gradients_match(b, l, h, p, g, n, chunk):
    grads = []
    for fn in (ssd_sequential, lambda **k: ssd_chunked(chunk_size=chunk, **k)):
        t = make_inputs(b, l, h, p, g, n, requires_grad=True, seed=2)
        y, s = fn(**t)
        w = torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=y.dtype)
        ((y * w).sum() + s.square().sum()).backward()
        grads.append({k: v.grad for k, v in t.items()})
    for k in grads[0]:
        assert (grads[0][k] - grads[1][k]).abs().max() < 1e-10, k


def test_gradcheck_chunked():
    t = make_inputs(1, 7, 2, 2, 1, 2, requires_grad=True, seed=3)
    names = list(t)
    fn = lambda *args: ssd_chunked(chunk_size=3, **dict(zip(names, args))) # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(t.values()), eps=1e-6, atol=1e-8)


def test_step_continues_a_chunked_prefix():
    t = make_inputs(2, 30, 4, 3, 2, 5, seed=4)
    y_all, s_all = ssd_chunked(chunk_size=8, **t)
    head = {k: (v[:, :29] if v.dim() > 1 and k != "initial_state" else v) for k, v in t.items()}
    _, s = ssd_chunked(chunk_size=8, **head)
    y_last, s_last = ssd_step(s, t["x"][:, 29], t["dt"][:, 29], t["A"], t["B"][:, 29], t["C"][:, 29], t["D"])
    assert (y_last - y_all[:, 29]).abs().max() < 1e-10
    assert (s_last - s_all).abs().max() < 1e-10


def test_low_precision_inputs_compute_in_float32():
    t = make_inputs(1, 40, 4, 8, 2, 8, dtype=torch.float32, seed=5)
    y32, _ = ssd_chunked(chunk_size=16, **t)
    bf = {k: v.to(torch.bfloat16) for k, v in t.items()}
    ybf, state = ssd_chunked(chunk_size=16, **bf)
    assert ybf.dtype == torch.bfloat16 and state.dtype == torch.float32
    assert ((ybf.float() - y32).abs().max() / y32.abs().max()) < 0.05


def test_segsum_definition():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    s = segsum(a)
    for i in range(4):
        for j in range(4):
            expected = a[j + 1:i + 1].sum() if i >= j else float("-inf")
            assert s[i, j] == expected


def test_bad_group_count():
    t = make_inputs(1, 4, 3, 2, 2, 2)
    with pytest.raises(ValueError, match="divisible by groups"):
        ssd_chunked(chunk_size=2, **t)
