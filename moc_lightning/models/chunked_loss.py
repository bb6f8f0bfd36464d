"""Next-token cross-entropy through the LM head, a chunk of rows at a time, so that the whole
(tokens, vocab) logits never exist at once.

The plain loss, `F.cross_entropy(lm_head(h).float(), labels)`, keeps the float32 log-softmax of
every token for backward: tokens x vocab x 4 bytes (4.2 GB at 32768 tokens and a 32000 vocab),
plus the bf16 logits and their gradients while it runs. Here the forward keeps only h, W, the
labels and one float32 log-sum-exp per row; the backward recomputes each chunk's logits from h
and W.

Why recompute rather than compute the gradients during the forward (Liger Kernel's approach):
both keep O(tokens) extra memory, but computing the gradients in the forward pays for a backward
in every forward, validation included, and holds grad_W (vocab x d, float32) from the forward to
the backward. Recomputing costs one extra h @ W.T per training step, a third more lm_head FLOPs
(a few percent of a llama-350m step), and leaves the forward a plain forward.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

IGNORE_INDEX = -100  # as F.cross_entropy's default ignore_index


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # The matmul in the inputs' dtype (bf16 tensor cores accumulate in float32 anyway), the
    # softmax in float32: the same numerics as lm_head(h).float() on the plain path.
    return (h @ weight.T).float()


class ChunkedLMHeadLoss(torch.autograd.Function):
    """mean over rows with label != -100 of logsumexp(h_i W^T) - (h_i W^T)[label_i].

    h (N, d) are the final, normed hidden states already aligned with labels (N,) (row i predicts
    label i); weight (V, d) is lm_head's; chunk_tokens rows are processed at a time. Labels must be
    in [0, V) or -100. Like F.cross_entropy, the loss is nan (and the gradients zero) when every
    label is -100.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
        valid = labels != IGNORE_INDEX
        targets = labels.clamp(min=0).unsqueeze(1)  # ignored rows read column 0 and are masked out
        lse = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            logits = _chunk_logits(h[rows], weight)
            lse[rows] = torch.logsumexp(logits, dim=1)
            terms = lse[rows] - logits.gather(1, targets[rows]).squeeze(1)
            total += torch.where(valid[rows], terms, 0.0).sum()
        ctx.save_for_backward(h, weight, labels, lse)
        ctx.chunk_tokens = chunk_tokens
        return total / valid.sum()  # 0 / 0 = nan when all are ignored, as F.cross_entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        h, weight, labels, lse = ctx.saved_tensors
        valid = labels != IGNORE_INDEX
        targets = labels.clamp(min=0).unsqueeze(1)
        # d loss / d logits_i = (softmax_i - onehot(label_i)) / n_valid on valid rows, 0 elsewhere
        # (clamped: with no valid row every row is masked and the gradients are 0, as F.cross_entropy's).
        row_scale = valid * (grad_loss / valid.sum().clamp(min=1))
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        # float32 sum over chunks, so that bf16 inputs lose no more than the plain path's one matmul
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        for start in range(0, h.shape[0], ctx.chunk_tokens):
            rows = slice(start, start + ctx.chunk_tokens)
            h_rows = h[rows]
            grad = _chunk_logits(h_rows, weight).sub_(lse[rows].unsqueeze(1)).exp_()  # softmax, in place
            grad.scatter_add_(1, targets[rows], torch.full_like(targets[rows], -1, dtype=grad.dtype))
            grad = grad.mul_(row_scale[rows].unsqueeze(1)).to(h.dtype)
            if grad_h is not None:
                grad_h[rows] = grad @ weight
            if grad_w is not None:
                grad_w += (grad.T @ h_rows).float()
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None


def chunked_lm_head_loss(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """ChunkedLMHeadLoss under autocast too: the inputs are cast as autocast would cast a Linear's
    (the cast of a float32 weight passes its gradient back), then autocast is turned off inside, so
    that the backward, which runs outside any autocast region, recomputes the same logits."""
    if not isinstance(chunk_tokens, int) or isinstance(chunk_tokens, bool) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens = {chunk_tokens!r} is not allowed: expected an integer >= 1")
    device_type = h.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        h, weight = h.to(dtype), weight.to(dtype)
    with torch.autocast(device_type, enabled=False):
        return ChunkedLMHeadLoss.apply(h, weight, labels, chunk_tokens)
