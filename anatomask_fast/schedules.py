"""Masking dynamics: how ``hard_frac`` (the share of hidden patches chosen by their
error) evolves over pretraining; the published one rises linearly, easy to hard,
``hard_frac(e) = 0.5 * (e + 1) / (E - 1)`` at 0-based epoch ``e`` of ``E``.

``masking_schedule(kind, total_epochs=..., steps_per_epoch=None, **params)`` returns a
callable ``schedule(epoch, step=0) -> hard_frac``. By epoch (the reference's way, the
default) the value is constant within an epoch: ``t = epoch`` over ``total_epochs``
units. With ``steps_per_epoch`` it moves every step: ``t = epoch * steps_per_epoch +
step`` over ``total_epochs * steps_per_epoch`` units. With ``T`` the last unit's index
(units - 1), the kinds are:

- ``"linear"`` (easy to hard, the reference's default): ``max_frac * (t + 1) / T``,
  ``max_frac = 0.5``; by epoch this is exactly ``0.5 * (e + 1) / (total_epochs - 1)``;
- ``"hard_to_easy"``: its mirror, ``max_frac * (T - t) / T``;
- ``"constant"``: ``value``; a bare float is the same;
- ``"cosine"``: ``start + (end - start) * (1 - cos(pi * t / T)) / 2``, ``start = 0``,
  ``end = 0.5`` (swap them for hard to easy);
- ``"step"``: ``values[i]`` for ``t`` in ``[milestones[i-1], milestones[i])``, with
  ``len(values) == len(milestones) + 1`` and milestones in the schedule's unit;
- any callable ``f(t) -> float``.

Built-in kinds are clipped to [0, 1] (the linear one exceeds 0.5 slightly at the last
epoch, as in the reference); a callable's values must lie in [0, 1].
"""

from __future__ import annotations

import bisect
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

Curve = Callable[[int], float]


def _linear(T: int, max_frac: float = 0.5) -> Curve:
    return lambda t: max_frac * (t + 1) / T


def _hard_to_easy(T: int, max_frac: float = 0.5) -> Curve:
    return lambda t: max_frac * (T - t) / T


def _constant(T: int, value: float) -> Curve:
    return lambda t: value


def _cosine(T: int, start: float = 0.0, end: float = 0.5) -> Curve:
    return lambda t: start + (end - start) * (1 - math.cos(math.pi * t / T)) / 2


def _step(T: int, milestones: Sequence[int], values: Sequence[float]) -> Curve:
    if len(values) != len(milestones) + 1 or list(milestones) != sorted(milestones):
        raise ValueError(
            "masking_schedule: 'step' needs ascending 'milestones' and "
            f"len(values) == len(milestones) + 1, got milestones={list(milestones)}"
            f" and values={list(values)}"
        )
    return lambda t: values[bisect.bisect_right(milestones, t)]


KINDS: dict[str, Callable[..., Curve]] = {
    "linear": _linear,
    "hard_to_easy": _hard_to_easy,
    "constant": _constant,
    "cosine": _cosine,
    "step": _step,
}


def _check_count(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"masking_schedule: '{name}' must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"masking_schedule: '{name}' must be >= {minimum}, got {value}")
    return int(value)


@dataclass(frozen=True)
class MaskingSchedule:
    """``hard_frac`` at (epoch, step); see the module's documentation."""

    curve: Curve
    name: str
    total_epochs: int
    steps_per_epoch: int | None
    clip: bool

    def __call__(self, epoch: int, step: int = 0) -> float:
        epoch = _check_count("epoch", epoch, 0)
        if epoch >= self.total_epochs:
            raise ValueError(
                f"masking_schedule: 'epoch' must be < total_epochs={self.total_epochs}, got {epoch}"
            )
        t = epoch
        if self.steps_per_epoch is not None:
            step = _check_count("step", step, 0)
            if step >= self.steps_per_epoch:
                raise ValueError(
                    f"masking_schedule: 'step' must be < steps_per_epoch="
                    f"{self.steps_per_epoch}, got {step}"
                )
            t = epoch * self.steps_per_epoch + step
        value = float(self.curve(t))
        if self.clip:
            return min(1.0, max(0.0, value))
        if not 0.0 <= value <= 1.0:
            raise ValueError(
                f"masking_schedule: {self.name} gave hard_frac={value} at t={t}; "
                "it must be in [0, 1]"
            )
        return value


def masking_schedule(
    kind: str | float | Curve = "linear",
    *,
    total_epochs: int,
    steps_per_epoch: int | None = None,
    **params,
) -> MaskingSchedule:
    """The schedule ``schedule(epoch, step=0) -> hard_frac``; ``kind`` as listed in
    the module's documentation, ``params`` that kind's parameters."""
    total_epochs = _check_count("total_epochs", total_epochs, 1)
    units = total_epochs
    if steps_per_epoch is not None:
        units *= _check_count("steps_per_epoch", steps_per_epoch, 1)
    if isinstance(kind, numbers.Real) and not isinstance(kind, bool):
        kind, params = "constant", {"value": float(kind), **params}
    if callable(kind):
        if params:
            raise TypeError(
                f"masking_schedule: a callable takes no parameters, got {sorted(params)}"
            )
        return MaskingSchedule(
            kind,
            getattr(kind, "__name__", "the callable"),
            total_epochs,
            steps_per_epoch,
            clip=False,
        )
    if kind not in KINDS:
        raise ValueError(
            f"masking_schedule: 'kind' must be one of {sorted(KINDS)}, a float or "
            f"a callable, got {kind!r}"
        )
    if units < 2 and kind in ("linear", "hard_to_easy", "cosine"):
        raise ValueError(
            f"masking_schedule: {kind!r} needs at least 2 epochs (or steps), got {units}"
        )
    try:
        curve = KINDS[kind](units - 1, **params)
    except TypeError as error:
        raise TypeError(f"masking_schedule: bad parameters for {kind!r}: {error}") from None
    return MaskingSchedule(curve, repr(kind), total_epochs, steps_per_epoch, clip=True)
