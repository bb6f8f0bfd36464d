"""A trial's point in the search space, as overrides of the main job.

Define-by-run: the group is drawn first, and K only when the group is 'none' (an a:b group fixes
how many channels are kept, so a K drawn for it would be a parameter with no effect that the
sampler would still try to learn from).
"""

from __future__ import annotations

from typing import Any

from moc_lightning.search.settings import NO_GROUP


def suggest(trial: Any, space: dict, d_ffn: int) -> tuple[list[str], dict[str, Any]]:
    """(main-job overrides, what was chosen: group, placement, k) for `trial` (an optuna Trial)."""
    group = trial.suggest_categorical("group", space["group"])
    placement = trial.suggest_categorical("placement", space["placement"])
    overrides = [f"ffn.placement={placement}"]
    chosen: dict[str, Any] = {"group": group, "placement": placement}
    if group == NO_GROUP:
        if "k_fraction" in space:
            spec = space["k_fraction"]
            fraction = trial.suggest_float("k_fraction", spec["low"], spec["high"], step=spec["step"], log=spec["log"])
            k = min(d_ffn, max(1, round(fraction * d_ffn)))
        else:
            spec = space["k"]
            k = min(d_ffn, trial.suggest_int("k", spec["low"], spec["high"], step=spec["step"] or 1, log=spec["log"]))
        overrides += [f"ffn.k={k}", "ffn.group=null"]
        chosen["k"] = k
    else:
        overrides.append(f"ffn.group={group}")
        a, b = (int(p) for p in group.split(":"))
        chosen["k"] = (d_ffn // b) * a + min(a, d_ffn % b)  # channels kept per token, as FFNConfig counts them
    return overrides, chosen
