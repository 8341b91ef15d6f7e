"""The training loop and what it decides and keeps.

- ``loop``: the one loop every stage trains with (``fit``); ``task``: what a stage hands it (a
  ``Task``) and how the data is cut into batches; ``evaluate``: the held-out evaluation it runs;
- ``runplan``: the run's decisions, made once where it starts (resume point, processes, global
  batch, data digests, precision, compile, planned steps); ``precision`` and ``compile_choice``:
  ``train.bf16`` and ``train.compile`` decided;
- ``reference``: the reference model (a frozen copy, the adapter switched off, a cache on disk);
- ``checkpoint`` and ``manifest``: checkpoints, their ``manifest.json`` and resume;
  ``sharded_checkpoint`` and ``sharding``: the same under FSDP2;
- ``optim``: the optimizer and schedule; ``callbacks``, ``runlog``, ``trackers``: what a run tells
  (callbacks, ``metrics.jsonl``, TensorBoard, W&B, MLflow); ``interrupts``: stop signals;
- ``memory``: the memory planner (``preftune plan``), the per-device bytes of a training step.
"""
