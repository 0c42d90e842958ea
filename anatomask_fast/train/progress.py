"""The progress bar of every long phase (building the store, training epochs,
validation, prediction): elapsed time, the time left at the rate so far, the rate."""

from __future__ import annotations

import sys

BAR_FORMAT = (
    "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} {unit}s "
    "[{elapsed} elapsed, {remaining} left, {rate_fmt}{postfix}]"
)


def progress_bar(
    total: int, desc: str, unit: str, *, done: int = 0, enabled: bool = True, leave: bool = True
):
    """A tqdm bar on stdout; ``enabled=False`` (a process other than the main one) shows
    nothing. ``leave=False`` for a phase inside another one's bar."""
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=done,
        disable=not enabled,
        file=sys.stdout,
        desc=desc,
        unit=unit,
        dynamic_ncols=True,
        leave=leave,
        bar_format=BAR_FORMAT,
    )
