"""``python -m anatomask_fast.train [pretrain] [flags]``; with no flags, the embedded
demonstration (a procedural phantom, the tiny model, a few minutes on a CPU)."""
from __future__ import annotations

import argparse
import sys

from . import config as cfg


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        argv.insert(0, "pretrain")
    parser = argparse.ArgumentParser(prog="python -m anatomask_fast.train",
                                     description="AnatoMask training on anatomask_fast kernels")
    jobs = parser.add_subparsers(dest="job", required=True)
    pretrain = jobs.add_parser("pretrain", help="AnatoMask masked-image-modeling pretraining",
                               description=cfg.PretrainConfig.__doc__)
    cfg.add_arguments(pretrain, cfg.PretrainConfig)
    args = parser.parse_args(argv)
    if args.job == "pretrain":
        from .pretrain import NonFiniteLoss, run
        from .data import DataError

        try:
            run(cfg.from_arguments(args, cfg.PretrainConfig))
        except (DataError, NonFiniteLoss, ValueError, FileNotFoundError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
