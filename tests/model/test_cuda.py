"""CUDA paths (skipped without a GPU): CUDA == CPU logits, decode == forward on CUDA, a bf16 training step."""

import pytest
import torch

from helpers import small_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_cuda_forward_equals_cpu():
    model = small_model()
    ids = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        cpu = model(ids)
        gpu = model.cuda()(ids.cuda()).cpu()
    assert (cpu - gpu).abs().max() < 1e-3  # TF32 may be on for matmuls


def test_cuda_decode_equals_forward(no_tf32):
    model = small_model().cuda()
    ids = torch.randint(0, 97, (2, 25), device="cuda")
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2)
        steps = [model(ids[:, :7], cache)] + [model(ids[:, t:t + 1], cache) for t in range(7, 25)]
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-4


def test_bf16_autocast_training_step_lowers_loss():
    model = small_model().cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 97, (4, 65), device="cuda")
    losses = []
    for _ in range(20):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.loss(ids[:, :-1], ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_cuda_graph_decode_equals_eager_decode(no_tf32):
    """The compiled step on CUDA (mode="reduce-overhead": CUDA graphs over the static cache)."""
    from hybridlm.serve.decoder import Decoder
    model = small_model().cuda()
    ids = torch.randint(0, 97, (2, 30), device="cuda")
    with torch.inference_mode():
        eager, graphs = Decoder(model, 2, 64), Decoder(model, 2, 64, compile=True)
        a, b = eager.prefill(ids), graphs.prefill(ids)
        for _ in range(12):  # past CUDA-graph warm-up and recording, into replays
            tok = a.argmax(-1)
            a, b = eager.step(tok), graphs.step(tok)
            assert (a - b).abs().max() < 1e-4
    assert graphs._step.fallback_reason is None


def test_cuda_training_uses_the_triton_scan_and_equals_pytorch(no_tf32, monkeypatch):
    pytest.importorskip("triton")
    model = small_model().cuda().train()
    ids = torch.randint(0, 97, (2, 41), device="cuda")

    def loss_and_grads():
        model.zero_grad()
        loss = model.loss(ids[:, :-1], ids[:, 1:])
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]
    fast = loss_and_grads()
    monkeypatch.setenv("HYBRIDLM_SSD", "pytorch")
    ref = loss_and_grads()
    assert (fast[0] - ref[0]).abs() < 1e-5
    for g1, g2 in zip(fast[1], ref[1]):
        assert (g1 - g2).abs().max() < 1e-4
