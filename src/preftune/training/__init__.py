"""The training loop and what it decides and keeps: the loop itself (``loop``), the reference
(``reference``), checkpoints and resume (``checkpoint``), the optimizer and schedule (``optim``),
callbacks, the metric log and trackers (``callbacks``, ``runlog``, ``trackers``), stop signals
(``interrupts``), ``train.compile`` and ``train.bf16`` decided once per run (``compile_choice``,
``precision``), and the memory planner (``plan``)."""
