"""Prefix sharing: the prompt encoded once for both completions.

The concatenated batch of :func:`preftune.data.collate.collate_pairs` runs every prompt twice
(``prompt+chosen`` and ``prompt+rejected``). Here each pair is ONE row::

    prompt | chosen | rejected | padding

with a block attention mask and restarted positions, so every chosen and rejected token sees
exactly the context it sees in the plain layout:

- prompt and chosen tokens attend causally to the prompt and the chosen tokens before them;
- rejected tokens attend to the prompt and to the rejected tokens before them, never to chosen;
- the rejected part's positions restart at ``len(prompt)``, as if it followed the prompt;
- padding attends only to itself (a row with nothing to attend to would give NaN).

One shift needs care: the first rejected token is predicted from the hidden state of the LAST
PROMPT token, not from the position just before it in the row (the last chosen token).
:class:`SharedPrefixLogps` gathers each scored token's predecessor explicitly.

A batch of B pairs holds ``input_ids`` (B, W), a 4D boolean ``attention_mask`` (B, 1, W, W)
(True = may attend), ``position_ids`` (B, W), and ``labels`` of shape **(2B, W)**: rows 0..B-1
hold the chosen tokens and rows B..2B-1 the rejected tokens, each at its place in the shared
row (``-100`` elsewhere). So ``scorer(input_ids, attention_mask, labels)`` returns (2B,)
log-probs with chosen rows first, the contract of :class:`~preftune.models.SequenceLogps`, and
``split_pair``, the losses and the references work unchanged. A plain batch given to
:class:`SharedPrefixLogps` (or a shared batch given to ``SequenceLogps``) fails on the shapes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from preftune.data.collate import IGNORE_INDEX
from preftune.data.records import TokenizedPair
from preftune.errors import PreftuneError, TokenizationError
from preftune.models import SequenceLogps, body_of, causal_lm_of

#: Attention implementations that take an arbitrary 4D mask tensor.
MASKED_ATTENTION = ("sdpa", "eager")


def collate_prefix_shared(
    pairs: list[TokenizedPair], pad_token_id: int, *, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """One row per pair, ``prompt | chosen | rejected``, right padded (see the module docstring).

    Returns ``input_ids`` (B, W), ``attention_mask`` (B, 1, W, W) bool, ``position_ids`` (B, W),
    ``labels`` (2B, W); ``preference``, ``weight``, ``margin`` (B,) float32, ``index`` (B,) int64 as
    :func:`~preftune.data.collate.collate_pairs`; and ``real_tokens`` (B,): ``2 * prompt + chosen
    + rejected``, the tokens the plain layout would hold, so throughput is counted alike.
    """
    if not pairs:
        raise ValueError("collate_prefix_shared needs at least one pair")
    if pad_token_id is None:
        raise TokenizationError("the tokenizer has no pad token; set one (preftune's loader uses EOS).")
    for pair in pairs:
        if not pair.prompt_ids:
            # nothing would predict the first rejected token (nor, in the plain layout, the first chosen one)
            raise PreftuneError(f"prefix sharing needs a non-empty prompt (pair {pair.index}, {pair.source or 'no source'}).")
        if not pair.chosen_ids or not pair.rejected_ids:
            raise PreftuneError(f"pair {pair.index} has an empty completion; tokenization never produces one.")
    rows = len(pairs)
    width = max(p.shared_length for p in pairs)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((rows, width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((rows, width), dtype=torch.long)
    labels = torch.full((2 * rows, width), IGNORE_INDEX, dtype=torch.long)
    # segment: 0 prompt, 1 chosen, 2 rejected, -1 padding
    segment = torch.full((rows, width), -1, dtype=torch.long)
    for b, p in enumerate(pairs):
        n_prompt, n_chosen, n_rejected = len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
        chosen_end = n_prompt + n_chosen
        end = chosen_end + n_rejected
        input_ids[b, :end] = torch.tensor(p.prompt_ids + p.chosen_ids + p.rejected_ids)
        position_ids[b, :chosen_end] = torch.arange(chosen_end)
        position_ids[b, chosen_end:end] = torch.arange(n_prompt, n_prompt + n_rejected)
        labels[b, n_prompt:chosen_end] = input_ids[b, n_prompt:chosen_end]
        labels[rows + b, chosen_end:end] = input_ids[b, chosen_end:end]
        segment[b, :n_prompt] = 0
        segment[b, n_prompt:chosen_end] = 1
        segment[b, chosen_end:end] = 2
    return {
        "input_ids": input_ids,
        "attention_mask": block_attention_mask(segment),
        "position_ids": position_ids,
        "labels": labels,
        "preference": torch.tensor([p.preference for p in pairs], dtype=torch.float32),
        "weight": torch.tensor([p.weight for p in pairs], dtype=torch.float32),
        "margin": torch.tensor([p.margin for p in pairs], dtype=torch.float32),
        "index": torch.tensor([p.index for p in pairs], dtype=torch.long),
        "real_tokens": torch.tensor(
            [p.shared_length + len(p.prompt_ids) for p in pairs], dtype=torch.long
        ),
    }


def block_attention_mask(segment: torch.Tensor) -> torch.Tensor:
    """(B, 1, W, W) bool from segment ids (B, W) (0 prompt, 1 chosen, 2 rejected, -1 padding).

    Causal everywhere; a rejected query never sees a chosen key; padding sees only itself.
    """
    width = segment.shape[1]
    query, key = segment[:, :, None], segment[:, None, :]
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool, device=segment.device))
    allowed = causal & (query >= 0) & (key >= 0) & ~((query == 2) & (key == 1))
    allowed |= torch.eye(width, dtype=torch.bool, device=segment.device) & (query < 0)
    return allowed[:, None]


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

    Same contract as :class:`~preftune.models.SequenceLogps` (chosen rows first), for batches from
    :func:`collate_prefix_shared`. ``position_ids`` may be left out (the 3-argument call of the
    loss and the references): they are a function of the layout and are rebuilt from ``labels``.
    """

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
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
        token_logps, _ = self.head_logps(lm, selected.unsqueeze(1).expand(-1, 2, -1), targets)
        sums = torch.zeros(2 * pairs, dtype=torch.float32, device=hidden.device).index_add(0, rows, token_logps)
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
    dtype = _compute_dtype(lm)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def _compute_dtype(lm: nn.Module) -> torch.dtype:
    parameter: Any = next(lm.parameters())
    device_type = parameter.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return parameter.dtype
