"""Pretrained ResidualEncoderUNet files that nnU-Net and nnssl's fine-tuning load, and
the loader that starts this library's fine-tuning from them.

- **nnU-Net layout** (``nnUNetv2_train ... -pretrained_weights FILE``, nnunetv2 2.8.1's
  ``load_pretrained_weights``): ``network_weights`` is the whole network, since that
  loader asserts that every tensor of the target network except the heads is in the
  file with its shape: the encoder pretrained under both its names (``encoder.*`` and
  ``decoder.encoder.*``, one tensor), the U-Net decoder and the heads at nnU-Net's
  initialization (pretraining reconstructs through a light decoder of its own, which
  the segmentation network does not have), said so under ``anatomask_fast``.
- **nnssl format** (nnU-Net master's ``nnUNetv2_preprocess_like_nnssl`` /
  ``PretrainedTrainer``, which load the encoder and the stem only):
  ``checkpoint_final.pth`` with the same ``network_weights`` and an
  ``nnssl_adaptation_plan`` of plain values, and the plan again as
  ``adaptation_plan.json`` beside it (what nnssl's model sharing publishes).

Both load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..serialization import safe_load
from .resenc import KEY_TO_ENCODER, KEY_TO_STEM, KEYS_TO_IN_PROJ, ResEncArch, ResidualEncoderUNet

FORMAT = "anatomask_fast.resenc_pretrained/1"
PRETRAINED = ("encoder.", "decoder.encoder.")
FRESH = ["decoder.stages", "decoder.transpconvs", "decoder.seg_layers"]
NOTE = (
    "AnatoMask-pretrained encoder (encoder.stem, encoder.stages; the same tensors again "
    "as decoder.encoder.*); decoder.stages, decoder.transpconvs and decoder.seg_layers "
    "are at nnU-Net's initialization (not pretrained)"
)
# nnU-Net's normalization scheme of this library's pre-processing of each modality.
NORMALIZATION = {"CT": "CTNormalization", "MR": "ZScoreNormalization", "PET": "ZScoreNormalization"}
Save = Callable[[object, Path], object]


def pretrained_network(
    encoder: dict[str, torch.Tensor],
    arch: ResEncArch,
    in_channels: int,
    *,
    num_classes: int = 2,
    seed: int = 0,
) -> ResidualEncoderUNet:
    """The whole ResidualEncoderUNet, nnU-Net-initialized (seeded), with ``encoder``
    (the dense encoder's ``stem.*`` / ``stages.*`` tensors) loaded strictly."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ResidualEncoderUNet(arch, in_channels, num_classes).initialize()
    try:
        model.encoder.load_state_dict(encoder)
    except RuntimeError as error:
        raise ValueError(
            f"encoder weights do not fit the ResidualEncoderUNet "
            f"{arch.features} with {in_channels} input channel(s): "
            f"{' '.join(str(error).split())[:300]}"
        ) from None
    return model


def _meta(network: str, arch: ResEncArch, in_channels: int, num_classes: int, source: str) -> dict:
    return {
        "format": FORMAT,
        "network": network,
        "arch_kwargs": arch.arch_kwargs(),
        "in_channels": in_channels,
        "num_classes": num_classes,
        "source": source,
        "pretrained": [p.rstrip(".") for p in PRETRAINED],
        "fresh": FRESH,
        "note": NOTE,
    }


def minimal_plans(
    arch: ResEncArch,
    in_channels: int,
    patch_size: Sequence[int],
    spacing: Sequence[float] | None,
    modality: str,
    configuration: str = "3d_fullres",
) -> dict:
    """A plans dict describing the pretrained network (when no --plans was given)."""
    return {
        "plans_name": "anatomask_fast",
        "configurations": {
            configuration: {
                "patch_size": list(patch_size),
                "spacing": list(spacing) if spacing else None,
                "normalization_schemes": [NORMALIZATION[modality]] * in_channels,
                "architecture": arch.architecture(),
            }
        },
    }


def export_nnunet(
    model: ResidualEncoderUNet,
    path: str | Path,
    *,
    network: str,
    plans: dict,
    configuration: str,
    epochs: int,
    source: str = "",
    save: Save = torch.save,
) -> Path:
    """``model``'s weights in nnU-Net's checkpoint layout (``network_weights``,
    ``init_args`` with the plans, ``trainer_name``, ``current_epoch``)."""
    path = Path(path)
    save(
        {
            "network_weights": model.state_dict(),
            "init_args": {"plans": plans, "configuration": configuration},
            "trainer_name": "nnUNetTrainer",
            "current_epoch": epochs,
            "anatomask_fast": _meta(
                network, model.arch, model.in_channels, model.num_classes, source
            ),
        },
        path,
    )
    return path


def adaptation_plan(
    arch: ResEncArch,
    in_channels: int,
    patch_size: Sequence[int],
    spacing: Sequence[float] | None,
    modality: str,
    dataset_name: str,
) -> dict:
    """nnssl's ``AdaptationPlan`` (serialized) of this pretraining: the architecture
    (nnU-Net's arch_kwargs), the pretraining plan (its one configuration: spacing and
    patch size, what nnU-Net's adaptation reads) and the keys locating the encoder,
    the stem and the input projection."""
    style = (
        "noresample"
        if spacing is None
        else "onemmiso"
        if list(spacing) == [1.0, 1.0, 1.0]
        else "median"
    )
    configuration = {
        "data_identifier": f"anatomask_fast_{style}",
        "preprocessor_name": "anatomask_fast",
        "spacing_style": style,
        "normalization_schemes": [NORMALIZATION[modality]] * in_channels,
        "use_mask_for_norm": [False] * in_channels,
        "resampling_fn_data": "trilinear",
        "resampling_fn_data_kwargs": {},
        "resampling_fn_mask": "nearest",
        "resampling_fn_mask_kwargs": {},
        "spacing": [float(s) for s in spacing] if spacing is not None else None,
        "patch_size": [int(p) for p in patch_size],
    }
    return {
        "architecture_plans": {
            "arch_class_name": arch.architecture()["network_class_name"],
            "arch_kwargs": arch.arch_kwargs(),
            "arch_kwargs_requiring_import": arch.architecture()["_kw_requires_import"],
        },
        "pretrain_plan": {
            "dataset_name": dataset_name,
            "plans_name": "anatomask_fast",
            "original_median_spacing_after_transp": configuration["spacing"],
            "image_reader_writer": "NibabelReaderWriter",
            "transpose_forward": [0, 1, 2],
            "transpose_backward": [0, 1, 2],
            "configurations": {style: configuration},
            "experiment_planner_used": "anatomask_fast",
        },
        "pretrain_num_input_channels": in_channels,
        "recommended_downstream_patchsize": [int(p) for p in patch_size],
        "key_to_encoder": KEY_TO_ENCODER,
        "key_to_stem": KEY_TO_STEM,
        "keys_to_in_proj": list(KEYS_TO_IN_PROJ),
        "key_to_lpe": None,
    }


def export_nnssl(
    model: ResidualEncoderUNet,
    folder: str | Path,
    plan: dict,
    *,
    network: str,
    epochs: int,
    source: str = "",
    save: Save = torch.save,
    write_text: Callable[[str, Path], object] | None = None,
) -> Path:
    """``folder/checkpoint_final.pth`` (``network_weights``, ``nnssl_adaptation_plan``)
    and ``folder/adaptation_plan.json``; returns the checkpoint's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "checkpoint_final.pth"
    save(
        {
            "network_weights": model.state_dict(),
            "nnssl_adaptation_plan": plan,
            "trainer_name": "anatomask_fast AnatoMask",
            "current_epoch": epochs,
            "anatomask_fast": _meta(
                network, model.arch, model.in_channels, model.num_classes, source
            ),
        },
        path,
    )
    text = json.dumps(plan, indent=2) + "\n"
    if write_text is None:
        (folder / "adaptation_plan.json").write_text(text)
    else:
        write_text(text, folder / "adaptation_plan.json")
    return path


def _pretrained_weights(saved: dict, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The pretrained tensors of a file, under the segmentation network's names, and
    what the file is."""
    plan = saved.get("nnssl_adaptation_plan")
    weights = saved.get("network_weights")
    if isinstance(plan, dict) and isinstance(weights, dict):
        # As nnU-Net's adaptation: the encoder's stages and the stem, by the plan's keys.
        keys = (plan.get("key_to_encoder", KEY_TO_ENCODER), plan.get("key_to_stem", KEY_TO_STEM))
        return (
            {k: v for k, v in weights.items() if k.startswith(tuple(f"{k}." for k in keys))},
            "an nnssl checkpoint",
        )
    meta = saved.get("anatomask_fast")
    if isinstance(meta, dict) and isinstance(weights, dict):
        prefixes = tuple(f"{p}." for p in meta.get("pretrained", ()))
        return {k: v for k, v in weights.items() if k.startswith(prefixes)}, "a ResEnc export"
    if isinstance(saved.get("model"), dict):  # a pretraining checkpoint of this library
        return (
            {k: v for k, v in saved["model"].items() if k.startswith(PRETRAINED[0])},
            "a pretraining checkpoint",
        )
    raise ValueError(
        f"{path}: not an nnssl checkpoint (keys 'network_weights', "
        f"'nnssl_adaptation_plan'), a ResEnc export (keys 'network_weights', "
        f"'anatomask_fast') or a pretraining checkpoint (key 'model'); it has keys "
        f"{sorted(saved)[:8]}"
    )


def load_pretrained(
    model: ResidualEncoderUNet, path: str | Path, *, verbose: bool = True
) -> dict[str, list[str]]:
    """Loads the pretrained encoder (stem and stages) of ``path`` into ``model``,
    matched by name and shape; with one pretrained input channel and more here, the
    input projection repeated over them and divided by their number (nnU-Net's
    adaptation). Returns (and prints) what loaded and what starts fresh; raises when
    nothing fits."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights {path} do not exist")
    weights, kind = _pretrained_weights(safe_load(path, "pretrained weights"), path)
    own = model.state_dict()
    channels = model.in_channels
    fitting, mismatched = {}, []
    for name, value in weights.items():
        for alias in (name, f"decoder.{name}"):  # an encoder tensor has both names
            if alias not in own:
                continue
            target = own[alias]
            if (
                alias.rsplit(".", 1)[0] in KEYS_TO_IN_PROJ
                and value.dim() == 5
                and value.shape[1] == 1
                and target.shape[1] == channels > 1
            ):
                value = value.repeat(1, channels, 1, 1, 1) / channels
            if tuple(value.shape) == tuple(target.shape):
                fitting[alias] = value
            else:
                mismatched.append(
                    f"{alias}: file {tuple(value.shape)}, model {tuple(target.shape)}"
                )
    missing = [k for k in own if k.startswith(PRETRAINED[0]) and k not in fitting]
    if mismatched or missing:
        detail = mismatched[:3] + [f"{k} missing" for k in missing[:3]]
        raise ValueError(
            f"{path} ({kind}): the pretrained encoder does not fit the "
            f"ResidualEncoderUNet {model.arch.features} with {channels} input "
            f"channel(s) ({'; '.join(detail)})"
        )
    model.load_state_dict(fitting, strict=False)
    report = {
        "loaded": sorted(k for k in fitting if k.startswith(PRETRAINED[0])),
        "fresh": [
            name
            for name in ("encoder.stem", "encoder.stages", *FRESH)
            if not any(k.startswith(name + ".") for k in fitting)
        ],
    }
    if verbose:
        print(
            f"  pretrained weights from {path} ({kind}): {len(report['loaded'])} encoder "
            f"tensors loaded; starting fresh: {', '.join(report['fresh'])}"
        )
    return report
