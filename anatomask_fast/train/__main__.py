"""``python -m anatomask_fast.train [pretrain|finetune|predict|preprocess|guidance] [flags]``;
with no flags, the embedded pretraining demonstration (a procedural phantom, the tiny
model, a few minutes on a CPU); ``finetune`` with no flags is the fine-tuning
demonstration.

Every flag is checked before any work starts (its type, range and choices, then the
rules between flags): a bad one ends the command with argparse's usage line and an
error naming the flag, exit status 2.

Exit status: 0 done (or stopped by --stop-after-steps, resumable); 2 a usage or input
fault (one line on stderr naming the file or flag; the last checkpoint is intact);
3 stopped by SIGTERM / SIGUSR1 after writing a resumable checkpoint."""

from __future__ import annotations

import argparse
import inspect
import sys

from . import config as cfg

# name -> (configuration, the one line of the top-level help)
JOBS = {
    "pretrain": (cfg.PretrainConfig, "AnatoMask pretraining of an STU-Net encoder (the default)"),
    "finetune": (
        cfg.FinetuneConfig,
        "STU-Net segmentation, from a pretrained encoder or from scratch",
    ),
    "predict": (cfg.PredictConfig, "label maps (NIfTI) of new volumes from a fine-tuned model"),
    "preprocess": (cfg.PreprocessConfig, "a raw dataset into a store, once (training does it too)"),
}
GUIDANCE = "does a pretraining run's mask hide anatomy? (its own flags)"


class _Help(argparse.RawDescriptionHelpFormatter):
    """Wide enough that each command's summary stays on its line."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32, width=100)


class _Commands(argparse.RawDescriptionHelpFormatter):
    """The top-level help, every command's summary on its command's line (argparse sizes
    the name column from the metavar, "COMMAND [flags]", not from the names)."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=18, width=100)


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog="python -m anatomask_fast.train",
        formatter_class=_Commands,
        description="AnatoMask training on anatomask_fast kernels. Without a command: "
        "pretrain (with no flags, the embedded demonstration). The usual order: "
        "pretrain -> finetune -> predict, and guidance to inspect a pretraining "
        "run. 'COMMAND --help' lists a command's flags by group, with choices "
        "and defaults.",
        epilog="exit status: 0 done or stopped by --stop-after-steps; 2 bad input (a "
        "one-line error naming the flag or file); 3 stopped by SIGTERM/SIGUSR1 with a "
        "resumable checkpoint",
    )
    jobs = parser.add_subparsers(
        dest="job", required=True, title="commands", metavar="COMMAND [flags]"
    )
    commands = {}
    for name, (config_type, summary) in JOBS.items():
        commands[name] = jobs.add_parser(
            name,
            help=summary,
            description=inspect.cleandoc(config_type.__doc__),
            usage="%(prog)s [flags]  (--help lists them by group)",
            formatter_class=_Help,
        )
        cfg.add_arguments(commands[name], config_type)
    jobs.add_parser("guidance", help=GUIDANCE, add_help=False)
    return parser, commands


def parse(argv: list[str]) -> object:
    """The job's configuration, resolved and checked; argparse's exit (status 2, the
    command's usage and the flag named) on any bad flag, before any work."""
    parser, commands = _parser()
    args = parser.parse_args(argv)
    config = cfg.from_arguments(args, JOBS[args.job][0])
    if hasattr(config, "resolved"):
        config = config.resolved()
    try:
        cfg.check(config)
    except ValueError as error:
        commands[args.job].error(str(error))
    return config


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv.insert(0, "pretrain")
    if argv[0] == "guidance":
        from ..guidance import main as guidance

        return guidance(argv[1:])
    config = parse(argv)
    from .runtime import EXIT_PREEMPTED, Preempted
    from .step import NonFiniteLoss

    job = type(config)
    if job is cfg.PretrainConfig:
        from .pretrain import run
    elif job is cfg.FinetuneConfig:
        from .finetune import run
    elif job is cfg.PreprocessConfig:
        from .inputs import run_preprocess as run
    else:
        from .predict import run
    try:
        run(config)
    except Preempted as stop:
        print(f"anatomask_fast: {stop}", file=sys.stderr)
        return EXIT_PREEMPTED
    # DataError, CheckpointError (ValueError), WriteError, FileNotFoundError (OSError):
    # messages that name the file or flag. Any other error keeps its traceback (a bug).
    except (ValueError, OSError, NonFiniteLoss) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
