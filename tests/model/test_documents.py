"""Packed documents (seq_idx): a packed row == its documents run alone, in the scan, the mixers and
the whole model (logits and gradients); cu_seqlens round trip; input checks; the -100-ignoring loss."""

import pytest
import torch
import torch.nn.functional as F

from hybridlm.model.documents import (check_seq_idx, cu_seqlens_from_seq_idx, document_causal_mask,
                                      document_starts, same_document_as_previous, seq_idx_from_cu_seqlens)
from hybridlm.model.mamba2 import DocumentConv, Mamba2Mixer
from hybridlm.model.ssd import ssd_chunked, ssd_sequential

from helpers import small_config, small_model
from test_ssd import make_inputs

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes: no OpenMP barrier stalls on a loaded CPU

# Two rows of 23 tokens. With chunk 4: row 0 has a length-1 document, documents straddling chunk
# ends and one starting exactly at a chunk boundary (4); row 1 starts documents at 8 (a boundary),
# 9, 10 and ends with one spanning several chunks.
ROWS = ([3, 1, 5, 4, 8, 2], [8, 1, 1, 13])


def packed_seq_idx(rows) -> torch.Tensor:
    return torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in rows])


def spans(lengths):
    offsets = torch.tensor([0, *lengths]).cumsum(0).tolist()
    return [slice(a, b) for a, b in zip(offsets[:-1], offsets[1:])]


@pytest.mark.parametrize("chunk", [4, 1, 32])
def test_chunked_scan_with_seq_idx_equals_documents_alone(chunk):
    t = make_inputs(2, 23, 4, 3, 2, 5)
    seq_idx = packed_seq_idx(ROWS)
    y, final = ssd_chunked(chunk_size=chunk, seq_idx=seq_idx, **t)
    y_seq, final_seq = ssd_sequential(seq_idx=seq_idx, **t)
    assert (y - y_seq).abs().max() < 1e-10 and (final - final_seq).abs().max() < 1e-10
    for row, lengths in enumerate(ROWS):
        for d, span in enumerate(spans(lengths)):
            alone = {k: v[row:row + 1, span] for k, v in t.items() if k in ("x", "dt", "B", "C")}
            init = t["initial_state"][row:row + 1] if d == 0 else None  # the row's state starts document 0 only
            y_doc, final_doc = ssd_sequential(A=t["A"], D=t["D"], initial_state=init, **alone)
            assert (y[row:row + 1, span] - y_doc).abs().max() < 1e-10, (row, d)
        assert (final[row] - final_doc[0]).abs().max() < 1e-10  # the last document's state


@pytest.mark.parametrize("kernel", [1, 2, 6])
def test_mamba_conv_window_stops_at_document_starts(kernel):
    """The causal conv (any width, here wider than some documents) + scan of packed rows."""
    torch.manual_seed(0)
    mixer = Mamba2Mixer(small_config(conv_kernel=kernel, chunk_size=4, conv_bias=True)).double()
    u = torch.randn(2, 23, mixer.cfg.d_model, dtype=torch.float64)
    out = mixer(u, seq_idx=packed_seq_idx(ROWS))
    for row, lengths in enumerate(ROWS):
        for span in spans(lengths):
            assert (out[row, span] - mixer(u[row:row + 1, span])[0]).abs().max() < 1e-10


def test_document_conv_gradients():
    """DocumentConv's hand-written backward (it recomputes the shifted inputs) == finite differences."""
    seq_idx = torch.tensor([[0, 0, 0, 1, 2, 2, 2], [0, 0, 0, 0, 0, 3, 3]])
    keeps = torch.stack([same_document_as_previous(seq_idx, s) for s in (1, 2)])  # kernel width 3
    x = torch.randn(2, 7, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: DocumentConv.apply(x, w, keeps), (x, weight))


@pytest.mark.parametrize("softcap", [0.0, 30.0])
def test_packed_model_equals_documents_alone_logits_and_gradients(softcap):
    """M, * and - layers, conv 4, chunk 4 (documents cross chunks); softcap takes the explicit path."""
    model = small_model(seed=1, pattern="M*-M", chunk_size=4, conv_kernel=4, attn_logit_softcap=softcap)
    model = model.double().train()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (2, 23), generator=gen)
    weights = torch.randn(2, 23, 97, generator=gen, dtype=torch.float64)  # a loss summed over tokens
    params = [p for _, p in model.named_parameters()]

    logits = model(ids, seq_idx=packed_seq_idx(ROWS))
    grads = torch.autograd.grad((logits * weights).sum(), params)
    alone_loss = 0.0
    for row, lengths in enumerate(ROWS):
        for span in spans(lengths):
            alone = model(ids[row:row + 1, span])
            assert (logits[row:row + 1, span] - alone).abs().max() < 1e-10
            alone_loss = alone_loss + (alone * weights[row:row + 1, span]).sum()
    grads_alone = torch.autograd.grad(alone_loss, params)
    for (name, _), got, want in zip(model.named_parameters(), grads, grads_alone):
        assert (got - want).abs().max() < 1e-10 * max(1.0, want.abs().max().item()), name


def test_one_document_per_row_equals_no_seq_idx():
    model = small_model(seed=2)
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(2))
    seq_idx = torch.tensor([[0] * 11, [7] * 11])
    with torch.no_grad():
        assert torch.equal(model(ids, seq_idx=seq_idx), model(ids))


def test_attention_mask_is_block_diagonal_causal():
    seq_idx = torch.tensor([[0, 0, 1, 1, 1, 3]])
    mask = document_causal_mask(seq_idx)[0, 0]
    for q in range(6):
        for k in range(6):
            assert bool(mask[q, k]) == (k <= q and int(seq_idx[0, q]) == int(seq_idx[0, k]))


def test_cu_seqlens_round_trip():
    lengths = [3, 1, 5, 4, 8, 2]
    cu = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0).to(torch.int32)
    seq_idx = seq_idx_from_cu_seqlens(cu, 23)
    assert torch.equal(seq_idx, packed_seq_idx([lengths]))
    assert torch.equal(cu_seqlens_from_seq_idx(seq_idx), cu)
    # two rows flatten row after row (varlen): each row's first token starts a document
    both = packed_seq_idx(ROWS)
    starts = [0, 3, 4, 9, 13, 21, 23, 31, 32, 33]
    assert cu_seqlens_from_seq_idx(both).tolist() == starts + [46]
    assert document_starts(both).reshape(-1).nonzero().squeeze(-1).tolist() == starts
    with pytest.raises(ValueError, match="cu_seqlens"):
        seq_idx_from_cu_seqlens(torch.tensor([0, 5, 3], dtype=torch.int32), 3)
    with pytest.raises(ValueError, match="cu_seqlens"):
        seq_idx_from_cu_seqlens(cu, 24)


def test_bad_seq_idx_is_refused():
    model = small_model()
    ids = torch.randint(0, 97, (1, 6))
    for bad, match in [(torch.tensor([[0, 0, 1, 0, 1, 1]]), "non-decreasing"),
                       (torch.zeros(1, 5, dtype=torch.long), "shape"),
                       (torch.zeros(1, 6), "integer")]:
        with pytest.raises(ValueError, match=match):
            model(ids, seq_idx=bad)
        with pytest.raises(ValueError, match=match):
            check_seq_idx(bad, ids)
    ok = torch.tensor([[0, 0, 1, 1, 2, 2]])
    with pytest.raises(ValueError, match="training"):
        model(ids, model.new_cache(1), seq_idx=ok)
    with pytest.raises(ValueError, match="training"):
        model(ids, attention_mask=torch.ones(1, 6, dtype=torch.bool), seq_idx=ok)


def test_loss_ignores_minus_100_targets():
    model = small_model(seed=4).train()
    gen = torch.Generator().manual_seed(4)
    ids, targets = torch.randint(0, 97, (2, 9), generator=gen), torch.randint(0, 97, (2, 9), generator=gen)
    targets[0, 3:5] = -100
    targets[1, -1] = -100
    seq_idx = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1, 2, 2]])
    loss = model.loss(ids, targets, seq_idx)
    logp = torch.log_softmax(model(ids, seq_idx=seq_idx).double(), -1)
    scored = targets != -100
    want = -logp[scored].gather(-1, targets[scored][:, None]).mean()
    assert abs(loss.item() - want.item()) < 1e-5

    nothing = torch.full_like(targets, -100)
    zero = model.loss(ids, nothing, seq_idx)
    assert zero.item() == 0.0
    zero.backward()
    assert all(p.grad is not None and not p.grad.isnan().any() and not p.grad.any() for p in model.parameters())
    assert F.cross_entropy(torch.zeros(1, 3), torch.tensor([-100])).isnan()  # what the plain mean would give


def triton_scan_inputs(shape, device="cpu"):
    gen = torch.Generator().manual_seed(sum(shape))
    b, l, h, p, g, n = shape
    t = dict(x=torch.randn(b, l, h, p, generator=gen), dt=torch.rand(b, l, h, generator=gen) * 0.5 + 0.01,
             A=-torch.rand(h, generator=gen) * 2 - 0.1, B=torch.randn(b, l, g, n, generator=gen),
             C=torch.randn(b, l, g, n, generator=gen), D=torch.randn(h, generator=gen),
             initial_state=torch.randn(b, h, p, n, generator=gen))
    return {k: v.to(device).requires_grad_() for k, v in t.items()}


def scan_and_grads(fn, t, chunk, seq_idx):
    y, final = fn(chunk_size=chunk, seq_idx=seq_idx, **t)
    gen = torch.Generator().manual_seed(0)
    loss = (y * torch.randn(y.shape, generator=gen).to(y)).sum() + (final * torch.randn(final.shape, generator=gen)
                                                                    .to(final)).sum()
    return y, final, torch.autograd.grad(loss, list(t.values()))


def test_triton_kernels_with_seq_idx_equal_the_reference():
    """The Triton kernels' document masking (Triton's interpreter on CPU) == ssd_chunked, forward and gradients."""
    pytest.importorskip("triton")
    from hybridlm.model.ssd_triton import ssd_triton
    t = triton_scan_inputs((2, 23, 2, 16, 1, 16))
    seq_idx = packed_seq_idx(ROWS)
    want, got = scan_and_grads(ssd_chunked, t, 8, seq_idx), scan_and_grads(ssd_triton, t, 8, seq_idx)
    assert (got[0] - want[0]).abs().max() < 1e-5 and (got[1] - want[1]).abs().max() < 1e-5
    for name, g, w in zip(t, got[2], want[2]):
        assert (g - w).abs().max() < 2e-6 * max(1.0, w.abs().max().item()), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_kernels_with_seq_idx_on_cuda_at_model_sizes():
    """Nemotron-H-like sizes (p 64, n 128, chunk 128), documents of 1 to 300 tokens, on the GPU."""
    pytest.importorskip("triton")
    from hybridlm.model.ssd_triton import ssd_triton
    lengths = [1, 127, 128, 300, 44]  # 600 tokens: starts inside chunks, at 128 (a boundary), a 1-token one
    t = triton_scan_inputs((2, 600, 8, 64, 2, 128), device="cuda")
    seq_idx = packed_seq_idx([lengths, lengths[::-1]]).cuda()
    want, got = scan_and_grads(ssd_chunked, t, 128, seq_idx), scan_and_grads(ssd_triton, t, 128, seq_idx)
    assert (got[0] - want[0]).abs().max() < 1e-3 and (got[1] - want[1]).abs().max() < 1e-3
    for g, w in zip(got[2], want[2]):
        assert (g - w).abs().max() < 1e-3 * max(1.0, w.abs().max().item())
