"""CLIP's ``quick_gelu`` computed with fewer passes over memory, swapped in at load time.

``x * sigmoid(1.702 x)`` equals ``silu(1.702 x) / 1.702``. Written that way, the forward pass
makes one temporary instead of three, and the backward pass is SiLU's own fused gradient
instead of autograd's five element-wise steps. The embedded model's text encoder has a
3,072-wide MLP over a 128-wide stream, so on a CPU this activation costs more there than the
matrix products around it; the swap made its statistics and Stage I 14-17 % faster
(benchmarks/README.md). The function is the same to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SCALE = 1.702


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    y = x * SCALE
    F.silu(y, inplace=True)
    return y.mul_(1 / SCALE)


class _QuickGELUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return _quick_gelu(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        # d/dx silu(a x) / a = silu'(a x)
        return torch.ops.aten.silu_backward(grad, x * SCALE)


class QuickGELU(nn.Module):
    """Drop-in for transformers' ``QuickGELUActivation``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _QuickGELUFunction.apply(x)
        return _quick_gelu(x)


def use_fast_quick_gelu(model: nn.Module) -> int:
    """Replace every ``QuickGELUActivation`` in ``model`` (a CLIP text encoder); returns how
    many. Weights, config and saved files are unchanged."""
    from transformers.activations import QuickGELUActivation

    swapped = 0
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, QuickGELUActivation):
                setattr(parent, name, QuickGELU())
                swapped += 1
    return swapped
