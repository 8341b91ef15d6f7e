"""One process, one TRL run (``python -m benchmarks.run_trl ...``; bench.py runs it
through :mod:`benchmarks.runners`).

TRL 1.16's ``DPOTrainer`` as a user runs it: the model given as a folder, the text records,
its own tokenization and collator. Only what the issue fixes is set: batch 8, max length 512,
beta 0.1, lr 5e-6 (constant), fp32, no gradient checkpointing (TRL turns it on by default),
the reference computed on the fly (``precompute_ref_log_probs=False``). The records are fed in
preftune's random batch order with TRL's sequential sampler, so both train on the same batches
in the same order, and TRL's tokenization is checked to give exactly preftune's ids.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from benchmarks.common import (
    TRL_RUNS,
    Settings,
    StepClock,
    batch_order,
    child_main,
    preftune_pairs,
    real_tokens,
    result,
)


def trl_config(settings: Settings, output_dir: Path, *, bf16: bool = False) -> Any:
    from trl import DPOConfig

    return DPOConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=1,
        max_steps=settings.total_steps,
        learning_rate=settings.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=settings.beta,
        loss_type=["sigmoid"],
        max_length=settings.max_length,
        precompute_ref_log_probs=False,
        bf16=bf16,
        fp16=False,
        gradient_checkpointing=False,
        model_init_kwargs={"dtype": "float32"},
        train_sampling_strategy="sequential",
        seed=settings.seed,
        use_cpu=True,
        logging_strategy="steps",
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
    )


def run(name: str, settings: Settings, fixtures: Path, workdir: Path, *, records_path: Path | None = None,
        out_name: str | None = None) -> dict[str, Any]:
    """Train with TRL for warm-up + timed steps; return the JSON record. ``records_path`` replaces
    the fixture's records, ``out_name`` the output folder's name (the sweep's runs)."""
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOTrainer

    from benchmarks.fixtures import Fixtures

    spec = TRL_RUNS[name]
    fx = Fixtures(fixtures)
    model_dir, records_path = fx.model(settings.model), records_path or fx.records(settings.smoke)
    out_dir = workdir / (out_name or name)
    shutil.rmtree(out_dir, ignore_errors=True)
    pairs = preftune_pairs(settings, model_dir, records_path, out_dir)
    order = batch_order(len(pairs), [p.length for p in pairs], settings, grouped=False)[: settings.total_steps]
    flat = [i for batch in order for i in batch]
    records = [json.loads(line) for line in records_path.read_text(encoding="utf-8").splitlines()]
    dataset = Dataset.from_list([records[i] for i in flat])

    clock = StepClock()
    logged: list[dict[str, float]] = []

    class Measure(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            clock.mark(0)

        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            clock.mark(state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
            if logs and "loss" in logs:
                logged.append(dict(logs))

    peft_config = None
    if spec.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=0.0,
                                 target_modules=list(settings.lora_targets), task_type="CAUSAL_LM")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    trainer = DPOTrainer(model=str(model_dir), args=trl_config(settings, out_dir, bf16=spec.bf16), train_dataset=dataset,
                         processing_class=tokenizer, peft_config=peft_config, callbacks=[Measure()])
    _check_same_ids(trainer.train_dataset, [pairs[i] for i in flat])
    trainer.train()

    timed = [pairs[i] for batch in order[settings.warmup_steps :] for i in batch]
    tokens = sum(real_tokens(p) for p in timed)
    if len(logged) != settings.total_steps:
        raise RuntimeError(f"{name}: expected {settings.total_steps} logged steps, got {len(logged)}")
    metrics = {key: [line[key] for line in logged] for key in ("rewards/margins", "logps/chosen", "logps/rejected")}
    return result(run=name, framework="trl", settings=settings, model_dir=model_dir, seconds=clock.timed_seconds(settings),
                  tokens=tokens, reference_tokens=tokens, losses=[line["loss"] for line in logged], metrics=metrics,
                  extra={"trl_run": {"env": spec.env, "lora": spec.lora, "bf16": spec.bf16, "note": spec.note}, "bf16": spec.bf16,
                         "train_seconds": clock.marks[settings.total_steps] - clock.marks[0]})  # every step, warm-up included


def _check_same_ids(dataset: Any, pairs: list) -> None:
    """TRL's prompt/chosen/rejected ids must be preftune's, record by record: same inputs, same math."""
    for k, pair in enumerate(pairs):
        row = dataset[k]
        if (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) != (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids):
            raise RuntimeError(f"TRL tokenized record {pair.index} differently from preftune; the runs would not be comparable")


def main() -> None:
    child_main(run, __doc__)


if __name__ == "__main__":
    main()
