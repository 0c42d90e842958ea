"""``python -m anatomask_fast.train [pretrain|finetune|predict|preprocess] [flags]``; with no
flags, the embedded pretraining demonstration (a procedural phantom, the tiny model, a
few minutes on a CPU); ``finetune`` with no flags is the fine-tuning demonstration.

Exit status: 0 done (or stopped by --stop-after-steps, resumable); 2 a usage or input
fault (one line on stderr naming the file or flag; the last checkpoint is intact);
3 stopped by SIGTERM / SIGUSR1 after writing a resumable checkpoint."""
from __future__ import annotations

import argparse
import sys

from . import config as cfg

JOBS = ("pretrain", "finetune", "predict", "preprocess")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m anatomask_fast.train",
        description="AnatoMask training on anatomask_fast kernels. Without a command: "
                    "pretrain (with no flags, the embedded demonstration).",
        epilog="exit status: 0 done or stopped by --stop-after-steps; 2 bad input (a "
               "one-line error); 3 stopped by SIGTERM/SIGUSR1 with a resumable checkpoint")
    jobs = parser.add_subparsers(dest="job", required=True, metavar="{" + ",".join(JOBS) + "}")
    for name, config_type, summary in (
            ("pretrain", cfg.PretrainConfig, "AnatoMask masked-image-modeling pretraining"),
            ("finetune", cfg.FinetuneConfig, "STU-Net segmentation fine-tuning"),
            ("predict", cfg.PredictConfig, "label maps of a folder of volumes"),
            ("preprocess", cfg.PreprocessConfig, "pre-process a raw dataset into a store")):
        job = jobs.add_parser(name, help=summary, description=config_type.__doc__)
        cfg.add_arguments(job, config_type)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv.insert(0, "pretrain")
    args = _parser().parse_args(argv)
    from .runtime import EXIT_PREEMPTED, NonFiniteLoss, Preempted

    if args.job == "pretrain":
        from .pretrain import run
        config = cfg.from_arguments(args, cfg.PretrainConfig)
    elif args.job == "finetune":
        from .finetune import run
        config = cfg.from_arguments(args, cfg.FinetuneConfig)
    elif args.job == "preprocess":
        from .inputs import run_preprocess as run
        config = cfg.from_arguments(args, cfg.PreprocessConfig)
    else:
        from .predict import run
        config = cfg.from_arguments(args, cfg.PredictConfig)
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
