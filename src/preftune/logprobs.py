"""Completion log-probabilities from final hidden states, in chunks (torch only).

A causal LM's loss-relevant output is one number per completion token: ``log p(token | prefix)``.
The usual route builds the whole ``rows x length x vocab`` logits tensor, upcasts it to fp32 and
keeps it (and its softmax) for the backward pass: at a vocabulary of 32k-150k that tensor is most
of a DPO step's memory. Here only the scored positions (labels != -100, shifted by one) are
projected, ``chunk_size`` tokens at a time, and the backward pass recomputes each chunk's logits
instead of storing them, so peak extra memory is one ``chunk_size x vocab`` fp32 block.

Labels follow the collator's convention: aligned with ``input_ids`` (not shifted), ``-100`` where
nothing is scored. Position ``t`` of the hidden states predicts ``labels[t + 1]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100


def completion_logps(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    chunk_size: int = 1024,
    logit_scale: float = 1.0,
    final_logit_softcap: float | None = None,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-row sums of completion-token log-probs (fp32) and per-row scored-token counts.

    ``hidden`` (rows, length, hidden) are the final hidden states, ``weight`` (vocab, hidden) the
    output projection (``bias`` its bias if any); ``logit_scale`` and ``final_logit_softcap``
    reproduce models whose heads scale or soft-cap logits (Cohere, Gemma 2). ``token_weights``
    (rows, length - 1), aligned with ``labels[:, 1:]``, weight each token in the sum (LD-DPO's
    :func:`ld_token_weights`); the counts are unweighted.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    scored, selected, picked = _scored_positions(hidden, labels)
    token_logps, _, _ = _ChunkedTokenLogps.apply(
        selected, weight, bias, picked, chunk_size, float(logit_scale), final_logit_softcap, compute_dtype(hidden), False
    )
    if token_weights is not None:
        token_logps = token_logps * token_weights[scored].to(token_logps.dtype)
    return _per_row(token_logps, scored), scored.sum(dim=1)


def completion_logps_with_stats(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    chunk_size: int = 1024,
    logit_scale: float = 1.0,
    final_logit_softcap: float | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`completion_logps`, plus per-row sums over the completion tokens of the predictive
    entropy (nats, ``-sum_v p_v log p_v``) and of top-1 hits (the label is the argmax), both without
    gradients: SFT's ``entropy`` and ``mean_token_accuracy``, as TRL logs them. Taken from each
    chunk's logits as they are computed, so they cost no second projection."""
    scored, selected, picked = _scored_positions(hidden, labels)
    token_logps, entropy, hits = _ChunkedTokenLogps.apply(
        selected, weight, bias, picked, chunk_size, float(logit_scale), final_logit_softcap, compute_dtype(hidden), True,
    )
    return _per_row(token_logps, scored), scored.sum(dim=1), _per_row(entropy, scored), _per_row(hits, scored)


def _scored_positions(hidden: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The scored mask (rows, length - 1) aligned with ``labels[:, 1:]``, the hidden states that predict
    the scored tokens (N, hidden), and those tokens (N,): only the positions that are scored."""
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    return scored, hidden[:, :-1][scored], targets[scored]


def _per_row(values: Tensor, scored: Tensor) -> Tensor:
    """Per-token ``values`` (N,), in the order of ``scored``'s True positions, summed per row (fp32)."""
    row_of = torch.nonzero(scored, as_tuple=True)[0]
    return torch.zeros(scored.shape[0], dtype=torch.float32, device=values.device).index_add(0, row_of, values.float())


def ld_token_weights(scored: Tensor, ld_alpha: float) -> Tensor:
    """LD-DPO's token weights (Liu et al. 2024, arXiv:2409.06411, eq. 9) for a pair batch's scored mask (2B, X).

    Rows 0..B-1 are the chosen completions and B..2B-1 the rejected ones. Each pair's first
    ``min(|yw|, |yl|)`` completion tokens weigh 1 and the rest (the longer side's "verbose" tail)
    ``ld_alpha``: ``log pi(y) = sum_shared + alpha * sum_tail``, as TRL 1.16's ``ld_alpha``.
    """
    position = scored.long().cumsum(dim=1)
    lengths = scored.sum(dim=1)
    chosen, rejected = lengths.chunk(2, dim=0)
    shared = torch.minimum(chosen, rejected).repeat(2).unsqueeze(1)
    weights = torch.where(position <= shared, 1.0, float(ld_alpha))
    return torch.where(scored, weights, 0.0)


def token_logps(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    chunk_size: int = 1024,
    logit_scale: float = 1.0,
    final_logit_softcap: float | None = None,
) -> Tensor:
    """Per-position log-probs (rows, length - 1) aligned with ``labels[:, 1:]``, 0 where unscored.

    For metrics that need token-level values (KL estimates, perplexity); chunked like
    :func:`completion_logps`.
    """
    scored, selected, picked = _scored_positions(hidden, labels)
    values, _, _ = _ChunkedTokenLogps.apply(
        selected, weight, bias, picked, chunk_size, float(logit_scale), final_logit_softcap, compute_dtype(hidden), False
    )
    out = torch.zeros(scored.shape, dtype=torch.float32, device=hidden.device)
    out[scored] = values
    return out


def wpo_logps(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    chunk_size: int = 1024,
    logit_scale: float = 1.0,
    final_logit_softcap: float | None = None,
) -> Tensor:
    """Per-row sums over scored tokens of ``log p(token) - log sum_v p(v)^2`` (fp32, no gradient).

    WPO's aligned log-probs (Zhou et al. 2024, arXiv:2406.11827, eq. 2): each token's
    probability relative to the distribution's own peakedness. With ``l`` the logits and
    ``lse = logsumexp(l)``, ``log sum_v p_v^2 = logsumexp(2 l) - 2 lse``, so a token's term is
    ``l_t + lse - logsumexp(2 l)``. One more chunked pass of the output projection.
    """
    scored, selected, picked = _scored_positions(hidden.detach(), labels)
    dtype = compute_dtype(hidden)
    out = torch.empty(selected.shape[0], dtype=torch.float32, device=hidden.device)
    with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, selected.shape[0], chunk_size):
            end = start + chunk_size
            logits, _ = _logits(selected[start:end], weight.detach(), None if bias is None else bias.detach(), float(logit_scale),
                                final_logit_softcap, dtype)
            aligned = logits.gather(1, picked[start:end, None]).squeeze(1) + torch.logsumexp(logits, -1) - torch.logsumexp(2 * logits, -1)
            out[start:end] = aligned
    return _per_row(out, scored)


def naive_completion_logps(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """The textbook computation on full logits (rows, length, vocab): the reference for tests."""
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = torch.gather(logp, 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * scored).sum(dim=1), scored.sum(dim=1)


def compute_dtype(tensor: Tensor) -> torch.dtype:
    """The dtype a matmul on ``tensor`` runs in: the autocast dtype when autocast is on for its
    device (as the model's own layers would use), else ``tensor``'s own dtype.

    The one statement of this rule: the chunked head projection and the additive attention
    masks of :mod:`preftune.models.scorers` both follow it.
    """
    device_type = tensor.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return tensor.dtype


def _logits(h: Tensor, weight: Tensor, bias: Tensor | None, scale: float, cap: float | None, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """fp32 logits of one chunk, and (for the backward) d logits / d raw logits when it is not 1."""
    raw = torch.nn.functional.linear(h.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)).float()
    if scale != 1.0:
        raw = raw * scale
    if cap is None:
        return raw, None
    capped = cap * torch.tanh(raw / cap)
    return capped, 1.0 - (capped / cap) ** 2


class _ChunkedTokenLogps(torch.autograd.Function):
    """log p(target) for N hidden rows, logits recomputed chunk by chunk in the backward pass."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, scale, cap, dtype, stats):  # type: ignore[override]
        # -> (log p(target), and with ``stats`` each token's entropy and top-1 hit (else empty): no gradients)
        with torch.autocast(hidden.device.type, enabled=False):
            out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
            lse_all = torch.empty_like(out)
            entropy, hits = (torch.empty_like(out), torch.empty_like(out)) if stats else (out.new_empty(0), out.new_empty(0))
            for start in range(0, hidden.shape[0], chunk_size):
                end = start + chunk_size
                logits, _ = _logits(hidden[start:end], weight, bias, scale, cap, dtype)
                lse = torch.logsumexp(logits, dim=-1)
                out[start:end] = logits.gather(1, targets[start:end, None]).squeeze(1) - lse
                lse_all[start:end] = lse
                if stats:
                    entropy[start:end] = lse - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)
                    hits[start:end] = (logits.argmax(dim=-1) == targets[start:end]).float()
        ctx.save_for_backward(hidden, weight, bias, targets, lse_all)
        ctx.config = (chunk_size, scale, cap, dtype)
        ctx.mark_non_differentiable(entropy, hits)
        return out, entropy, hits

    @staticmethod
    def backward(ctx, grad_out, _grad_entropy, _grad_hits):  # type: ignore[override]
        hidden, weight, bias, targets, lse_all = ctx.saved_tensors
        chunk_size, scale, cap, dtype = ctx.config
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_size):
                end = start + chunk_size
                h = hidden[start:end]
                logits, dcap = _logits(h, weight, bias, scale, cap, dtype)
                go = grad_out[start:end].float()
                # d logp(t) / d logits = onehot(t) - softmax(logits)
                grad = torch.exp(logits - lse_all[start:end, None]).mul_(-go[:, None])
                grad.scatter_add_(1, targets[start:end, None], go[:, None])
                if dcap is not None:
                    grad.mul_(dcap)
                if scale != 1.0:
                    grad.mul_(scale)
                if need_h:
                    grad_h[start:end] = (grad.to(dtype) @ weight.to(dtype)).to(hidden.dtype)
                if need_w:
                    grad_w += grad.t() @ h.float()
                if need_b:
                    grad_b += grad.sum(dim=0)
        return (
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None, None, None, None, None, None,
        )
