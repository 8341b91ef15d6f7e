"""preftune: align causal language models with human preferences (DPO and its family).

The command line is `preftune VERB` (:mod:`preftune.cli`). From Python, each training stage is
`preftune.stages.STAGE.run(cfg)` (dpo, sft, rm) on a config from :mod:`preftune.config`, and
`preftune.stages.STAGE.build_task(cfg)` gives the pieces the one loop trains. Importing this
package imports nothing heavy.
"""

__version__ = "0.1.0"
