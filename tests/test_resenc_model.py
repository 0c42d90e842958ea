"""nnU-Net's ResidualEncoderUNet here (``models/resenc.py``) against the real class of
dynamic-network-architectures, built by nnunetv2 from the same plans: every
state_dict name and shape in order, and the outputs with the same weights; the
presets against what nnunetv2's ResEnc planners write; plans this module does not
build are named."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from anatomask_fast.models.resenc import (
    RESENC_PRESETS,
    ResEncArch,
    ResidualEncoderUNet,
    arch_from_plans,
)

get_network_from_plans = pytest.importorskip(
    "nnunetv2.utilities.get_network_from_plans"
).get_network_from_plans

ANISO = ResEncArch(
    features=(4, 8, 16, 16),
    kernels=((1, 3, 3), (3, 3, 3), (1, 3, 3), (3, 3, 3)),
    strides=((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 1)),
    blocks=(1, 2, 3, 2),
    decoder_convs=(1, 2, 1),
)
ARCHS = {
    "preset": RESENC_PRESETS["resenc-l"].arch,
    "anisotropic": ANISO,
    "no-bias-slope": ResEncArch(
        features=(3, 5, 7),
        kernels=((3, 3, 3),) * 3,
        strides=((1, 1, 1), (2, 2, 2), (2, 1, 2)),
        blocks=(2, 1, 2),
        decoder_convs=(2, 1),
        conv_bias=False,
        eps=1e-3,
        slope=0.2,
    ),
}


def real_network(arch: ResEncArch, in_channels: int, classes: int, **options):
    """The real class, from a plans configuration's architecture, as nnU-Net builds it."""
    architecture = json.loads(json.dumps(arch.architecture()))  # as read from plans
    return get_network_from_plans(
        architecture["network_class_name"],
        architecture["arch_kwargs"],
        architecture["_kw_requires_import"],
        in_channels,
        classes,
        **options,
    )


def shapes(model):
    return [(name, tuple(t.shape)) for name, t in model.state_dict().items()]


@pytest.mark.parametrize("name", ARCHS)
def test_names_shapes_and_order_are_the_real_classs(name):
    arch = ARCHS[name]
    with torch.device("meta"):
        real = real_network(arch, 2, 5, allow_init=False, deep_supervision=True)
        ours = ResidualEncoderUNet(arch, 2, 5)
    assert shapes(ours) == shapes(real)
    # Every encoder tensor twice: encoder.* and decoder.encoder.* (one parameter).
    assert ours.get_parameter("decoder.encoder.stem.convs.0.conv.weight") is ours.get_parameter(
        "encoder.stem.convs.0.all_modules.0.weight"
    )


def test_a_structural_difference_is_caught():
    """The comparison sees one block fewer."""
    arch = ARCHS["anisotropic"]
    fewer = ResEncArch(arch.features, arch.kernels, arch.strides, (1, 2, 2, 2), arch.decoder_convs)
    with torch.device("meta"):
        assert shapes(ResidualEncoderUNet(fewer, 2, 5)) != shapes(
            real_network(arch, 2, 5, allow_init=False)
        )


@pytest.mark.parametrize("name", ["anisotropic", "no-bias-slope"])
@pytest.mark.parametrize("deep_supervision", [True, False])
def test_outputs_equal_the_real_classs(name, deep_supervision):
    arch = ARCHS[name]
    torch.manual_seed(0)
    real = real_network(arch, 2, 3, deep_supervision=deep_supervision).double()
    with torch.no_grad():  # nnU-Net's init zeroes the last norms: undo it
        for key, value in real.state_dict().items():
            if "norm" in key:
                value.normal_(1.0 if key.endswith("weight") else 0.0, 0.3)
    ours = ResidualEncoderUNet(arch, 2, 3, deep_supervision=deep_supervision).double()
    ours.load_state_dict(real.state_dict())
    x = torch.randn(2, 2, 16, 24, 20, dtype=torch.float64)
    expected, got = real(x), ours(x)
    expected, got = (expected, got) if deep_supervision else ([expected], [got])
    assert len(got) == len(expected) == (len(arch.features) - 1 if deep_supervision else 1)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_initialization_is_nnunets():
    """He-normal convolutions (std sqrt(2 / (1 + 0.01^2) / fan_in)), zero biases, each
    residual block's last norm zero, as ``network.apply(network.initialize)``."""
    arch = ResEncArch(
        features=(32, 64, 96),
        kernels=((3, 3, 3),) * 3,
        strides=((1, 1, 1), (2, 2, 2), (2, 2, 2)),
        blocks=(1, 2, 2),
        decoder_convs=(1, 1),
    )
    torch.manual_seed(0)
    ours = ResidualEncoderUNet(arch, 1, 2).initialize()
    torch.manual_seed(1)
    real = real_network(arch, 1, 2)
    state, theirs = ours.state_dict(), real.state_dict()
    for name, value in theirs.items():
        if value.dim() == 5 and value.numel() >= 500:
            assert state[name].std().item() == pytest.approx(value.std().item(), rel=0.1), name
        else:
            assert torch.equal(state[name] == 0, value == 0), name


def test_plans_that_are_not_a_resenc_are_named():
    plans = {
        "configurations": {
            "3d_fullres": {
                "patch_size": [64, 64, 64],
                "architecture": {
                    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                    "arch_kwargs": {},
                },
            }
        }
    }
    with pytest.raises(ValueError, match=r"builds .*PlainConvUNet, not a ResidualEncoderUNet"):
        arch_from_plans(plans, source="p.json")
    kwargs = ARCHS["preset"].arch_kwargs()
    for key, value, message in [
        ("dropout_op", "torch.nn.Dropout3d", r"'dropout_op' must be None"),
        ("norm_op", "torch.nn.BatchNorm3d", r"'norm_op' must be .*Instance"),
        ("norm_op_kwargs", {"eps": 1e-5}, r"affine=True"),
        ("block", "BottleneckD", r"'block' 'BottleneckD' is not supported"),
    ]:
        with pytest.raises(ValueError, match=message):
            ResEncArch.from_arch_kwargs({**kwargs, key: value}, "p.json")
    with pytest.raises(ValueError, match=r"6 stages need as many kernel_sizes"):
        ResEncArch.from_arch_kwargs({**kwargs, "strides": [[1, 1, 1]] * 5}, "p.json")


_PLANNERS = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    from nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners import (
        nnUNetPlannerResEncL, nnUNetPlannerResEncM, nnUNetPlannerResEncXL)

    found = {}
    for name, planner in (("resenc-m", nnUNetPlannerResEncM), ("resenc-l", nnUNetPlannerResEncL),
                          ("resenc-xl", nnUNetPlannerResEncXL)):
        plan = planner("Dataset999_Iso").get_plans_for_configuration(
            np.array([1.0, 1.0, 1.0]), np.array([256, 256, 256]), "x", 256.0 ** 3 * 100, {})
        found[name] = {"patch_size": [int(p) for p in plan["patch_size"]],
                       "architecture": plan["architecture"]}
    print(json.dumps(found, default=lambda o: o.tolist() if hasattr(o, "tolist") else list(o)))
""")


@pytest.mark.slow
def test_presets_are_what_the_resenc_planners_write(tmp_path):
    """The real planners on a dataset of 256^3 volumes at 1 mm (nnssl's spacing)."""
    raw, pre = tmp_path / "raw" / "Dataset999_Iso", tmp_path / "pre" / "Dataset999_Iso"
    (raw / "imagesTr").mkdir(parents=True)
    pre.mkdir(parents=True)
    (raw / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "MRI"},
                "labels": {"background": 0, "a": 1},
                "numTraining": 0,
                "file_ending": ".nii.gz",
            }
        )
    )
    (pre / "dataset_fingerprint.json").write_text(
        json.dumps(
            {
                "spacings": [[1.0, 1.0, 1.0]] * 4,
                "shapes_after_crop": [[256, 256, 256]] * 4,
                "foreground_intensity_properties_per_channel": {"0": {}},
                "median_relative_size_after_cropping": 1.0,
            }
        )
    )
    env = {
        **os.environ,
        "nnUNet_raw": str(tmp_path / "raw"),
        "nnUNet_preprocessed": str(tmp_path / "pre"),
        "nnUNet_results": str(tmp_path / "results"),
    }
    result = subprocess.run(
        [sys.executable, "-c", _PLANNERS], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    for name, preset in RESENC_PRESETS.items():
        plans = {"configurations": {"3d_fullres": found[name]}}
        arch, patch = arch_from_plans(plans)
        assert (arch, patch) == (preset.arch, preset.patch_size), name
