"""Log-probs of completions from a model: the scorers every stage and reference runs.

Both scorers return ``(logps, tokens)`` of shape (rows,): the SUMMED log-probs of each row's
completion tokens (``labels != IGNORE_INDEX``) and how many there are, computed in chunks from
the final hidden states by :func:`preftune.logprobs.completion_logps`, so the full
``rows x length x vocab`` logits never exist.

- :class:`SequenceLogps` scores plain rows (``collate_pairs``, ``collate_unpaired``,
  ``collate_packed``).
- :class:`SharedPrefixLogps` scores prefix-shared rows (``prompt | chosen | rejected``, from
  :func:`preftune.data.collate.collate_prefix_shared`, whose docstring gives the layout), with
  chosen rows first, so ``split_pair``, the losses and the references work unchanged. One shift
  needs care: the first rejected token is predicted from the hidden state of the LAST PROMPT
  token, not from the position just before it in the row (the last chosen token); the scorer
  gathers each scored token's predecessor explicitly. A plain batch given to it (or a shared
  batch given to ``SequenceLogps``) fails on the shapes.
"""

from __future__ import annotations

import torch
from torch import nn

from preftune.data.collate import MASKED_ATTENTION
from preftune.errors import PreftuneError
from preftune.logprobs import IGNORE_INDEX, completion_logps, completion_logps_with_stats, compute_dtype, ld_token_weights, wpo_logps


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The ``*ForCausalLM`` module, under a peft wrapper if there is one."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def body_of(lm: nn.Module) -> nn.Module:
    """The transformer body of a ``*ForCausalLM`` (its final hidden states, no LM head)."""
    return getattr(lm, lm.base_model_prefix)


class SequenceLogps(nn.Module):
    """Summed completion log-probs of each row, from hidden states, in chunks.

    Runs the transformer body once, then :func:`preftune.logprobs.completion_logps` on the
    final hidden states and the output projection, so the full ``rows x length x vocab`` logits
    tensor never exists. Wrapping this module (not the causal LM) with DDP keeps gradient
    synchronisation correct, since the forward that DDP sees is the one that is run.
    """

    def __init__(self, model: nn.Module, *, chunk_size: int = 1024, wpo: bool = False, ld_alpha: float | None = None) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.wpo = wpo  # also return each row's summed WPO-aligned log-probs (no gradient): loss.use_weighting
        self.ld_alpha = ld_alpha  # LD-DPO: pair rows' tails beyond the shared length weigh ld_alpha (loss.ld_alpha)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        lm = causal_lm_of(self.model)
        hidden = body_of(lm)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=False).last_hidden_state
        weights = None if self.ld_alpha is None else ld_token_weights(labels[:, 1:] != IGNORE_INDEX, self.ld_alpha)
        return self.head_logps(lm, hidden, labels, weights)

    def head_logps(self, lm: nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                   token_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """``completion_logps`` through ``lm``'s output projection (its scale and soft-cap, if any);
        with ``wpo``, also :func:`~preftune.logprobs.wpo_logps` through the same head; a subclass's
        ``head_fn`` (SFT's statistics) in its place."""
        head = lm.get_output_embeddings()
        config = lm.config
        options = dict(bias=getattr(head, "bias", None), chunk_size=self.chunk_size,
                       logit_scale=float(getattr(config, "logit_scale", None) or 1.0),
                       final_logit_softcap=getattr(config, "final_logit_softcapping", None))
        if self.head_fn is not completion_logps:
            return self.head_fn(hidden, head.weight, labels, **options)
        sums, tokens = completion_logps(hidden, head.weight, labels, token_weights=token_weights, **options)
        if not self.wpo:
            return sums, tokens
        return sums, tokens, wpo_logps(hidden, head.weight, labels, **options)


    head_fn = staticmethod(completion_logps)


class SequenceLogpsWithStats(SequenceLogps):
    """:class:`SequenceLogps` that also gives per-row sums of the completion tokens' predictive
    entropy and top-1 hits (:func:`preftune.logprobs.completion_logps_with_stats`): four tensors."""

    head_fn = staticmethod(completion_logps_with_stats)


def _layout(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt length, end of chosen) per pair, read from the (2B, W) labels.

    The chosen tokens start right after the prompt and the rejected ones right after the chosen
    ones (the collator's layout); anything else is refused rather than scored wrongly.
    """
    pairs = labels.shape[0] // 2
    scored = labels != IGNORE_INDEX
    chosen, rejected = scored[:pairs], scored[pairs:]
    if not bool(chosen.any(dim=1).all()) or not bool(rejected.any(dim=1).all()):
        raise ValueError("every pair needs at least one scored chosen and rejected token")
    width = labels.shape[1]
    prompt_len = chosen.int().argmax(dim=1)
    chosen_end = width - chosen.flip(1).int().argmax(dim=1)
    rejected_start = rejected.int().argmax(dim=1)
    if not torch.equal(rejected_start, chosen_end) or bool((prompt_len < 1).any()):
        raise ValueError("labels are not in the prefix-shared layout (prompt | chosen | rejected); use collate_prefix_shared")
    return prompt_len, chosen_end


def shared_position_ids(labels: torch.Tensor) -> torch.Tensor:
    """The (B, W) position ids of the shared rows, rebuilt from the labels' layout."""
    return _positions(*_layout(labels), labels.shape[1])


def _positions(prompt_len: torch.Tensor, chosen_end: torch.Tensor, width: int) -> torch.Tensor:
    positions = torch.arange(width, device=prompt_len.device).expand(len(prompt_len), width)
    rejected = positions >= chosen_end[:, None]
    return torch.where(rejected, positions - (chosen_end - prompt_len)[:, None], positions)


class SharedPrefixLogps(SequenceLogps):
    """Summed completion log-probs of prefix-shared rows: (2B,) log-probs and token counts.

    Same contract as :class:`SequenceLogps` (chosen rows first), for batches from
    :func:`~preftune.data.collate.collate_prefix_shared`. ``position_ids`` may be left out (the 3-argument call of the
    loss and the references): they are a function of the layout and are rebuilt from ``labels``.
    """

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        pairs, width = input_ids.shape
        if labels.shape != (2 * pairs, width) or attention_mask.dim() != 4:
            raise ValueError(
                f"SharedPrefixLogps takes a batch from collate_prefix_shared: input_ids (B, W), a 4D attention_mask "
                f"and labels (2B, W); got input_ids {tuple(input_ids.shape)}, attention_mask "
                f"{tuple(attention_mask.shape)}, labels {tuple(labels.shape)}"
            )
        prompt_len, chosen_end = _layout(labels)
        if position_ids is None:
            position_ids = _positions(prompt_len, chosen_end, width)
        lm = causal_lm_of(self.model)
        mask = _mask_for(lm, attention_mask)
        hidden = body_of(lm)(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                             use_cache=False).last_hidden_state

        scored = labels != IGNORE_INDEX
        rows, cols = torch.nonzero(scored, as_tuple=True)  # row-major: the plain path's summation order
        pair = torch.where(rows >= pairs, rows - pairs, rows)
        source = cols - 1
        # The first rejected token follows the prompt, not the last chosen token.
        first_rejected = (rows >= pairs) & (cols == chosen_end[pair])
        source = torch.where(first_rejected, prompt_len[pair] - 1, source)
        selected = hidden[pair, source]  # (N, hidden): the state that predicts each scored token
        # completion_logps scores hidden[:, t] against labels[:, t + 1]; so each scored token becomes
        # a two-position row (its predecessor's state, its target) and the chunked projection,
        # with its memory-light backward, is reused as is.
        targets = torch.stack([torch.full_like(labels[rows, cols], IGNORE_INDEX), labels[rows, cols]], dim=1)
        token_logps, _, *aligned = self.head_logps(lm, selected.unsqueeze(1).expand(-1, 2, -1), targets)
        if self.ld_alpha is not None:
            token_logps = token_logps * ld_token_weights(scored, self.ld_alpha)[rows, cols]
        sums = torch.zeros(2 * pairs, dtype=torch.float32, device=hidden.device).index_add(0, rows, token_logps)
        if aligned:
            return sums, scored.sum(dim=1), torch.zeros_like(sums).index_add(0, rows, aligned[0])
        return sums, scored.sum(dim=1)


def _mask_for(lm: nn.Module, mask: torch.Tensor) -> torch.Tensor:
    """The boolean block mask in the form the model's attention takes.

    SDPA takes a boolean mask (True = attend) as is; eager attention ADDS the mask to the scores,
    so it needs 0 / dtype-min. Flash-attention kernels take no arbitrary mask: refused.
    """
    implementation = getattr(lm.config, "_attn_implementation", None) or "eager"
    if implementation not in MASKED_ATTENTION:
        raise PreftuneError(
            f"prefix sharing needs an attention that takes a 4D mask ({' or '.join(MASKED_ATTENTION)}); "
            f"the model uses '{implementation}'. Set model.attn_implementation=sdpa or turn prefix sharing off."
        )
    if mask.dtype != torch.bool:
        raise ValueError(f"the prefix-shared attention mask must be bool (True = attend), got {mask.dtype}")
    if implementation == "sdpa":
        return mask
    dtype = compute_dtype(next(lm.parameters()))
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)

