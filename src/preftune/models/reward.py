"""Reward models: a causal LM backbone plus ``Linear(hidden, 1, bias=False)``; save, load, export.

The reward of a sequence is the head applied to the final hidden state of its last real token
(the last position whose attention mask is 1), so it does not depend on the padding side or
amount. Training is :mod:`preftune.stages.rm` (the objective: :func:`preftune.losses.bradley_terry`).

Saved folders hold the backbone as a normal causal LM (``save_pretrained``), the tokenizer,
``reward_head.safetensors`` and ``reward_model.json``; :func:`load_reward_model` loads them in
one call. Where ``transformers`` has a sequence-classification class for the architecture, a
copy is also written to ``seq_cls/`` (loadable with ``AutoModelForSequenceClassification``).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from preftune.config.schema import ModelConfig
from preftune.errors import PreftuneError
from preftune.logprobs import completion_logps
from preftune.models.load import load_causal_lm, unsharded_replica
from preftune.models.scorers import body_of, causal_lm_of
from preftune.models.tokenizer import load_tokenizer
from preftune.system.progress import batches

HEAD_FILE = "reward_head.safetensors"
META_FILE = "reward_model.json"


class RewardModel(nn.Module):
    """A causal LM with a scalar head read at each row's last real token."""

    def __init__(self, lm: nn.Module, head: nn.Linear | None = None, *, chunk_size: int = 1024) -> None:
        super().__init__()
        self.lm = lm
        hidden = lm.config.hidden_size if hasattr(lm.config, "hidden_size") else lm.get_output_embeddings().weight.shape[1]
        if head is None:
            head = nn.Linear(hidden, 1, bias=False)
            # small init so initial rewards are near 0 (as transformers initialises its score heads)
            std = getattr(lm.config, "initializer_range", 0.02)
            nn.init.normal_(head.weight, std=std)
            head.to(next(lm.parameters()).dtype)
        self.head = head
        self.chunk_size = chunk_size

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(rewards (rows,), summed completion log-probs or None, token counts or None)."""
        lm = causal_lm_of(self.lm)
        hidden = body_of(lm)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (attention_mask.long() * positions).argmax(dim=1)  # last real token, any padding side
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        rewards = self.head(pooled.to(self.head.weight.dtype)).squeeze(-1).float()
        if labels is None:
            return rewards, None, None
        head = lm.get_output_embeddings()
        logps, tokens = completion_logps(hidden, head.weight, labels, bias=getattr(head, "bias", None), chunk_size=self.chunk_size)
        return rewards, logps, tokens


def save_reward_model(model: RewardModel, tokenizer: Any, folder: Path, *, seq_cls: bool = True,
                      state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Backbone (causal LM), tokenizer, head, metadata; and ``seq_cls/`` where possible (and asked).
    ``state_dict``: the weights to write instead of the model's own (a sharded run's, gathered
    onto the CPU): they are loaded into an unsharded replica, which is what is written."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    if state_dict is not None:
        model = RewardModel(unsharded_replica(model.lm, next(iter(state_dict.values())).dtype), chunk_size=model.chunk_size)
        model.load_state_dict(state_dict)
    if hasattr(model.lm, "merge_and_unload"):  # LoRA: a reward model is used whole, so save it merged
        model = RewardModel(copy.deepcopy(model.lm).merge_and_unload(), model.head)
    model.lm.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    save_file({"weight": model.head.weight.detach().cpu().contiguous()}, str(folder / HEAD_FILE))
    meta = {"kind": "preftune-reward-model", "pooling": "last token with attention_mask 1", "hidden_size": model.head.in_features}
    meta["seq_cls"] = _export_seq_cls(model, tokenizer, folder / "seq_cls") if seq_cls else None
    (folder / META_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")


def _export_seq_cls(model: RewardModel, tokenizer: Any, folder: Path) -> str | None:
    """A transformers sequence-classification copy (num_labels=1), or None when the architecture
    has none. transformers pools at the last token that is not
    ``pad_token_id``: identical to ours when the pad token is not EOS."""
    from transformers import AutoModelForSequenceClassification

    lm = model.lm
    config = lm.config.__class__.from_dict(lm.config.to_dict())
    config.num_labels = 1
    config.pad_token_id = tokenizer.pad_token_id
    try:
        seq = AutoModelForSequenceClassification.from_config(config)
    except ValueError:
        return None
    seq_body = getattr(seq, seq.base_model_prefix)
    seq_body.load_state_dict(body_of(lm).state_dict())
    score = getattr(seq, "score", None)
    if not isinstance(score, nn.Linear) or score.weight.shape != model.head.weight.shape:
        return None
    score.weight.data.copy_(model.head.weight.data)
    seq.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    note = "" if tokenizer.pad_token_id != tokenizer.eos_token_id else " (pad == eos: transformers pools one token earlier than preftune)"
    return "seq_cls" + note


def load_reward_model(path: str | Path, *, device: torch.device | None = None) -> tuple[RewardModel, Any]:
    """A saved reward model and its tokenizer, in eval mode, on ``device`` (default CPU)."""
    from safetensors.torch import load_file

    folder = Path(path)
    if not (folder / HEAD_FILE).is_file():
        raise PreftuneError(f"{folder} is not a preftune reward model: {HEAD_FILE} is missing (train one with `preftune rm`).")
    lm = load_causal_lm(ModelConfig(path=str(folder)))
    weight = load_file(str(folder / HEAD_FILE))["weight"]
    head = nn.Linear(weight.shape[1], 1, bias=False).to(weight.dtype)
    head.weight.data.copy_(weight)
    model = RewardModel(lm, head).eval()
    if device is not None:
        model.to(device)
    return model, load_tokenizer(str(folder))


@torch.no_grad()
def score_responses(model: RewardModel, tokenizer: Any, prompts: list[Any], responses: list[Any], *,
                    batch_size: int = 16, system: str | None = None, progress: bool = False) -> list[float]:
    """Rewards of (prompt, response) pairs, tokenized exactly as in training (EOS appended)."""
    from preftune.data.collate import collate_unpaired
    from preftune.data.records import UnpairedExample
    from preftune.data.tokenize import tokenize_unpaired

    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    examples = [UnpairedExample(prompt=p, completion=r, desirable=True, system=system) for p, r in zip(prompts, responses)]
    limit = getattr(model.lm.config, "max_position_embeddings", 1 << 20)
    items = tokenize_unpaired(examples, tokenizer, max_length=limit, max_prompt_length=None, on_overflow="error")
    device = next(model.parameters()).device
    out: list[float] = []
    for start in batches(len(items), batch_size, desc="score", enabled=progress):
        batch = collate_unpaired(items[start:start + batch_size], tokenizer.pad_token_id)
        rewards, _, _ = model(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        out.extend(rewards.tolist())
    return out


