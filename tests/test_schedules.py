"""Masking dynamics: the reference's linear easy-to-hard schedule exactly, the other
kinds, by epoch and by step, and bad input."""

import math

import pytest

from anatomask_fast import masking_schedule


def test_default_is_the_reference_linear_schedule():
    total = 7
    schedule = masking_schedule(total_epochs=total)
    for epoch in range(total):
        assert schedule(epoch) == 0.5 * (epoch + 1) / (total - 1)  # the published formula, exactly
    assert schedule(5, step=3) == schedule(5)  # by epoch: constant within an epoch


def test_kinds_by_epoch():
    T = 10 - 1
    hard_to_easy = masking_schedule("hard_to_easy", total_epochs=10)
    assert [hard_to_easy(e) for e in (0, T)] == [0.5, 0.0]
    assert hard_to_easy(3) == 0.5 * (T - 3) / T
    cosine = masking_schedule("cosine", total_epochs=10, start=0.1, end=0.4)
    assert cosine(0) == pytest.approx(0.1) and cosine(T) == pytest.approx(0.4)
    assert cosine(4) == pytest.approx(0.1 + 0.3 * (1 - math.cos(math.pi * 4 / T)) / 2)
    assert masking_schedule(0.3, total_epochs=10)(7) == 0.3
    assert masking_schedule("constant", total_epochs=10, value=0.2)(0) == 0.2
    step = masking_schedule("step", total_epochs=10, milestones=[3, 6], values=[0.0, 0.2, 0.4])
    assert [step(e) for e in (0, 2, 3, 5, 6, 9)] == [0.0, 0.0, 0.2, 0.2, 0.4, 0.4]
    custom = masking_schedule(lambda t: 0.05 * t, total_epochs=10)
    assert custom(4) == pytest.approx(0.2)


def test_by_step():
    schedule = masking_schedule("linear", total_epochs=3, steps_per_epoch=4)
    units = 3 * 4
    assert schedule(0, 0) == 0.5 * 1 / (units - 1)
    assert schedule(1, 2) == 0.5 * (1 * 4 + 2 + 1) / (units - 1)
    values = [schedule(e, s) for e in range(3) for s in range(4)]
    assert values == sorted(values) and len(set(values)) == units


def test_built_in_kinds_are_clipped_to_one():
    schedule = masking_schedule("linear", total_epochs=3, max_frac=1.0)
    assert schedule(1) == 1.0 and schedule(2) == 1.0  # (e + 1) / T reaches 1.5


@pytest.mark.parametrize(
    "make,call,error,match",
    [
        (lambda: masking_schedule(total_epochs=1), None, ValueError, r"'linear' needs at least 2"),
        (
            lambda: masking_schedule(total_epochs=0),
            None,
            ValueError,
            r"'total_epochs' must be >= 1, got 0",
        ),
        (
            lambda: masking_schedule(total_epochs=2.5),
            None,
            TypeError,
            r"'total_epochs' must be an int, got float",
        ),
        (
            lambda: masking_schedule("exponential", total_epochs=5),
            None,
            ValueError,
            r"'kind' must be one of",
        ),
        (
            lambda: masking_schedule("step", total_epochs=5, milestones=[2], values=[0.1]),
            None,
            ValueError,
            r"len\(values\) == len\(milestones\) \+ 1",
        ),
        (
            lambda: masking_schedule("cosine", total_epochs=5, middle=0.2),
            None,
            TypeError,
            r"bad parameters for 'cosine'",
        ),
        (
            lambda: masking_schedule(total_epochs=5),
            lambda s: s(5),
            ValueError,
            r"'epoch' must be < total_epochs=5, got 5",
        ),
        (
            lambda: masking_schedule(total_epochs=5),
            lambda s: s(-1),
            ValueError,
            r"'epoch' must be >= 0, got -1",
        ),
        (
            lambda: masking_schedule(total_epochs=5, steps_per_epoch=3),
            lambda s: s(1, 3),
            ValueError,
            r"'step' must be < steps_per_epoch=3, got 3",
        ),
        (
            lambda: masking_schedule(lambda t: 2.0, total_epochs=5),
            lambda s: s(1),
            ValueError,
            r"gave hard_frac=2.0 at t=1; it must be in \[0, 1\]",
        ),
    ],
)
def test_bad_input(make, call, error, match):
    with pytest.raises(error, match=match):
        schedule = make()
        call(schedule)
