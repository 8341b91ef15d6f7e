"""What fits on a device, from the model's config alone: ``preftune plan CONFIG.yaml``.

The model's ``config.json`` (read with ``AutoConfig``; a local folder or a hub-cache id, no
weights loaded) gives the shapes of a Llama-family decoder: vocabulary ``V``, hidden ``h``,
layers ``L``, key/value width ``kv`` (``kv_heads x head_dim``), MLP width ``m``, tied head or not.
The run's config gives the rest (dtype, LoRA, reference strategy, checkpointing, bf16, batch,
lengths, log-prob chunk). Per device, in bytes (``p`` = bytes per parameter of ``model.dtype``):

- **parameters** ``P x p``: P counted exactly, by building the model on the meta device (no
  memory, no weights) and counting, for every architecture transformers can build; otherwise from
  the Llama-family shapes (biases and norms included), and the plan says it is approximate;
- **gradients** ``T x p`` for the ``T`` trainable parameters (all of them, or LoRA's);
- **optimizer** AdamW ``2 T x p`` (exp_avg, exp_avg_sq in the parameter's dtype), RMSprop ``T x p``, SGD 0;
- **reference** ``P x p`` for a frozen copy (under bf16 autocast its decoder layers' matrices are held
  in bf16, 2 bytes each: :func:`preftune.training.reference.layer_matrices_to_bf16`); 0 for the
  adapter switched off, the on-disk cache, or none;
- **activations**: what the policy's forward keeps for the backward pass, per token of a row
  (measured on CPU for seven Llama shapes and three key/value widths, SDPA attention, and
  fitted to within a few bytes per token by)::

      L x [ resid x (2h + 2h if the norms train)                         norm inputs, normalised states
            + act x (2h + 2kv + 3m                                        q, k, v, attention out; MLP gate, SiLU, up
                     + h if q/k/v train + h if gate/up train + m if down trains   linear inputs kept for weight grads
                     + LoRA: h per adapted group + r per adapted module)
            + 4 x W if a 4D block mask (prefix sharing)  + 24 ]
      + resid x 2h + 32  (final norm; ids, labels, masks)   + act x h per scored token

  with ``resid`` = ``act`` = ``p`` (``resid`` 4 and ``act`` 2 under bf16 autocast: the residual
  stream stays fp32) and ``W`` the row width. Gradient checkpointing keeps ``L x resid x h`` per
  token plus one layer recomputed in full during the backward pass. Tokens: DPO and RM score
  ``2B`` rows of ``prompt + completion`` (DPO with prefix sharing: ``B`` rows of ``prompt + 2
  completions``), SFT ``B`` rows, all padded to the configured lengths. Attention is taken as a fused kernel (SDPA's flash / memory-efficient, or
  FlashAttention): no ``heads x W x W`` scores are kept; eager attention keeps them and is not planned.
- **log-prob chunks** (:mod:`preftune.logprobs`): ``2 x c x V x 4`` bytes of fp32 logits and their
  exponentials, ``c = min(train.logprob_chunk_size, scored tokens)``, plus in the backward
  pass the head's fp32 gradient ``V x h x 4`` when the head trains;
- **bf16 autocast** over fp32 weights keeps a bf16 copy of every trainable matrix for the step (``2 x T`` bytes).

The step's peak is ``parameters + reference + optimizer + max(activations + chunks, gradients +
chunks)`` (the gradients fill as the activations are freed; measured so). DDP adds a second copy of
the gradients (its all-reduce buckets; ``gradient_as_bucket_view`` off, accelerate's default).
FSDP / ZeRO-3 divide parameters, gradients, optimizer state and the reference by the devices and
add two gathered layers (the one running and the next, prefetched; in bf16 under bf16, as
``train.sharding=fsdp`` gathers them); activations are not sharded.
The reference's forward pass and the cache pass run without gradients and hold less than the step.

The peak is LIVE TENSOR bytes, what a device's memory must hold. A process's resident memory
(RSS) adds the libraries (about 0.35 GiB of torch and transformers on CPU) and the allocator's
slack; the CUDA caching allocator adds its own.

Checked (``tests/test_plan.py``) against the peak of live tensor bytes of real training steps on
CPU (``preftune.dpo``, ``sft``, ``reward_model``), recorded by torch's profiler (``profile_memory``:
every allocation and free of the CPU allocator, replayed in time order, plus the parameters that
exist before): DPO single, cached reference, LoRA, gradient checkpointing, bf16 autocast and the
concatenated layout, SFT, RM, and DDP and FSDP (``train.sharding=fsdp``) per process (2 processes,
gloo), within 25%; each process's RSS is recorded beside it (docs/scale.md). ZeRO-3 is not
measured (DeepSpeed is not run here); GPU kernels' workspaces and the CUDA caching allocator's
fragmentation are not modelled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from preftune.errors import PreftuneError
from preftune.system.hardware import default_device

GiB = 2**30
UNITS = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "kb": 10**3, "m": 2**20, "mib": 2**20, "mb": 10**6,
         "g": GiB, "gib": GiB, "gb": 10**9, "t": 2**40, "tib": 2**40, "tb": 10**12}
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_IN = ("gate_proj", "up_proj")


@dataclass(frozen=True)
class Shape:
    """A decoder's sizes, read from its config."""

    vocab: int
    hidden: int
    layers: int
    kv: int  # key/value width: kv heads x head dim
    q: int  # query width: heads x head dim
    mlp: int
    tied: bool
    qkv_bias: bool = False
    counted: int | None = None  # parameters counted on a meta-device build; None: only the Llama formula

    def modules(self) -> dict[str, tuple[int, int]]:
        """Each layer's linear maps: name -> (in, out)."""
        h, m = self.hidden, self.mlp
        return {"q_proj": (h, self.q), "k_proj": (h, self.kv), "v_proj": (h, self.kv), "o_proj": (self.q, h),
                "gate_proj": (h, m), "up_proj": (h, m), "down_proj": (m, h)}

    def layer_params(self) -> int:
        bias = self.q + 2 * self.kv if self.qkv_bias else 0
        return sum(i * o for i, o in self.modules().values()) + bias + 2 * self.hidden

    def params(self) -> int:
        if self.counted is not None:
            return self.counted
        head = 0 if self.tied else self.vocab * self.hidden
        return self.vocab * self.hidden + self.layers * self.layer_params() + self.hidden + head


def shape_of(config: Any) -> Shape:
    """The :class:`Shape` of a transformers ``PretrainedConfig`` (Llama, Qwen2, Mistral and kin)."""
    text = getattr(config, "text_config", None) or config
    experts = max(int(getattr(text, name, None) or 0) for name in ("num_local_experts", "num_experts", "n_routed_experts"))
    if experts > 1:
        raise PreftuneError(f"the model ({text.model_type}) is a mixture of {experts} experts; the planner knows dense decoders "
                            "only (Llama, Qwen2, Mistral and kin), and would undercount its parameters.")
    try:
        hidden, layers, heads = int(text.hidden_size), int(text.num_hidden_layers), int(text.num_attention_heads)
        head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
        kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
        return Shape(vocab=int(text.vocab_size), hidden=hidden, layers=layers, kv=kv_heads * head_dim, q=heads * head_dim,
                     mlp=int(text.intermediate_size), tied=bool(getattr(config, "tie_word_embeddings", False)),
                     qkv_bias=bool(getattr(text, "attention_bias", False) or text.model_type == "qwen2"),
                     counted=count_on_meta(config))
    except (AttributeError, TypeError) as err:
        raise PreftuneError(f"the model config ({getattr(config, 'model_type', '?')}) is not a decoder the planner knows "
                            f"(needs hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, vocab_size): {err}") from None


def count_on_meta(config: Any) -> int | None:
    """The parameters of the causal LM ``config`` describes, built on the meta device (shapes only,
    no memory) and counted (tied weights once); None where transformers cannot build it."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 - an architecture transformers cannot build here: the formula stands, said approximate
        return None
    return sum(p.numel() for p in model.parameters())


def load_shape(path: str, *, trust_remote_code: bool = False) -> Shape:
    """The model's shape from its ``config.json`` alone (a folder or a hub-cache id): no weights are read."""
    from pathlib import Path

    from transformers import AutoConfig

    from preftune.models.tokenizer import tiny_hint
    from preftune.system.hub import looks_like_repo_id, no_local, snapshot

    folder = Path(str(path)).expanduser()
    if not folder.is_dir():
        if not str(path) or not looks_like_repo_id(str(path)):
            raise PreftuneError(f"model.path: {no_local(str(path))}{tiny_hint(str(path))}; nor can it be a Hugging Face hub id (org/name).")
        folder = snapshot(str(path), "model.path", patterns=["config.json"], hint=tiny_hint(str(path)))
    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        raise PreftuneError(f"could not read a model config in '{folder}': {type(err).__name__}: {err}") from None
    return shape_of(config)


def parse_bytes(text: str) -> int:
    """``80GiB``, ``80G`` (both 2**30), ``80GB`` (10**9), ``512MiB``... -> bytes."""
    value = str(text).strip().lower().replace(" ", "")
    number = value.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = value[len(number):]
    try:
        amount = float(number)
    except ValueError:
        amount = -1.0
    if unit not in UNITS or amount <= 0:
        raise PreftuneError(f"--device-memory '{text}' is not a memory size; expected a number and a unit, e.g. 80GiB, 24GB or 512MiB.")
    return int(amount * UNITS[unit])


@dataclass(frozen=True)
class Setup:
    """One way to run the step: what trains, where the reference comes from, how it is split."""

    name: str
    stage: str  # dpo, sft or rm
    batch: int  # pairs (dpo, rm) or rows (sft) per device and micro-batch
    prompt_tokens: int
    completion_tokens: int
    prefix_sharing: bool
    chunk: int
    dtype: str
    optimizer: str
    lora: tuple[str, ...] = ()  # LoRA's target modules; empty: full fine-tuning
    lora_r: int = 16
    reference: str = "copy"  # copy, adapter, cache, none
    checkpointing: bool = False
    bf16: bool = False  # autocast
    sharding: str = "none"  # none, ddp, fsdp
    devices: int = 1


def rows_and_width(s: Setup) -> tuple[int, int, int]:
    """(rows, row width, scored tokens) of one micro-batch."""
    p, c = s.prompt_tokens, s.completion_tokens
    if s.stage == "sft":
        return s.batch, p + c, s.batch * c
    if s.prefix_sharing and s.stage == "dpo":
        return s.batch, p + 2 * c, 2 * s.batch * c
    return 2 * s.batch, p + c, 2 * s.batch * c


def estimate(shape: Shape, s: Setup) -> dict[str, int]:
    """Per-device bytes of each part of one training step, and their ``peak`` (module docstring)."""
    h, m, kv, L, V = shape.hidden, shape.mlp, shape.kv, shape.layers, shape.vocab
    p = BYTES[s.dtype]
    total = shape.params()
    modules = shape.modules()
    adapted = [t for t in s.lora if t in modules]
    trainable = sum(s.lora_r * sum(modules[t]) for t in adapted) * L if s.lora else total
    state = {"adamw": 2, "rmsprop": 1, "sgd": 0}[s.optimizer]
    mixed = s.bf16 and s.dtype == "float32"  # autocast over fp32 weights; over bf16 weights it changes nothing
    matrices = L * sum(i * o for i, o in modules.values())  # the decoder layers' linear maps
    reference = (matrices * 2 + (total - matrices) * p) if mixed else total * p  # bf16: the copy's layer matrices in bf16
    parts = {"parameters": total * p, "gradients": trainable * p, "optimizer": state * trainable * p,
             "reference": reference if s.reference == "copy" else 0}
    resid, act = (4, 2) if mixed else (p, p)
    full = not s.lora
    rows, width, scored = rows_and_width(s)
    tokens = rows * width
    layer = resid * (2 * h + (2 * h if full else 0))
    layer += act * (2 * h + 2 * kv + 3 * m + (2 * h + m if full else 0))
    if s.lora:
        layer += act * (h * (any(t in ATTENTION for t in adapted) + any(t in MLP_IN for t in adapted))
                        + m * ("down_proj" in adapted) + s.lora_r * len(adapted))
    layer += 24 + (4 * width if s.prefix_sharing and s.stage == "dpo" else 0)
    outside = tokens * (resid * 2 * h + 32) + scored * act * h
    if s.checkpointing:
        parts["activations"] = tokens * L * resid * h + tokens * layer + outside
    else:
        parts["activations"] = tokens * L * layer + outside
    chunk = min(s.chunk, max(scored, 1)) * V * 4 * 2
    parts["logprob_chunks"] = chunk + (V * h * 4 if full else 0)
    parts["autocast_copies"] = 2 * trainable if mixed else 0
    if s.sharding == "ddp":
        parts["ddp_buckets"] = parts["gradients"]
    if s.sharding == "fsdp":
        for key in ("parameters", "gradients", "optimizer", "reference"):
            parts[key] = math.ceil(parts[key] / s.devices)
        parts["gathered_layers"] = 2 * shape.layer_params() * (2 if mixed else p)  # bf16: FSDP2 gathers the layers in bf16
    fixed = parts["parameters"] + parts["reference"] + parts["optimizer"] + parts["autocast_copies"]
    fixed += parts.get("ddp_buckets", 0) + parts.get("gathered_layers", 0)
    parts["peak"] = fixed + max(parts["activations"], parts["gradients"]) + parts["logprob_chunks"]
    parts["trainable_params"], parts["params"], parts["tokens"] = trainable, total, tokens
    return parts


def largest_batch(shape: Shape, s: Setup, memory: int, limit: int = 1 << 16) -> int:
    """The largest per-device batch whose peak fits in ``memory`` (0: not even one)."""
    if estimate(shape, replace(s, batch=1))["peak"] > memory:
        return 0
    lo, hi = 1, 2
    while hi <= limit and estimate(shape, replace(s, batch=hi))["peak"] <= memory:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if estimate(shape, replace(s, batch=mid))["peak"] <= memory else (lo, mid)
    return lo


def base_setup(cfg: Any, stage: str, *, prompt_tokens: int | None = None, completion_tokens: int | None = None,
               params: int = 0) -> Setup:
    """The step as the run's config describes it (rows padded to the configured lengths); ``train.bf16``
    auto resolved for this machine's device and a model of ``params`` parameters, as a run would."""

    from preftune.training.precision import decide

    data, model, train = cfg.data, cfg.model, cfg.train
    prompt = prompt_tokens if prompt_tokens is not None else (data.max_prompt_length or data.max_length // 2)
    completion = completion_tokens if completion_tokens is not None else max(data.max_length - prompt, 1)
    reference = getattr(getattr(cfg, "reference", None), "strategy", "none") if stage == "dpo" else "none"
    if reference == "auto":
        reference = "adapter" if model.lora.enabled else "copy"
    return Setup(name="as configured", stage=stage, batch=train.batch_size, prompt_tokens=prompt, completion_tokens=completion,
                 prefix_sharing=data.prefix_sharing, chunk=train.logprob_chunk_size, dtype=model.dtype, optimizer=train.optimizer,
                 lora=tuple(model.lora.target_modules) if model.lora.enabled else (), lora_r=model.lora.r, reference=reference,
                 checkpointing=model.gradient_checkpointing,
                 bf16=decide(train.bf16, default_device().type, params).bf16)


def strategies(base: Setup, devices: int) -> list[Setup]:
    """The configured step, and each strategy applied to it alone."""
    targets = base.lora or ("q_proj", "k_proj", "v_proj", "o_proj")
    rows = [replace(base, name="single"), replace(base, name=f"DDP x{devices}", sharding="ddp", devices=devices),
            replace(base, name=f"FSDP/ZeRO-3 x{devices}", sharding="fsdp", devices=devices),
            replace(base, name="LoRA", lora=targets, reference="adapter" if base.reference == "copy" else base.reference)]
    if base.stage == "dpo":
        rows.append(replace(base, name="cached reference", reference="cache"))
    rows += [replace(base, name="gradient checkpointing", checkpointing=True), replace(base, name="bf16 autocast", bf16=True)]
    return rows


def plan(shape: Shape, base: Setup, devices: int, memory: int) -> dict[str, Any]:
    """Every strategy's per-device estimate, whether it fits, and the largest batch that does."""
    out = []
    for s in strategies(base, devices):
        parts = estimate(shape, s)
        out.append({"strategy": s.name, "devices": s.devices, "batch": s.batch, "fits": parts["peak"] <= memory,
                    "largest_batch": largest_batch(shape, s, memory), "bytes": parts})
    exact = "exact (counted on a meta-device build)" if shape.counted is not None else \
        "approximate (transformers could not build this architecture here: counted as a Llama-family decoder)"
    return {"params": shape.params(), "params_counted": exact, "device_memory": memory, "devices": devices, "stage": base.stage,
            "tokens": {"prompt": base.prompt_tokens, "completion": base.completion_tokens}, "strategies": out}


COLUMNS = (("parameters", "params"), ("gradients", "grads"), ("optimizer", "optim"), ("reference", "ref"),
           ("activations", "activ"), ("logprob_chunks", "chunks"), ("peak", "peak"))


def format_plan(result: dict[str, Any]) -> str:
    """The plan as a table, GiB per device."""
    counted = result["params_counted"].split(" (")[0]
    head = (f"{result['params'] / 1e9:.2f}B parameters ({counted}); {result['stage']}, prompt {result['tokens']['prompt']} + completion "
            f"{result['tokens']['completion']} tokens; {result['device_memory'] / GiB:.1f} GiB per device, {result['devices']} device(s)")
    names = ["strategy"] + [short for _, short in COLUMNS] + ["fits", "max batch"]
    rows = [[r["strategy"]] + [f"{r['bytes'][key] / GiB:.2f}" for key, _ in COLUMNS]
            + [f"yes (b={r['batch']})" if r["fits"] else f"no (b={r['batch']})", str(r["largest_batch"])] for r in result["strategies"]]
    widths = [max(len(str(x)) for x in column) for column in zip(names, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([head, "GiB of live tensors per device (batch per device; DDP adds its gradient buckets, FSDP its gathered "
                            "layers; a process's RSS adds the libraries, ~0.35 GiB on CPU)",
                      line(names), *map(line, rows)]) + "\n"
