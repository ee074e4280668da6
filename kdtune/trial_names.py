"""Short, readable names for trials and their folders.

Ray names a trial folder after the whole config
(``distill_trainable_a7886cc7_29_alpha=0.3724,amp=False,batch_size=32,...``),
which nobody can read and which hits length limits on some filesystems.
:func:`trial_dirname` and :func:`trial_name` give instead the hyperparameters a
person looks for, then the trial id, which keeps the name unique::

    w8-T4.62-a0.37-4f102fef            a search trial
    w8-T4.62-a0.37-b0.5-n0.1-4f102fef  with feature loss (beta) and noise
    baseline-w8-e8111_00000            a hard-label baseline of width 8

Pass them to Ray as ``TuneConfig(trial_dirname_creator=trial_dirname,
trial_name_creator=trial_name)``. Whatever the style, a trial folder is found
again by its id: :func:`folder_patterns` gives the globs that match both Ray's
long names (``*_<id>_*``) and these short ones (``*-<id>``).
"""

from __future__ import annotations

import re
from typing import Any

from kdtune.study import folder_patterns, trial_config  # noqa: F401  (folder_patterns: re-exported)

#: Longest folder name written; the trial id is always kept whole at the end.
MAX_DIRNAME = 96
#: Config keys shown, with their one-letter labels, when the trial has them.
#: beta and noise appear only when non-zero, since most studies keep them at 0.
_SHOWN = (("width", "w"), ("temperature", "T"), ("alpha", "a"), ("beta", "b"), ("noise", "n"))
_OPTIONAL = {"beta", "noise"}
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _number(value: Any) -> str | None:
    """``value`` to 3 significant digits ("8", "4.62", "0.37"), or None when it is not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)  # numpy scalars
        except (TypeError, ValueError):
            return None
    return f"{float(value):.3g}"


def _effective_config(config: Any) -> dict[str, Any]:
    return trial_config(dict(config or {}))


def _is_baseline(config: dict[str, Any]) -> bool:
    return config.get("phase") == "baseline" or bool(config.get("overrides"))


def _label_parts(trial: Any) -> list[str]:
    """The parts of a trial's label before its id: ["w8", "T4.62", "a0.37"] or ["baseline", "w8"]."""
    raw = dict(getattr(trial, "config", None) or {})
    config = _effective_config(raw)
    parts: list[str] = []
    shown = _SHOWN
    if _is_baseline(raw):
        parts.append("baseline")
        shown = (("width", "w"),)  # a baseline is alpha=1, beta=0, noise=0: only its width tells it apart
    for key, label in shown:
        text = _number(config.get(key))
        if text is None or (key in _OPTIONAL and float(text) == 0.0):
            continue
        parts.append(f"{label}{text}")
    return parts


def trial_name(trial: Any) -> str:
    """A readable label of a Ray trial: its width, temperature and alpha (beta and
    noise when non-zero), or ``baseline-w<width>`` for a baseline, then its trial id.

    ``trial`` is anything with ``.config`` (the trial's config dict; baseline
    values may sit in ``config["overrides"]``) and ``.trial_id``.
    """
    return "-".join([*_label_parts(trial), str(trial.trial_id)])


def trial_dirname(trial: Any) -> str:
    """:func:`trial_name` made filesystem-safe (letters, digits, ``.``, ``_``, ``-``)
    and at most :data:`MAX_DIRNAME` characters, the trial id always kept whole at the end."""
    trial_id = _UNSAFE.sub("_", str(trial.trial_id)).strip(".") or "trial"
    prefix = _UNSAFE.sub("_", "-".join(_label_parts(trial)))
    prefix = prefix[: max(MAX_DIRNAME - len(trial_id) - 1, 0)].rstrip("-.")
    return f"{prefix}-{trial_id}" if prefix else trial_id


