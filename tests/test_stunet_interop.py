"""STU-Net interoperability: the network's parameter names and shapes against a table
written from STU-Net's source (uni-medical/STU-Net, ``STUNetTrainer.py``: six stages,
``dims = base * (1, 2, 4, 8, 16, 16)``, ``depth`` blocks, a ``conv3`` projection on
every stage's first block, ``Upsample_Layer_nearest`` = nearest up-sampling + 1x1x1
``conv``, one ``seg_outputs`` head per decoder level), the parameter counts of
STU-Net's README, the pretrained export through the real nnU-Net v2
``load_pretrained_weights``, and nnU-Net plans read as nnU-Net reads them."""

import json

import pytest
import torch

from anatomask_fast.models.export import export_pretrained
from anatomask_fast.models.export import main as export_main
from anatomask_fast.models.plans import geometry, load_geometry
from anatomask_fast.models.segmentation import STUNet, load_encoder
from anatomask_fast.models.stunet import STUNetEncoder

# STUNetTrainer_small / _base / _large / _huge: (base width, blocks per stage).
STUNET_TRAINERS = {"S": (16, 1), "B": (32, 1), "L": (64, 2), "H": (96, 3)}
# STU-Net's README, "#Params" (its models have 105 TotalSegmentator classes).
README_PARAMS_M = {"S": 14.6, "B": 58.26, "L": 440.30, "H": 1457.33}


def stunet_table(base, depth, in_channels, classes, kernels):
    """{name: shape} of STU-Net's state_dict, in its module order (strides change no
    shape; kernels do)."""
    dims = [base * m for m in (1, 2, 4, 8, 16, 16)]
    table = {}

    def block(prefix, cin, cout, k, projection):
        table[f"{prefix}.conv1.weight"], table[f"{prefix}.conv1.bias"] = (cout, cin, *k), (cout,)
        table[f"{prefix}.norm1.weight"], table[f"{prefix}.norm1.bias"] = (cout,), (cout,)
        table[f"{prefix}.conv2.weight"], table[f"{prefix}.conv2.bias"] = (cout, cout, *k), (cout,)
        table[f"{prefix}.norm2.weight"], table[f"{prefix}.norm2.bias"] = (cout,), (cout,)
        if projection:
            table[f"{prefix}.conv3.weight"] = (cout, cin, 1, 1, 1)
            table[f"{prefix}.conv3.bias"] = (cout,)

    for s in range(6):
        for b in range(depth):
            cin = (in_channels if s == 0 else dims[s - 1]) if b == 0 else dims[s]
            block(f"conv_blocks_context.{s}.{b}", cin, dims[s], kernels[s], b == 0)
    for u in range(5):
        table[f"upsample_layers.{u}.conv.weight"] = (dims[-2 - u], dims[-1 - u], 1, 1, 1)
        table[f"upsample_layers.{u}.conv.bias"] = (dims[-2 - u],)
    for u in range(5):
        for b in range(depth):
            cin = 2 * dims[-2 - u] if b == 0 else dims[-2 - u]
            block(f"conv_blocks_localization.{u}.{b}", cin, dims[-2 - u], kernels[-2 - u], b == 0)
    for u in range(5):
        table[f"seg_outputs.{u}.weight"] = (classes, dims[-2 - u], 1, 1, 1)
        table[f"seg_outputs.{u}.bias"] = (classes,)
    return table


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("size", ["S", "B", "L", "H"])
def test_names_and_shapes_are_stunets(size):
    base, depth = STUNET_TRAINERS[size]
    with torch.device("meta"):
        model = STUNet(size, 1, 105)
        aniso = STUNet(
            size,
            2,
            3,
            strides=[(1, 2, 2)] + [(2, 2, 2)] * 3 + [(1, 1, 1)],
            kernels=[(1, 3, 3)] + [(3, 3, 3)] * 5,
        )
    shapes = _shapes(model)
    assert list(shapes.items()) == list(stunet_table(base, depth, 1, 105, [(3, 3, 3)] * 6).items())
    params = sum(v.numel() for v in model.state_dict().values()) / 1e6
    assert round(params, 2) == pytest.approx(README_PARAMS_M[size], abs=0.01)
    kernels = [(1, 3, 3)] + [(3, 3, 3)] * 5
    assert _shapes(aniso) == stunet_table(base, depth, 2, 3, kernels)
    # The pretraining encoder is STU-Net's stages 0-4, name for name.
    with torch.device("meta"):
        encoder = _shapes(STUNetEncoder.from_size(size, 1))
    context = {
        k: v
        for k, v in shapes.items()
        if k.startswith("conv_blocks_context.") and not k.startswith("conv_blocks_context.5.")
    }
    assert encoder == context


def test_a_table_mismatch_is_caught():
    """The comparison sees a one-block difference (e.g. a missing stage-5 projection)."""
    with torch.device("meta"):
        shapes = _shapes(STUNet("S", 1, 2))
    table = stunet_table(16, 1, 1, 2, [(3, 3, 3)] * 6)
    del table["conv_blocks_context.5.0.conv3.weight"]
    assert shapes != table


def _random_encoder(size, seed=0):
    torch.manual_seed(seed)
    encoder = STUNetEncoder.from_size(size, 1)
    with torch.no_grad():
        for p in encoder.parameters():
            p.uniform_(-0.5, 0.5)
    return {k: v.detach().clone() for k, v in encoder.state_dict().items()}


def test_nnunet_load_pretrained_weights_takes_the_export(tmp_path):
    nnunet = pytest.importorskip("nnunetv2.run.load_pretrained_weights")
    encoder = _random_encoder("S")
    strides = [(1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2)]
    path = export_pretrained(
        encoder,
        tmp_path / "stunet_S_pretrained.pth",
        size="S",
        in_channels=1,
        num_classes=3,
        strides=strides,
    )
    saved = torch.load(path, weights_only=True)
    assert saved["anatomask_fast"]["pretrained"] == [f"conv_blocks_context.{s}" for s in range(5)]
    assert "not pretrained" in saved["anatomask_fast"]["note"]
    network = STUNet("S", 1, 3, strides=strides)
    nnunet.load_pretrained_weights(network, str(path))
    state = network.state_dict()
    for name, value in encoder.items():
        assert torch.equal(state[name], value), name
    for name, value in saved["network_weights"].items():
        assert torch.equal(state[name], value), name
    # The encoder-only file fails there (nnU-Net asserts on every non-head key).
    torch.save({"network_weights": encoder}, tmp_path / "encoder_only.pth")
    with pytest.raises(AssertionError, match="conv_blocks_context.5.0.conv1.weight"):
        nnunet.load_pretrained_weights(STUNet("S", 1, 3), str(tmp_path / "encoder_only.pth"))
    # And load_encoder takes only the pretrained stages from the export.
    report = load_encoder(STUNet("S", 1, 5, strides=strides), path, verbose=False)
    assert report["fresh"] == [
        "conv_blocks_context.5",
        "upsample_layers",
        "conv_blocks_localization",
        "seg_outputs",
    ]


PLANS = {
    "dataset_name": "Dataset001_Phantom",
    "plans_name": "nnUNetPlans",
    "configurations": {
        "3d_fullres": {
            "data_identifier": "nnUNetPlans_3d_fullres",
            "batch_size": 2,
            "patch_size": [64, 128, 128],
            "spacing": [3.0, 0.8, 0.8],
            "normalization_schemes": ["CTNormalization"],
            "use_mask_for_norm": [False],
            "architecture": {
                "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                "arch_kwargs": {
                    "n_stages": 6,
                    "kernel_sizes": [
                        [1, 3, 3],
                        [1, 3, 3],
                        [3, 3, 3],
                        [3, 3, 3],
                        [3, 3, 3],
                        [3, 3, 3],
                    ],
                    "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2], [2, 2, 2]],
                },
                "_kw_requires_import": [],
            },
        },
        "3d_lowres": {
            "inherits_from": "3d_fullres",
            "spacing": [6.0, 1.6, 1.6],
            "patch_size": [32, 64, 64],
        },
    },
}


@pytest.mark.parametrize("configuration", ["3d_fullres", "3d_lowres"])
def test_plans_read_as_nnunet_reads_them(configuration):
    handler = pytest.importorskip("nnunetv2.utilities.plans_handling.plans_handler")
    theirs = handler.PlansManager(json.loads(json.dumps(PLANS))).get_configuration(configuration)
    ours = geometry(PLANS, configuration)
    # STUNetTrainer.build_network_architecture: pool_op_kernel_sizes[1:], 3x3x3 kernels.
    assert [list(s) for s in ours.strides] == theirs.pool_op_kernel_sizes[1:]
    assert ours.kernels == ((3, 3, 3),) * 6
    assert list(ours.patch_size) == theirs.patch_size and list(ours.spacing) == theirs.spacing
    assert ours.modality == "CT"
    assert [
        list(k) for k in geometry(PLANS, configuration, plans_kernels=True).kernels
    ] == theirs.network_arch_init_kwargs["kernel_sizes"]
    with pytest.raises(
        ValueError,
        match=r"configuration '2d' not found; the plans have "
        r"\['3d_fullres', '3d_lowres'\]",
    ):
        geometry(PLANS, "2d")


def test_export_cli_takes_the_plans_strides(tmp_path, capsys):
    encoder = _random_encoder("tiny")
    torch.save(
        {
            "format": "anatomask_fast.encoder/1",
            "size": "tiny",
            "in_channels": 1,
            "state_dict": encoder,
        },
        tmp_path / "encoder.pt",
    )
    (tmp_path / "plans.json").write_text(json.dumps(PLANS))
    out = tmp_path / "tiny.pth"
    assert (
        export_main(
            [
                "--encoder",
                str(tmp_path / "encoder.pt"),
                "--plans",
                str(tmp_path / "plans.json"),
                "--num-classes",
                "4",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    saved = torch.load(out, weights_only=True)
    assert saved["anatomask_fast"]["strides"] == [
        [1, 2, 2],
        [2, 2, 2],
        [2, 2, 2],
        [1, 2, 2],
        [2, 2, 2],
    ]
    model = STUNet("tiny", 1, 4, strides=load_geometry(tmp_path / "plans.json").strides)
    model.load_state_dict(saved["network_weights"], strict=True)
    for name, value in encoder.items():
        assert torch.equal(model.state_dict()[name], value), name
    assert (
        export_main(["--encoder", str(tmp_path / "encoder.pt"), "--out", str(tmp_path / "x.pt")])
        == 2
    )
    assert "--out must end in .pth" in capsys.readouterr().err
