"""The Triton SSD kernels == the PyTorch reference `ssd_chunked`, forward and every gradient.

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1) on CPU tensors;
skipped when triton is not installed (`pip install -e ".[kernels]"`).
"""

import importlib

import pytest
import torch

from hybridlm.model.ssd import ssd_chunked

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def ssd_triton():
    """(Without CUDA, conftest.py has turned Triton's interpreter on before triton was imported.)"""
    return importlib.import_module("hybridlm.model.ssd_triton").ssd_triton


def inputs(b, l, h, p, g, n, seed, device="cpu", state=True):
    gen = torch.Generator().manual_seed(seed)
    t = dict(x=torch.randn(b, l, h, p, generator=gen), dt=torch.rand(b, l, h, generator=gen) * 0.5 + 0.01,
             A=-torch.rand(h, generator=gen) * 2 - 0.1, B=torch.randn(b, l, g, n, generator=gen),
             C=torch.randn(b, l, g, n, generator=gen), D=torch.randn(h, generator=gen))
    if state:
        t["initial_state"] = torch.randn(b, h, p, n, generator=gen)
    return {k: v.to(device).requires_grad_() for k, v in t.items()}


def run(fn, t, chunk):
    y, final = fn(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk, t["D"], t.get("initial_state"))
    weights = torch.randn_like(y), torch.randn_like(final)
    loss = (y * weights[0]).sum() + (final * weights[1]).sum()
    return y, final, torch.autograd.grad(loss, list(t.values()))


@pytest.mark.parametrize("shape,chunk,state", [
    ((2, 37, 4, 16, 2, 16), 16, True),   # a tail chunk with dt = 0 padding, 2 groups, initial state
    ((1, 16, 2, 8, 1, 12), 16, False),   # head dim and state size under the 16-wide tiles
    ((1, 5, 2, 16, 2, 16), 8, True),     # shorter than one chunk
])
def test_kernels_equal_the_reference(ssd_triton, shape, chunk, state):
    t = inputs(*shape, seed=sum(shape), state=state)
    torch.manual_seed(0)
    y_ref, final_ref, grads_ref = run(ssd_chunked, t, chunk)
    torch.manual_seed(0)
    y, final, grads = run(ssd_triton, t, chunk)
    assert (y - y_ref).abs().max() < 1e-5 and (final - final_ref).abs().max() < 1e-5
    for name, got, want in zip(t, grads, grads_ref):
        assert (got - want).abs().max() < 2e-6 * max(1.0, want.abs().max().item()), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernels_equal_the_reference_on_cuda_at_model_sizes(ssd_triton):
    """Nemotron-H-like head sizes (p 64, n 128, chunk 128) over 3 chunks and a tail, on the GPU."""
    t = inputs(2, 300, 8, 64, 2, 128, seed=1, device="cuda")
    torch.manual_seed(0)
    y_ref, final_ref, grads_ref = run(ssd_chunked, t, 128)
    torch.manual_seed(0)
    y, final, grads = run(ssd_triton, t, 128)
    assert (y - y_ref).abs().max() < 1e-3 and (final - final_ref).abs().max() < 1e-3
    for got, want in zip(grads, grads_ref):
        assert (got - want).abs().max() < 1e-3 * max(1.0, want.abs().max().item())
