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
