"""Load the policy, the reference and the tokenizer from local folders; LoRA; freezing.

Loading is the real ``from_pretrained`` path on a local folder, safetensors only (pickled
``.bin`` weights can run code when loaded), and no remote code unless the config says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from preftune.config import LoraConfig, ModelConfig
from preftune.errors import PreftuneError
from preftune.logprobs import completion_logps

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _check_folder(path: str, what: str) -> Path:
    folder = Path(path).expanduser()
    if not str(path):
        raise PreftuneError(f"no {what} given: set model.path to a local model folder.")
    if not folder.is_dir():
        raise PreftuneError(f"{what} '{path}' is not a folder (models load from local folders only).")
    return folder


def load_tokenizer(path: str, *, trust_remote_code: bool = False) -> Any:
    """A tokenizer from a local folder; it gets a pad token (EOS) when it has none.

    Padding is always masked by position, never by token id, so reusing EOS as the pad token
    cannot hide a real EOS from the loss.
    """
    from transformers import AutoTokenizer

    folder = _check_folder(path, "tokenizer folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise PreftuneError(f"could not load a tokenizer from '{folder}': {err}") from None
    if tokenizer.eos_token_id is None:
        raise PreftuneError(f"the tokenizer in '{folder}' has no EOS token; preftune ends every completion with EOS.")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(cfg: ModelConfig, path: str | None = None) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` on a local folder, safetensors only."""
    from transformers import AutoModelForCausalLM

    folder = _check_folder(path or cfg.path, "model folder")
    if not any(folder.glob("*.safetensors")):
        found = sorted(p.name for p in folder.iterdir())[:8]
        raise PreftuneError(
            f"'{folder}' holds no .safetensors weights (found: {', '.join(found) or 'nothing'}); "
            "preftune loads safetensors only. Convert with model.save_pretrained(dir, safe_serialization=True)."
        )
    kwargs: dict[str, Any] = {
        "dtype": DTYPES[cfg.dtype],
        "use_safetensors": True,
        "trust_remote_code": cfg.trust_remote_code,
    }
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError) as err:
        raise PreftuneError(f"could not load a causal LM from '{folder}': {err}") from None
    return model


def apply_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Wrap ``model`` with LoRA adapters; only the adapters are trainable."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, peft_cfg)
    except ValueError as err:
        raise PreftuneError(f"could not add LoRA adapters: {err}") from None


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode (dropout off) and no gradients: what a reference model must be."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def enable_gradient_checkpointing(model: nn.Module) -> None:
    # Non-reentrant checkpointing works with frozen inputs (LoRA) and with autocast.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    model.config.use_cache = False


def load_policy(cfg: ModelConfig) -> nn.Module:
    """The trainable policy: loaded, LoRA-wrapped when asked, checkpointing when asked."""
    model = load_causal_lm(cfg)
    model.config.use_cache = False
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


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

    def __init__(self, model: nn.Module, *, chunk_size: int = 1024) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        lm = causal_lm_of(self.model)
        hidden = body_of(lm)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=False).last_hidden_state
        return self.head_logps(lm, hidden, labels)

    def head_logps(self, lm: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``completion_logps`` through ``lm``'s output projection (its scale and soft-cap, if any)."""
        head = lm.get_output_embeddings()
        config = lm.config
        return completion_logps(
            hidden,
            head.weight,
            labels,
            bias=getattr(head, "bias", None),
            chunk_size=self.chunk_size,
            logit_scale=float(getattr(config, "logit_scale", None) or 1.0),
            final_logit_softcap=getattr(config, "final_logit_softcapping", None),
        )
