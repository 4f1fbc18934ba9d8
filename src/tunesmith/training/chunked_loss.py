"""Cross-entropy through the LM head in chunks, so full-vocabulary logits never exist at once.

For data with a label at every position (continued pretraining, long generations) a micro-batch of 4,096
labelled tokens on a 49,152-token vocabulary makes 201M fp32 logits: 0.8 GB, and autograd keeps them plus the
softmax for the backward pass. Here the model runs without its LM head (`hidden_states_at_kept`), and
`ChunkedHeadCE` computes, chunk by chunk of rows, the logits, the summed cross-entropy and right away their
gradients with respect to the hidden states and the head's weight (as Liger's fused linear cross-entropy does):
one chunk's logits at a time, the same matrix products as the plain head and loss, nothing recomputed.

Used by the loop only when it pays (many labelled positions; see `should_chunk`); classification data keeps
the plain path, where the kept positions are few. A head that is not a plain `nn.Linear` (e.g. one wrapped by
LoRA) keeps the plain path too.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn

# rows of logits per chunk: ~16M fp32 values (64 MB) whatever the vocabulary
CHUNK_VALUES = 1 << 24


def chunk_rows(vocab_size: int) -> int:
    return max(1, CHUNK_VALUES // max(vocab_size, 1))


def linear_head(model) -> nn.Linear | None:
    """The model's LM head when it is a plain linear layer (the case chunking handles), else None."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    return head if type(head) is nn.Linear else None


def should_chunk(model, n_keep: int) -> bool:
    """Chunk when the kept positions make more than two chunks of logits and the head is a plain linear layer."""
    head = linear_head(model)
    return head is not None and n_keep > 2 * chunk_rows(head.out_features)


@contextmanager
def hidden_states_at_kept(model):
    """Within the block the model's forward returns, in place of logits, the final hidden states at the
    positions `logits_to_keep` selects (its LM head is swapped for an identity); yields the real head."""
    head = model.get_output_embeddings()
    for parent in model.modules():
        for name, child in parent.named_children():
            if child is head:
                setattr(parent, name, nn.Identity())
                try:
                    yield head
                finally:
                    setattr(parent, name, head)
                return
    raise ValueError("the model's output embeddings are not a child module of it")


def body_without_head(model, forward, autocast) -> tuple[torch.Tensor, nn.Module]:
    """(hidden states, head): `forward()` (the model's forward at the kept positions) run under `autocast` with the
    LM head swapped out, its output cast to the head's weight dtype (fp32 under bf16-mixed), and the head, to be
    applied after it, outside autocast."""
    with hidden_states_at_kept(model) as head:
        with autocast:
            hidden = forward()
    weight = getattr(head, "weight", None)
    return hidden.to(weight.dtype if weight is not None else torch.float32), head


def logits_head_outside(model, forward, autocast) -> torch.Tensor:
    """`forward()`'s logits with the LM head applied outside `autocast` (`body_without_head`): under bf16-mixed the
    logits, and so the loss and the KL terms, are computed in fp32. With autocast off this is just `forward()`."""
    if isinstance(autocast, nullcontext):
        return forward()
    hidden, head = body_without_head(model, forward, autocast)
    return head(hidden)


class ChunkedHeadCE(torch.autograd.Function):
    """sum_i CE(hidden_i @ W.T + b, target_i), and the number of argmax hits, computed `rows` rows at a time.

    Gradients are computed in the forward pass (the loss is a scalar sum, so d loss / d logits = softmax -
    one-hot is known there) and scaled by the incoming gradient in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows, grad_enabled):
        # needs_input_grad says which inputs require grad even under no_grad (validation): grad_enabled says
        # whether a backward pass can follow at all
        need_hidden, need_weight, need_bias = (grad_enabled and n for n in ctx.needs_input_grad[:3])
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        grad_bias = torch.zeros_like(bias) if need_bias else None
        need_grad = need_hidden or need_weight or need_bias
        loss = hidden.new_zeros((), dtype=torch.float32)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)  # summed on the device: no sync per chunk
        for start in range(0, hidden.shape[0], rows):
            h = hidden[start : start + rows]
            t = targets[start : start + rows]
            logits = F.linear(h, weight, bias).float()
            loss += F.cross_entropy(logits, t, reduction="sum")
            correct += (logits.argmax(-1) == t).sum()
            if not need_grad:
                continue
            g = torch.softmax(logits, -1)  # d sum CE / d logits = softmax - one-hot
            g[torch.arange(t.shape[0], device=t.device), t] -= 1.0
            del logits
            g = g.to(weight.dtype)
            if grad_hidden is not None:
                grad_hidden[start : start + rows] = (g @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += g.t() @ h.to(weight.dtype)
            if grad_bias is not None:
                grad_bias += g.sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_loss.to(torch.float32)
        return (
            None if grad_hidden is None else grad_hidden * scale.to(grad_hidden.dtype),
            None if grad_weight is None else grad_weight * scale.to(grad_weight.dtype),
            None if grad_bias is None else grad_bias * scale.to(grad_bias.dtype),
            None,
            None,
            None,
        )


def chunked_cross_entropy(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of `head(hidden)` against `targets` and the argmax hits; hidden: (n, hidden_size)."""
    loss, correct = ChunkedHeadCE.apply(
        hidden, head.weight, head.bias, targets, chunk_rows(head.out_features), torch.is_grad_enabled()
    )
    return loss, int(correct)
