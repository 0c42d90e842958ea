"""The command line as a new user meets it: the help (every command in one line, flags
by group with choices and defaults), flags checked at parse time in the flag's name
before any work, the same checks on a config built in Python, and files written with
the usual permissions."""

import os
import re
import stat

import pytest

from anatomask_fast.train import checkpoint as ckpt
from anatomask_fast.train import config as cfg
from anatomask_fast.train.__main__ import JOBS, main


def help_text(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out


def test_top_level_help_lists_every_command_in_one_line(capsys):
    text = help_text(capsys)
    for command in [*JOBS, "guidance"]:
        (line,) = [l for l in text.splitlines() if l.split()[:1] == [command]]
        index = text.splitlines().index(line)
        following = text.splitlines()[index + 1]
        assert len(line.split()) > 4, line  # the summary on the same line
        assert following.split()[:1] in ([c] for c in [*JOBS, "guidance"]) or not following
    assert "exit status" in text and "pretrain -> finetune -> predict" in text


@pytest.mark.parametrize("job", list(JOBS))
def test_help_groups_every_flag_and_shows_its_default(capsys, job):
    text = help_text(capsys, job)
    groups = re.findall(r"^(\w[\w ()]*) options:$", text, flags=re.M)
    assert set(groups) <= {*cfg.GROUPS.values()} and "data" in groups
    flags = re.findall(r"^  (--[\w-]+)", text, flags=re.M)
    assert len(flags) == len(__import__("dataclasses").fields(JOBS[job][0]))
    entries = re.split(r"\n  (?=--)", text.split("options:", 2)[-1])
    for entry in entries[1:]:
        entry = " ".join(entry.split())
        assert "(default: " in entry or "(required)" in entry, entry
        assert "(default: )" not in entry and "(default: None)" not in entry, entry


def test_help_shows_choices_and_the_demo_defaults(capsys):
    text = " ".join(help_text(capsys, "finetune").split())
    assert "--size {tiny,S,B,L,H}" in text and "--amp {none,bf16,fp16}" in text
    assert "share of crops centred on a labelled voxel (default: 0.33; demo 0.5)" in text
    text = " ".join(help_text(capsys, "pretrain").split())
    assert "share of hidden patches (default: 0.6)" in text and "--reference-compatible" in text
    text = " ".join(help_text(capsys, "predict").split())
    assert "--input INPUT [INPUT ...]" in text and "--no-mirroring" in text


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["pretrain", "--crop", "0", "0", "0"],
            "argument --crop: expected a whole number >= 1, got 0",
        ),
        (
            ["pretrain", "--crop", "24", "32", "32"],
            "argument --crop: each size must be a multiple of 16 (the masking patch",
        ),
        (
            ["pretrain", "--size", "XL"],
            "argument --size: invalid choice: 'XL' (choose from 'tiny', 'S', 'B', 'L', 'H')",
        ),
        (["pretrain", "--mask-ratio", "1.5"], "argument --mask-ratio: expected a number in (0, 1)"),
        (["pretrain", "--batch-size", "0"], "argument --batch-size: expected a whole number >= 1"),
        (
            ["pretrain", "--epochs", "two"],
            "argument --epochs: expected a whole number >= 1, got 'two'",
        ),
        (["pretrain", "--lr", "-1"], "argument --lr: expected a number > 0, got -1"),
        (
            ["pretrain", "--reference-compatible", "--decay-exempt"],
            "argument --reference-compatible: the published step cannot be combined with "
            "--decay-exempt",
        ),
        (
            ["finetune", "--crop", "64", "64", "48"],
            "argument --crop: each size must be a multiple of 32 (STU-Net's total stride",
        ),
        (["finetune", "--foreground", "1.5"], "argument --foreground: expected a number in [0, 1]"),
        (["finetune", "--sw-overlap", "1"], "argument --sw-overlap: expected a number in [0, 1)"),
        (
            ["finetune", "--plans", "/nonexistent/plans.json"],
            "argument --plans: plans file /nonexistent/plans.json does not exist",
        ),
        (
            ["finetune", "--no-checkpointing", "--recompute-levels", "2"],
            "argument --recompute-levels: needs --checkpointing",
        ),
        (["predict"], "the following arguments are required: --input"),
        (
            ["predict", "--input", "x", "--overlap", "-0.5"],
            "argument --overlap: expected a number in [0, 1)",
        ),
        (["preprocess", "--data", "x"], "the following arguments are required: --out"),
    ],
)
def test_bad_flags_fail_before_any_work_naming_the_flag(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        main(
            [
                *argv,
                *(["--out", str(tmp_path / "run")] if argv[0] in ("pretrain", "finetune") else []),
            ]
        )
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert message in " ".join(err.split()), err
    assert len(err.strip().splitlines()) == 2  # the short usage, then the error
    assert not (tmp_path / "run").exists()  # nothing started


@pytest.mark.parametrize(
    "config,message",
    [
        (cfg.PretrainConfig(crop=(0, 32, 32)), "argument --crop: expected a whole number >= 1"),
        (cfg.PretrainConfig(size="XL"), "argument --size: invalid choice: 'XL'"),
        (cfg.FinetuneConfig(foreground=2.0), "argument --foreground: expected a number in [0, 1]"),
        (cfg.PredictConfig(), "argument --input is required"),
    ],
)
def test_configs_built_in_python_get_the_same_checks(config, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        cfg.check(config.resolved() if hasattr(config, "resolved") else config)


def test_a_valid_config_passes():
    cfg.check(cfg.PretrainConfig(crop=(32, 48, 64)).resolved())
    cfg.check(cfg.FinetuneConfig().resolved())
    cfg.check(cfg.PredictConfig(input=("a.nii.gz",)))


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_written_files_get_the_umask_s_mode_not_0600(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        assert ckpt.file_mode() == mode
        for write, name in (
            (lambda p: ckpt.atomic_save({"a": 1}, p), "c.pt"),
            (lambda p: ckpt.atomic_write_text("{}", p), "config.json"),
            (lambda p: ckpt.atomic_write_bytes(b"x", p), "label.nii.gz"),
        ):
            write(tmp_path / name)
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
    finally:
        os.umask(previous)
