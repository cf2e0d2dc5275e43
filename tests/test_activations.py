"""The faster quick_gelu computes what transformers' does, forward and backward."""

import torch
from transformers import CLIPTextModel
from transformers.activations import QuickGELUActivation

import emcid
from emcid.activations import QuickGELU, use_fast_quick_gelu


def test_fast_quick_gelu_matches_transformers_forward_and_backward():
    x = (torch.randn(4, 7, 300) * 4).requires_grad_(True)
    reference = QuickGELUActivation()(x)
    grad = torch.randn_like(reference)
    (expected_grad,) = torch.autograd.grad(reference, x, grad)
    fast = QuickGELU()(x)
    (found_grad,) = torch.autograd.grad(fast, x, grad)
    assert torch.allclose(fast, reference, atol=1e-6, rtol=1e-5)
    assert torch.allclose(found_grad, expected_grad, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        assert torch.allclose(QuickGELU()(x), reference, atol=1e-6, rtol=1e-5)
    assert torch.equal(x, x.detach().clone())  # the input is never written


def test_loaded_encoders_use_it_and_encode_as_before(sd1_dir):
    bundle = emcid.load_model(sd1_dir)
    plain = CLIPTextModel.from_pretrained(sd1_dir / "text_encoder").eval()
    assert any(isinstance(m, QuickGELUActivation) for m in plain.modules())
    assert not any(isinstance(m, QuickGELUActivation) for m in bundle.text_encoder.modules())
    ids = bundle.tokenize(["a photo of a tench", "a zebra"])[0]
    with torch.no_grad():
        expected = plain(ids).last_hidden_state
        found = bundle.text_encoder(ids).last_hidden_state
    assert torch.allclose(found, expected, atol=1e-5)
    assert use_fast_quick_gelu(plain) == plain.config.num_hidden_layers
