"""``python -m anatomask_fast.train [pretrain|finetune|predict|preprocess] [flags]``; with no
flags, the embedded pretraining demonstration (a procedural phantom, the tiny model, a
few minutes on a CPU); ``finetune`` with no flags is the fine-tuning demonstration."""
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
    finetune = jobs.add_parser("finetune", help="STU-Net segmentation fine-tuning",
                               description=cfg.FinetuneConfig.__doc__)
    cfg.add_arguments(finetune, cfg.FinetuneConfig)
    predict = jobs.add_parser("predict", help="label maps of a folder of volumes",
                              description=cfg.PredictConfig.__doc__)
    cfg.add_arguments(predict, cfg.PredictConfig)
    preprocess = jobs.add_parser("preprocess", help="pre-process a raw dataset into a store",
                                 description=cfg.PreprocessConfig.__doc__)
    cfg.add_arguments(preprocess, cfg.PreprocessConfig)
    args = parser.parse_args(argv)
    from .data import DataError
    from .runtime import NonFiniteLoss

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
    except (DataError, NonFiniteLoss, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
