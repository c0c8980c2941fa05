"""Activation checkpointing: the same loss and gradients in every mode, recomputation where asked,
fewer saved activations, unchanged parameter names, bad settings refused."""

import pytest
import torch

from hybridlm.model.activation_checkpointing import (AC_MODES, apply_activation_checkpointing,
                                                     check_activation_checkpointing)

from helpers import small_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes: no OpenMP barrier stalls on a loaded CPU

# small_model's pattern M*-M-*M: 7 blocks, 5 of them mixers (M or *)
SETTINGS = [("none", 1, 0), ("full", 1, 7), ("selective", 1, 5), ("full", 2, 3), ("selective", 2, 2)]


def train_step(mode: str, every: int, train: bool = True):
    """(loss, gradients by name, mixer forwards run during backward, bytes saved for backward)."""
    model = small_model(seed=0).train(train)
    count = apply_activation_checkpointing(model, mode, every)
    ids = torch.randint(0, 97, (2, 21), generator=torch.Generator().manual_seed(0))
    calls = [0]
    for block in model.backbone.layers:
        block.mixer.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))  # (recomputation
        # stops early, once the saved tensors are back: a post-forward hook may not run)
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model.loss(ids[:, :-1], ids[:, 1:])
    forwards = calls[0]
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return model, count, loss.detach(), grads, calls[0] - forwards, saved[0]


def test_every_mode_gives_the_same_loss_and_gradients_and_recomputes_what_it_says():
    _, _, loss_ref, grads_ref, recomputed, saved_ref = train_step("none", 1)
    assert recomputed == 0
    saved = {}
    for mode, every, expected in SETTINGS[1:]:
        _, count, loss, grads, recomputed, saved[mode, every] = train_step(mode, every)
        assert count == expected and recomputed == expected, (mode, every)
        assert torch.equal(loss, loss_ref), (mode, every)
        for name, g in grads.items():
            assert (g - grads_ref[name]).abs().max() <= 1e-6 * max(1.0, grads_ref[name].abs().max().item()), name
    # fewer activations kept for backward: full < selective < none, and more of them with every=2
    assert saved["full", 1] < saved["selective", 1] < saved_ref
    assert saved["full", 1] < saved["full", 2] < saved_ref and saved["selective", 1] < saved["selective", 2]


def test_inference_is_untouched_and_names_unchanged():
    plain = small_model(seed=0)
    keys = list(plain.state_dict())
    model, _, _, _, recomputed, _ = train_step("full", 1, train=False)
    assert recomputed == 0  # eval mode: nothing is checkpointed
    assert list(model.state_dict()) == keys
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert apply_activation_checkpointing(model, "none") == 0
    assert all(block.recompute == "none" for block in model.backbone.layers)


def test_bad_settings_are_refused():
    model = small_model()
    for mode, every in [("everything", 1), ("full", 0), ("selective", -2), ("full", 1.5), ("full", True)]:
        with pytest.raises(ValueError, match="activation checkpointing"):
            apply_activation_checkpointing(model, mode, every)
    for mode in AC_MODES:
        check_activation_checkpointing(mode, 3)
