"""Pretrained STU-Net files that the field's loaders accept for ``-pretrained_weights``:
nnU-Net v2's ``load_pretrained_weights`` and STU-Net's ``load_stunet_pretrained_weights``
read ``network_weights`` from a ``.pth`` file and assert that it holds every tensor of
the six-stage network (the heads too for nnU-Net's). AnatoMask pretrains stages 0-4, so
the file holds the whole STU-Net of that size with the pretrained stages 0-4 and stage
5, the decoder and the heads at STU-Net's initialization (PyTorch's default, as
STU-Net's trainers build it), said so under ``anatomask_fast``.

Re-export for an nnU-Net plans configuration (strides) and a class count::

    python -m anatomask_fast.models.export --encoder runs/pretrain/encoder.pt \\
        --plans nnUNetPlans.json --configuration 3d_fullres --num-classes 14 --out FILE.pth
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from ..serialization import safe_load
from .plans import load_geometry
from .segmentation import STUNet, load_encoder

FORMAT = "anatomask_fast.stunet_pretrained/1"
PRETRAINED = tuple(f"conv_blocks_context.{s}." for s in range(5))
NOTE = (
    "AnatoMask-pretrained STU-Net encoder stages 0-4 (conv_blocks_context.0-4); stage 5 "
    "(conv_blocks_context.5), upsample_layers, conv_blocks_localization and seg_outputs "
    "are at STU-Net's initialization (not pretrained)"
)


def pretrained_network(
    encoder: dict[str, torch.Tensor],
    size: str,
    in_channels: int,
    *,
    num_classes: int = 2,
    strides: Sequence[Sequence[int]] | None = None,
    seed: int = 0,
) -> STUNet:
    """The six-stage STU-Net with ``encoder`` (the five pretrained stages' tensors) in
    stages 0-4 and the rest freshly initialized (seeded)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = STUNet(size, in_channels, num_classes, strides=strides)
    own = model.state_dict()
    missing = [k for k in own if k.startswith(PRETRAINED) and k not in encoder]
    wrong = [
        f"{k}: file {tuple(encoder[k].shape)}, model {tuple(own[k].shape)}"
        for k in own
        if k.startswith(PRETRAINED) and k in encoder and encoder[k].shape != own[k].shape
    ]
    if missing or wrong:
        raise ValueError(
            f"encoder weights do not fit STU-Net-{size} stages 0-4 with "
            f"{in_channels} input channel(s): missing {missing[:3]}, "
            f"shape mismatches {wrong[:3]}"
        )
    model.load_state_dict({k: encoder[k] for k in own if k.startswith(PRETRAINED)}, strict=False)
    return model


def export_pretrained(
    encoder: dict[str, torch.Tensor],
    path: str | Path,
    *,
    size: str,
    in_channels: int,
    num_classes: int = 2,
    strides: Sequence[Sequence[int]] | None = None,
    source: str = "",
    save=torch.save,
) -> Path:
    """Writes ``{"network_weights": <the whole STU-Net>, "anatomask_fast": {...}}``
    (plain tensors, lists and strings: loadable with ``weights_only=True``)."""
    model = pretrained_network(encoder, size, in_channels, num_classes=num_classes, strides=strides)
    weights = model.state_dict()  # a network of its own: nothing else holds these tensors
    meta = {
        "format": FORMAT,
        "size": size,
        "in_channels": in_channels,
        "num_classes": num_classes,
        "strides": [list(s) for s in model.strides],
        "kernels": [list(k) for k in model.kernels],
        "source": source,
        "pretrained": [p.rstrip(".") for p in PRETRAINED],
        "fresh": [
            "conv_blocks_context.5",
            "upsample_layers",
            "conv_blocks_localization",
            "seg_outputs",
        ],
        "note": NOTE,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save({"network_weights": weights, "anatomask_fast": meta}, path)
    return path


def _encoder_from_file(
    path: Path, size: str | None, in_channels: int | None
) -> tuple[dict[str, torch.Tensor], str, int]:
    saved = safe_load(path, "encoder weights")
    size = size or saved.get("size")
    if size is None:
        raise ValueError(f"{path}: the file does not name its STU-Net size: pass --size")
    in_channels = in_channels or saved.get("in_channels") or 1
    probe = STUNet(size, in_channels, 2, checkpointing=False)
    load_encoder(probe, path, verbose=False)
    return (
        {k: v for k, v in probe.state_dict().items() if k.startswith(PRETRAINED)},
        size,
        in_channels,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m anatomask_fast.models.export", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--encoder", required=True, help="encoder.pt or a pretraining checkpoint of this library"
    )
    parser.add_argument("--out", required=True, help="the .pth file to write")
    parser.add_argument("--plans", help="nnUNetPlans.json: take the strides from it")
    parser.add_argument("--configuration", default="3d_fullres")
    parser.add_argument(
        "--num-classes",
        type=int,
        default=2,
        help="segmentation heads' classes (nnU-Net's loader checks them)",
    )
    parser.add_argument("--size", help="tiny, S, B, L, H (default: the file's)")
    parser.add_argument("--in-channels", type=int, help="default: the file's")
    args = parser.parse_args(argv)
    try:
        if not args.out.endswith(".pth"):
            raise ValueError(
                f"--out must end in .pth (STU-Net's loader reads "
                f"network_weights only from .pth files), got {args.out}"
            )
        encoder, size, in_channels = _encoder_from_file(
            Path(args.encoder), args.size, args.in_channels
        )
        strides = load_geometry(args.plans, args.configuration).strides if args.plans else None
        path = export_pretrained(
            encoder,
            args.out,
            size=size,
            in_channels=in_channels,
            num_classes=args.num_classes,
            strides=strides,
            source=str(args.encoder),
        )
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"wrote {path}: STU-Net-{size}, {in_channels} input channel(s), "
        f"{args.num_classes} classes; {NOTE}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
