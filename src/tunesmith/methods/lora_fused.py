"""LoRA linear layers in one autograd function: y = x W^T + b + s (x A^T) B^T without the intermediate tensors.

peft computes `base(x) + lora_B(lora_A(x)) * scaling`: the up-projection writes a new [tokens, out] tensor, the
scaling writes another, the sum a third, and backward repeats the scaling and adds the two input gradients in
more full-size passes. Here the up-projection accumulates into the base output in place (`addmm_` with
alpha = s) and backward folds the LoRA path into the input gradient the same way, so the only full-size tensors
are the output and the input gradient. Same parameters, same saved files (peft's modules stay in place; only
their forward is swapped), same results to fp32 rounding (tests/test_lora_fused.py).

Used for plain LoRA in training where it applies: no dropout, one active adapter, not merged, an `nn.Linear`
base layer. Anything else (DoRA, dropout, mixed-adapter batches) runs peft's own forward, unchanged, except that
under autocast LoRA with dropout sums peft's two terms in fp32 and DoRA gets the base output in fp32 (below).

Under autocast (train.precision bf16-mixed) the products with the big matrices run in bf16 (the input cast once,
the frozen base weight usually stored in bf16 already, models/precision.cast_frozen_linears), but the layer's output
is the fp32 sum of the base product and the LoRA term, and the LoRA matrices stay fp32 (`lora_linear_mixed`).
Autocast's own recipe (and peft's, and Trainer's `bf16=True`) adds the LoRA term to the base output in bf16,
whose 8-bit mantissa rounds to ~0.4% of the output: early in training, and for small learning rates, the adapter's
whole contribution is below that step and is rounded away, so the first updates barely change what the model
computes (measured on the demo data: the second batch's loss, 8.42 untrained, was 6.87 after one fp32 step and
7.90 after one step with the bf16 sum; bench/RESULTS.md run 20). Gradients may be rounded to bf16 (rounding noise
averages out over a step); the sum the adapter's contribution lives in may not.
"""

from __future__ import annotations

import types

import torch
from torch import nn


class _LoraLinear(torch.autograd.Function):
    """x W^T + b + s (x A^T) B^T with the products in `dtype` and the two terms summed in `sum_dtype` (the output's
    and the input gradient's dtype). Plain (lora_linear): both the input's dtype, every cast a no-op. bf16-mixed
    (lora_linear_mixed): bf16 products, an fp32 sum. The gradients of x, A and B come back in their own dtypes."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, dtype: torch.dtype, sum_dtype: torch.dtype):
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        w, a, b = weight.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
        h = x2 @ a.t()  # [tokens, r]
        y = (torch.addmm(bias.to(dtype), x2, w.t()) if bias is not None else x2 @ w.t()).to(sum_dtype)
        y.addmm_(h.to(sum_dtype), lora_b.to(sum_dtype).t(), alpha=scaling)  # the (small) LoRA term, in sum_dtype
        ctx.save_for_backward(x2, w, a, b, h)
        ctx.scaling, ctx.sum_dtype = scaling, sum_dtype
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.a_dtype, ctx.b_dtype = lora_a.dtype, lora_b.dtype
        ctx.has_bias = bias is not None
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, w, a, b, h = ctx.saved_tensors
        s, sum_dtype = ctx.scaling, ctx.sum_dtype
        g = grad.reshape(-1, grad.shape[-1]).to(w.dtype)
        need_x, need_w, need_b, need_a, need_lb = ctx.needs_input_grad[:5]
        grad_h = (g @ b).mul_(s)  # [tokens, r]: the gradient reaching x A^T
        gx = gw = gbias = ga = glb = None
        if need_x:
            gx = (g @ w).to(sum_dtype).addmm_(grad_h.to(sum_dtype), a.to(sum_dtype)).to(ctx.x_dtype).view(ctx.x_shape)
        if need_w:
            gw = g.t() @ x2
        if need_b and ctx.has_bias:
            gbias = g.sum(0)
        if need_a:
            ga = (grad_h.t() @ x2).to(ctx.a_dtype)
        if need_lb:
            glb = (g.t() @ h).mul_(s).to(ctx.b_dtype)
        return gx, gw, gbias, ga, glb, None, None, None


def lora_linear(x, weight, bias, lora_a, lora_b, scaling: float) -> torch.Tensor:
    """x W^T + bias + scaling * (x A^T) B^T, with W [out, in], A [r, in], B [out, r], all in x's dtype."""
    return _LoraLinear.apply(x, weight, bias, lora_a, lora_b, float(scaling), x.dtype, x.dtype)


def lora_linear_mixed(x, weight, bias, lora_a, lora_b, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """lora_linear under bf16-mixed: products in `dtype`, the output the fp32 sum of the base and LoRA terms."""
    return _LoraLinear.apply(x, weight, bias, lora_a, lora_b, float(scaling), dtype, torch.float32)


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft LoRA Linear forward, fused when nothing but plain LoRA is asked of it; peft's own otherwise."""
    if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
        return type(self).forward(self, x, *args, **kwargs)
    name = self.active_adapters[0]
    base = self.base_layer
    if name not in self.lora_A or type(base) is not nn.Linear:
        return type(self).forward(self, x, *args, **kwargs)
    variant = getattr(self, "lora_variant", {}).get(name)
    if variant is not None:
        if torch.is_autocast_enabled(x.device.type) and type(variant).__name__ == "DoraLinearVariant":
            # peft's DoRA forward, given the base output in fp32: its sum with the (small) DoRA term is then fp32,
            # and not cast back to the base output's bf16 as peft's Linear.forward does
            result = base(x).float()
            x = self._cast_input_dtype(x, self.lora_A[name].weight.dtype)
            return variant.forward(self, active_adapter=name, x=x, result=result)
        return type(self).forward(self, x, *args, **kwargs)
    if not isinstance(self.lora_dropout[name], nn.Identity):
        if torch.is_autocast_enabled(x.device.type):  # peft's terms, summed in fp32 as the fused layer does
            lora = self.lora_B[name](self.lora_A[name](self.lora_dropout[name](x))) * self.scaling[name]
            return base(x).float() + lora.float()
        return type(self).forward(self, x, *args, **kwargs)
    tensors = (x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight)
    device = x.device.type
    if torch.is_autocast_enabled(device):
        with torch.autocast(device, enabled=False):
            return lora_linear_mixed(*tensors, self.scaling[name], torch.get_autocast_dtype(device))
    if any(t is not None and t.dtype != x.dtype for t in tensors):
        return type(self).forward(self, x, *args, **kwargs)
    return lora_linear(*tensors, self.scaling[name])


def fuse_lora(model: nn.Module) -> int:
    """Swap the forward of every peft LoRA `Linear` in `model` for the fused one; returns how many."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    count = 0
    for module in model.modules():
        if type(module) is LoraLinear:
            module.forward = types.MethodType(_fused_forward, module)
            count += 1
    return count
