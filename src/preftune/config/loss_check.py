"""The checks of ``loss``: the loss exists, its settings are in range and each one is used.

The loss functions' own signatures and range checks are the rule (:func:`preftune.losses.check_settings`),
so a loss and its settings cannot drift apart: "X is not used by loss Y (it takes: ...)".
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any


def loss_problems(loss: Any) -> list[str]:
    """The loss exists, its settings are in range, and no setting is given that it does not use."""
    from preftune.losses import LOSSES, check_settings, loss_hparam_names

    names = [loss.name] if isinstance(loss.name, str) else list(loss.name)
    for name in names:
        if name not in LOSSES:
            match = difflib.get_close_matches(name, list(LOSSES), n=1)
            hint = f" Did you mean '{match[0]}'?" if match else ""
            return [f"name '{name}' is not a loss.{hint} Known: {', '.join(sorted(LOSSES))}"]
    if not names:
        return ["name is an empty list; give a loss, or a list of losses with weights"]
    label = names[0] if len(names) == 1 else "+".join(names)
    problems = []
    if loss.weights is not None and len(names) == 1:
        problems.append("weights is for a list of losses (name: [dpo, sft]); it has no meaning for one loss")
    for name in ("nll_alpha", "desirable_weight", "undesirable_weight", "lambda_"):
        if getattr(loss, name) < 0:
            problems.append(f"{name} must be >= 0")
    # A setting the chosen loss does not read would be silently ignored: say which ones it reads.
    own = set(loss_hparam_names(names)) | {"name", "nll_alpha", "use_weighting", "ld_alpha"} | ({"weights"} if len(names) > 1 else set())
    if loss.ld_alpha is not None and not 0.0 <= loss.ld_alpha <= 1.0:
        problems.append(f"ld_alpha must be in [0, 1] (1: plain summed log-probs; null: off), got {loss.ld_alpha}")
    if loss.use_weighting and {"aot", "aot_unpaired"} & set(names):
        problems.append("use_weighting (WPO) weights pairs, and aot's terms are of ranks across the batch: not with aot")
    defaults = type(loss)()
    unused = [f.name for f in dataclasses.fields(loss)
              if f.name not in own and getattr(loss, f.name) != getattr(defaults, f.name)]
    if unused:
        takes = ", ".join(sorted(own - {"name"}))
        problems.append(f"{', '.join(unused)} {'is' if len(unused) == 1 else 'are'} not used by loss '{label}' "
                        f"(it takes: {takes})")
    if problems or "kto" in names:
        return problems
    values = {name: getattr(loss, name) for name in loss_hparam_names(names)}
    try:  # the loss functions' own range checks, so config and function cannot disagree
        check_settings(names, loss.weights, **values)
    except ValueError as err:
        problems.append(str(err))
    return problems
