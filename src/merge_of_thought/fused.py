"""One low-rank pass for the frozen merged delta and the trainable branch, with gradients only for the branch.

When the merged delta lives in a frozen adapter (``frozen_delta="adapter"``: 4-bit, 8-bit and bf16 students), PEFT
runs each active adapter separately: per layer and step, two low-rank products each followed by a ``* scaling`` and
an addition over the full ``tokens x out`` output, and as much again in the backward. On a 70M 4-bit student that
fixed part cost ~12% of a step with a frozen adapter of rank 1 (0.82 against 0.73 s on an Intel Xeon). Here the
branch's forward computes both:

    result + (x A_f^T) B_f^T + s (dropout(x) A_b^T) B_b^T

with the additions and the scaling fused into the matrix products (``addmm``), and a backward that computes only
the input's gradient (one for both terms when the branch has no dropout) and the branch's ``A_b``/``B_b``
gradients: none for the frozen factors. The arithmetic is PEFT's up to float summation order (tested against it).

It plugs into PEFT as a LoRA variant of the branch adapter (``LoraLayer.lora_variant``, the hook PEFT's DoRA uses):
the branch is the only active adapter and its forward reads the frozen adapter's factors. Saving, loading and
deleting adapters are PEFT's own.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.layer import LoraVariant


class FrozenDeltaPass(LoraVariant):
    """The branch adapter's forward when a frozen adapter (``frozen``) holds the merged delta: both in one pass."""

    def __init__(self, frozen: str):
        self.frozen = frozen

    def supports_lora_conversion(self) -> bool:
        return False  # its forward includes another adapter's delta

    def forward(self, module: LoraLayer, active_adapter: str, x: torch.Tensor, result: torch.Tensor,
                **kwargs) -> torch.Tensor:  # fmt: skip
        frozen_A, frozen_B = module.lora_A[self.frozen].weight, module.lora_B[self.frozen].weight
        if module.scaling[self.frozen] != 1:
            frozen_B = frozen_B * module.scaling[self.frozen]
        dropout = module.lora_dropout[active_adapter]
        x_2d = x.reshape(-1, x.shape[-1])
        x_branch = x_2d if isinstance(dropout, torch.nn.Identity) else dropout(x_2d)  # the same tensor: one gradient
        out = _FrozenPlusBranch.apply(
            result.reshape(-1, result.shape[-1]),
            x_2d,
            x_branch,
            frozen_A,
            frozen_B,
            module.lora_A[active_adapter].weight,
            module.lora_B[active_adapter].weight,
            module.scaling[active_adapter],
        )
        return out.reshape(*result.shape[:-1], out.shape[-1])


def _compute_dtype(x: torch.Tensor, branch_A: torch.Tensor) -> torch.dtype:
    """What PEFT's own pass computes in: autocast's dtype under autocast, else the adapter's (x is cast to it)."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return branch_A.dtype


class _FrozenPlusBranch(torch.autograd.Function):
    """``result + x A_f^T B_f^T + s x_b A_b^T B_b^T`` for 2-d ``x``: the additions fused into the products, and
    gradients for result, x, x_b, A_b and B_b only."""

    @staticmethod
    def forward(ctx, result, x, x_branch, frozen_A, frozen_B, branch_A, branch_B, scaling):
        dtype = _compute_dtype(x, branch_A)
        shared = x_branch is x
        ctx.input_dtypes = (x.dtype, x_branch.dtype, branch_A.dtype, branch_B.dtype)  # what each gradient must be
        with torch.autocast(x.device.type, enabled=False):
            frozen_A, frozen_B, branch_A, branch_B = (t.to(dtype) for t in (frozen_A, frozen_B, branch_A, branch_B))
            xc = x.to(dtype)
            xb = xc if shared else x_branch.to(dtype)
            branch_hidden = xb @ branch_A.t()
            out = (xc @ frozen_A.t()) @ frozen_B.t()
            out = torch.addmm(out, branch_hidden, branch_B.t(), alpha=scaling)
            out = result + out if result.dtype != dtype else out.add_(result)
        ctx.shared, ctx.scaling, ctx.dtype = shared, scaling, dtype
        ctx.save_for_backward(xb, frozen_A, frozen_B, branch_A, branch_B, branch_hidden)
        return out.to(result.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x_branch, frozen_A, frozen_B, branch_A, branch_B, branch_hidden = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_x = grad_x_branch = grad_A = grad_B = None
        with torch.autocast(grad_out.device.type, enabled=False):
            dy = grad_out.to(ctx.dtype)
            d_branch_hidden = (dy @ branch_B).mul_(ctx.scaling)
            if need[1]:
                grad_x = (dy @ frozen_B) @ frozen_A
                if ctx.shared:  # both terms read x: one gradient
                    grad_x = torch.addmm(grad_x, d_branch_hidden, branch_A)
                grad_x = grad_x.to(ctx.input_dtypes[0])
            if need[2] and not ctx.shared:
                grad_x_branch = (d_branch_hidden @ branch_A).to(ctx.input_dtypes[1])
            if need[5]:
                grad_A = (d_branch_hidden.t() @ x_branch).to(ctx.input_dtypes[2])
            if need[6]:
                grad_B = (dy.t() @ branch_hidden).mul_(ctx.scaling).to(ctx.input_dtypes[3])
        return grad_out, grad_x, grad_x_branch, None, None, grad_A, grad_B, None


def set_frozen(layer: LoraLayer, branch: str, frozen: str | None) -> None:
    """Make ``branch``'s forward on ``layer`` include the frozen adapter ``frozen`` (which must then stay inactive),
    or, with None, be PEFT's plain LoRA forward again."""
    if frozen is not None:
        layer.lora_variant[branch] = FrozenDeltaPass(frozen)
    elif isinstance(layer.lora_variant.get(branch), FrozenDeltaPass):
        del layer.lora_variant[branch]
