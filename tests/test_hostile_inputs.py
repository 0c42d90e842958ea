"""No input reachable from Python crashes the process or passes silently (issue 19):
every hostile case of tests/hostile_cases.py, through the public API under the
reference, C++ and Triton (interpreted) backends and through the raw operators,
raises the error it names, with a message naming the argument.

All cases run in one child process (cases that used to segfault cannot take pytest
down); a case that kills the child is reported as a crash and the rest run on in a
fresh child."""

from __future__ import annotations

import re

import pytest

from tests import hostile_cases
from tests.hostile_runner import SELFTEST_CRASH, run_cases

NAMES = hostile_cases.names()


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, dict]:
    return run_cases(NAMES, tmp_path_factory.mktemp("hostile") / "results.jsonl")


@pytest.mark.parametrize("name", NAMES)
def test_hostile_input_is_a_clear_error(outcomes, name):
    case = hostile_cases.CASES[name.partition("@")[0]]
    got = outcomes[name]
    assert got["error"] != "crash", f"{name} crashed the process: {got['message']}"
    if case.error is None:
        assert got["error"] is None, f"{name} raised {got['error']}: {got['message']}"
        return
    assert got["error"] == case.error.__name__, (
        f"{name}: expected {case.error.__name__}, got {got['error']}: {got['message']}"
    )
    assert re.search(case.match, got["message"]), (
        f"{name}: message does not match {case.match!r}: {got['message']}"
    )


def test_runner_isolates_a_crash(tmp_path):
    """A case that kills its process is reported as a crash, and the cases after it
    still run (in a fresh process)."""
    names = ["raw.gather_tokens.x_2d@cpp", "selftest.segfault", "raw.densify.x_int@triton"]
    got = run_cases(names, tmp_path / "results.jsonl", env={SELFTEST_CRASH: "selftest.segfault"})
    assert got["selftest.segfault"]["error"] == "crash"
    assert got["raw.gather_tokens.x_2d@cpp"]["error"] == "ValueError"
    assert got["raw.densify.x_int@triton"]["error"] == "TypeError"
