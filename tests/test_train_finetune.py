"""`python -m anatomask_fast.train finetune` and `predict` end to end on a small
labelled dataset: outputs, exact resume, bad input, NIfTI predictions."""

import json
import os
import re
import stat

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from anatomask_fast.train.__main__ import main

SHAPE = (40, 36, 32)
AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])
SMALL = [
    "--crop",
    "32",
    "32",
    "32",
    "--batch-size",
    "2",
    "--workers",
    "0",
    "--epochs",
    "2",
    "--steps-per-epoch",
    "1",
    "--augmentation",
    "light",
    "--val-every",
    "2",
    "--sw-overlap",
    "0.25",
]


def write_dataset(root, cases=4, seed=0):
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    grid = np.indices(SHAPE)
    for i in range(cases):
        center = np.array(SHAPE) / 2 + rng.uniform(-4, 4, 3)
        label = np.zeros(SHAPE, np.uint8)
        label[((grid - center[:, None, None, None]) ** 2).sum(0) < 64] = 1
        label[((grid - center[:, None, None, None] - 6) ** 2).sum(0) < 16] = 2
        image = (label * 50.0 + rng.normal(0, 10, SHAPE)).astype(np.float32)
        nib.save(nib.Nifti1Image(image, AFFINE), root / "imagesTr" / f"c{i}_0000.nii.gz")
        nib.save(nib.Nifti1Image(label, AFFINE), root / "labelsTr" / f"c{i}.nii.gz")
    (root / "dataset.json").write_text(
        json.dumps({"channel_names": {"0": "MR"}, "labels": {"background": 0, "a": 1, "b": 2}})
    )
    return root


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def finetune(out, data, *extra):
    return main(["finetune", "--data", str(data), "--out", str(out), *SMALL, *extra])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("run")
    assert finetune(out, data, "--size", "tiny") == 0
    return out


def test_outputs(finished_run):
    out = finished_run
    split = json.loads((out / "splits.json").read_text())
    assert len(split["train"]) == 3 and len(split["val"]) == 1
    assert not set(split["train"]) & set(split["val"])
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [l for l in lines if "loss" in l]
    assert [l["step"] for l in steps] == [1, 2] and all(l["loss"] > 0 for l in steps)
    (val,) = [l for l in lines if "val_dice" in l]
    assert len(val["val_dice_per_class"]) == 2 and 0 <= val["val_dice"] <= 1
    assert {p.name for p in out.glob("checkpoint_*.pt")} == {
        "checkpoint_latest.pt",
        "checkpoint_best.pt",
    }
    assert [p.name for p in (out / "overlays").glob("*.png")] == [
        f"epoch_0002_{split['val'][0]}.png"
    ]
    # Titled with what it shows, the legend naming dataset.json's classes.
    figure = Image.open(out / "overlays" / f"epoch_0002_{split['val'][0]}.png")
    assert re.match(
        rf"validation case {split['val'][0]}, epoch 2 of 2: Dice a \d\.\d\d, "
        r"b \d\.\d\d; slice \d+ of the last axis",
        figure.text["Title"],
    )
    assert figure.text["Legend"] == "a; b"
    # Readable by others, as any tool's output (mkstemp alone would make them 0600).
    mode = 0o666 & ~current_umask()
    for path in out.rglob("*"):
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) == mode, path


def test_resume_mid_run_ends_with_the_same_weights(tmp_path, data, finished_run):
    assert (
        finetune(
            tmp_path, data, "--size", "tiny", "--stop-after-steps", "1", "--latest-every-steps", "1"
        )
        == 0
    )
    assert finetune(tmp_path, data, "--size", "tiny", "--resume") == 0
    resumed = torch.load(tmp_path / "checkpoint_latest.pt", weights_only=True)
    straight = torch.load(finished_run / "checkpoint_latest.pt", weights_only=True)
    for name, value in straight["model"].items():
        assert torch.equal(resumed["model"][name], value), name
    assert resumed["state"] == straight["state"]


def test_predict_writes_label_maps_with_the_input_affine(tmp_path, data, finished_run):
    (tmp_path / "in").mkdir()
    image = nib.load(data / "imagesTr" / "c0_0000.nii.gz")
    shifted = image.affine.copy()
    shifted[:3, 3] = [10.0, -4.0, 7.5]
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj), shifted), tmp_path / "in" / "x.nii.gz")
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(finished_run / "checkpoint_best.pt"),
                "--input",
                str(tmp_path / "in"),
                "--output",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    written = nib.load(tmp_path / "out" / "x.nii.gz")
    assert written.shape == SHAPE and np.allclose(written.affine, shifted)
    assert set(np.unique(np.asanyarray(written.dataobj))) <= {0, 1, 2}


def _broken(tmp_path, name, edit):
    root = write_dataset(tmp_path / name, cases=3)
    edit(root)
    return root


@pytest.mark.parametrize(
    "case,edit,message",
    [
        (
            "values",
            lambda r: nib.save(
                nib.Nifti1Image(np.full(SHAPE, 5, np.uint8), AFFINE), r / "labelsTr" / "c1.nii.gz"
            ),
            r"case 'c1': label .*c1.nii.gz holds values \[5\] outside the 3 classes",
        ),
        (
            "shape",
            lambda r: nib.save(
                nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), AFFINE), r / "labelsTr" / "c2.nii.gz"
            ),
            r"case 'c2': image .*c2_0000.nii.gz has shape \(40, 36, 32\) but label",
        ),
        (
            "affine",
            lambda r: nib.save(
                nib.Nifti1Image(np.zeros(SHAPE, np.uint8), np.eye(4)), r / "labelsTr" / "c0.nii.gz"
            ),
            r"case 'c0': image .* have different affines",
        ),
        (
            "missing",
            lambda r: (r / "labelsTr" / "c1.nii.gz").unlink(),
            r"case 'c1' has no label file",
        ),
    ],
)
def test_bad_data_is_reported(tmp_path, capsys, case, edit, message):
    data = _broken(tmp_path, case, edit)
    assert finetune(tmp_path / "out", data) == 2
    assert __import__("re").search(message, capsys.readouterr().err)


def test_checkpoint_that_does_not_fit_is_reported(tmp_path, capsys, data, finished_run):
    saved = torch.load(finished_run / "checkpoint_best.pt", weights_only=True)
    saved["num_classes"] = 5
    torch.save(saved, tmp_path / "bad.pt")
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(tmp_path / "bad.pt"),
                "--input",
                str(data / "imagesTr"),
                "--output",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "bad.pt does not fit STU-Net-tiny with 5 classes" in capsys.readouterr().err
    (tmp_path / "resume").mkdir()
    (tmp_path / "resume" / "checkpoint_latest.pt").write_bytes(
        (finished_run / "checkpoint_latest.pt").read_bytes()
    )
    assert finetune(tmp_path / "resume", data, "--size", "S", "--resume") == 2
    assert (
        "does not fit this model (size: checkpoint has 'tiny', this run has 'S')"
        in capsys.readouterr().err
    )
    torch.save(
        {"state_dict": {"conv_blocks_context.0.0.conv1.weight": torch.zeros(3)}},
        tmp_path / "enc.pt",
    )
    assert (
        finetune(tmp_path / "o2", data, "--size", "tiny", "--pretrained", str(tmp_path / "enc.pt"))
        == 2
    )
    assert "enc.pt: no encoder weight fits STU-Net-tiny" in capsys.readouterr().err


def test_paired_folders_train_with_their_modality(tmp_path, data, capsys):
    """images/ + labels/ with the same names, no dataset.json: the classes are read off
    the label maps, the normalization follows --modality, and predict uses it."""
    for sub in ("images", "labels"):
        (tmp_path / "paired" / sub).mkdir(parents=True)
    for i in range(4):
        (tmp_path / "paired" / "images" / f"c{i}.nii.gz").write_bytes(
            (data / "imagesTr" / f"c{i}_0000.nii.gz").read_bytes()
        )
        (tmp_path / "paired" / "labels" / f"c{i}.nii.gz").write_bytes(
            (data / "labelsTr" / f"c{i}.nii.gz").read_bytes()
        )
    out = tmp_path / "run"
    assert (
        finetune(
            out,
            tmp_path / "paired",
            "--size",
            "tiny",
            "--modality",
            "MR",
            "--epochs",
            "1",
            "--val-every",
            "1",
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "3 classes read off the label maps" in printed and "3 classes" in printed
    assert torch.load(out / "checkpoint_best.pt", weights_only=True)["modality"] == "MR"


def test_checkpoints_carry_what_nnunet_inference_reads(finished_run, data):
    """weights_only-loadable; ``network_weights`` in STU-Net's names (strict into the
    network), plus nnU-Net's ``init_args`` / ``trainer_name`` / mirroring axes."""
    from anatomask_fast.models.segmentation import STUNet

    for name in ("checkpoint_best.pt", "checkpoint_latest.pt"):
        saved = torch.load(finished_run / name, weights_only=True)
        model = STUNet("tiny", 1, 3, strides=saved["strides"], kernels=saved["kernels"])
        model.load_state_dict(saved["network_weights"], strict=True)
        assert saved["init_args"]["configuration"] == "3d_fullres"
        assert saved["init_args"]["dataset_json"]["labels"] == {"background": 0, "a": 1, "b": 2}
        arch = saved["init_args"]["plans"]["configurations"]["3d_fullres"]["architecture"]
        assert arch["arch_kwargs"]["strides"] == [[1, 1, 1]] + [[2, 2, 2]] * 5
        assert saved["trainer_name"] == "anatomask_fast_STUNet_tiny"
        assert saved["inference_allowed_mirroring_axes"] == [0, 1, 2]
        assert saved["current_epoch"] == 2


def test_mirroring_averages_the_flipped_predictions():
    from anatomask_fast.models.segmentation import STUNet
    from anatomask_fast.train.inference import infer, mirrorings

    assert mirrorings([0, 2]) == [(), (0,), (2,), (0, 2)]
    torch.manual_seed(0)
    model = STUNet("tiny", 1, 3, checkpointing=False)
    image = torch.randn(1, 1, 32, 32, 32)
    plain = infer(model, image, (32, 32, 32))
    mirrored = infer(model, image, (32, 32, 32), mirror_axes=(0, 1, 2))
    model.deep_supervision = False
    with torch.no_grad():
        expected = (
            sum(
                model(image.flip([a + 2 for a in axes])).flip([a + 2 for a in axes])
                for axes in mirrorings([0, 1, 2])
            )
            / 8
        )
    torch.testing.assert_close(mirrored, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(mirrored, plain, atol=1e-3)


def test_predict_mirrors_by_default_and_refuses_a_4d_volume(tmp_path, data, finished_run, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.nii.gz").write_bytes((data / "imagesTr" / "c0_0000.nii.gz").read_bytes())
    args = [
        "predict",
        "--checkpoint",
        str(finished_run / "checkpoint_best.pt"),
        "--input",
        str(tmp_path / "in"),
    ]
    assert main(args + ["--output", str(tmp_path / "a")]) == 0
    assert "test-time mirroring over axes (0, 1, 2)" in capsys.readouterr().out
    assert main(args + ["--output", str(tmp_path / "b"), "--no-mirroring"]) == 0
    assert "test-time mirroring over axes none" in capsys.readouterr().out
    nib.save(
        nib.Nifti1Image(np.zeros((*SHAPE, 2), np.float32), AFFINE), tmp_path / "in" / "y.nii.gz"
    )
    assert main(args + ["--output", str(tmp_path / "c")]) == 2
    assert re.search(
        r"y\.nii\.gz: expected a 3D volume, got shape \(40, 36, 32, 2\)", capsys.readouterr().err
    )


def test_plans_set_the_network_and_the_crop(tmp_path, data):
    plans = {
        "configurations": {
            "3d_fullres": {
                "patch_size": [32, 32, 32],
                "spacing": [1.5, 1.5, 2.0],
                "normalization_schemes": ["ZScoreNormalization"],
                "architecture": {
                    "arch_kwargs": {
                        "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [1, 2, 2], [2, 2, 2]],
                        "kernel_sizes": [[3, 3, 3]] * 5,
                    }
                },
            }
        }
    }
    (tmp_path / "plans.json").write_text(json.dumps(plans))
    out = tmp_path / "run"
    assert (
        main(
            [
                "finetune",
                "--data",
                str(data),
                "--out",
                str(out),
                "--size",
                "tiny",
                "--plans",
                str(tmp_path / "plans.json"),
                "--batch-size",
                "2",
                "--workers",
                "0",
                "--epochs",
                "1",
                "--steps-per-epoch",
                "1",
                "--sw-overlap",
                "0.25",
            ]
        )
        == 0
    )
    saved = torch.load(out / "checkpoint_latest.pt", weights_only=True)
    # Four strides in the plans: STU-Net pads the fifth with (1, 1, 1).
    assert saved["strides"] == [[2, 2, 2], [2, 2, 2], [1, 2, 2], [2, 2, 2], [1, 1, 1]]
    assert list(saved["crop"]) == [32, 32, 32] and list(saved["spacing"]) == [1.5, 1.5, 2.0]
    assert saved["init_args"]["plans"] == plans


def test_predict_takes_a_file_a_folder_or_a_list(tmp_path, data, finished_run, capsys):
    """As nnU-Net's and MONAI's predictors: --input FILE, --input FOLDER, or several."""
    (tmp_path / "in").mkdir()
    for name in ("x", "y"):
        (tmp_path / "in" / f"{name}.nii.gz").write_bytes(
            (data / "imagesTr" / "c0_0000.nii.gz").read_bytes()
        )
    single = tmp_path / "single.nii.gz"
    single.write_bytes((data / "imagesTr" / "c1_0000.nii.gz").read_bytes())
    base = [
        "predict",
        "--checkpoint",
        str(finished_run / "checkpoint_best.pt"),
        "--no-mirroring",
        "--overlap",
        "0",
    ]
    assert main([*base, "--input", str(single), "--output", str(tmp_path / "a")]) == 0
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["single.nii.gz"]
    printed = capsys.readouterr().out
    assert "1 case(s) from" in printed and "0 background, 1 a, 2 b" in printed
    assert f"done: 1 label map(s) in {tmp_path / 'a'}/" in printed and "next:" in printed
    assert (
        main([*base, "--input", str(tmp_path / "in"), str(single), "--output", str(tmp_path / "b")])
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [
        "single.nii.gz",
        "x.nii.gz",
        "y.nii.gz",
    ]
    capsys.readouterr()
    assert (
        main([*base, "--input", str(tmp_path / "missing.nii.gz"), "--output", str(tmp_path / "c")])
        == 2
    )
    assert (
        f"--input {tmp_path / 'missing.nii.gz'}: no such file or folder" in capsys.readouterr().err
    )
    (tmp_path / "notes.txt").write_text("x")
    assert (
        main([*base, "--input", str(tmp_path / "notes.txt"), "--output", str(tmp_path / "c")]) == 2
    )
    assert "notes.txt: not a .nii or .nii.gz file" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_the_run_says_what_the_numbers_are_and_what_comes_next(tmp_path, data, capsys):
    """The progress bar labels the negative loss and shows the last validation Dice;
    validation names the classes; the end names the outputs and the next command."""
    out = tmp_path / "run"
    assert finetune(out, data, "--size", "tiny", "--epochs", "2", "--val-every", "1") == 0
    printed = capsys.readouterr().out
    assert "loss (CE - Dice) is nnU-Net's Dice + CE loss" in printed
    assert "loss (CE - Dice)=" in printed and "val Dice=not yet" in printed
    assert re.search(r"val Dice=\d\.\d{3}", printed)
    assert re.search(
        r"epoch 1 of 2: validation Dice \d\.\d{4} \(mean over the 2 foreground "
        r"classes of 1 case\(s\)\): a \d\.\d{3}, b \d\.\d{3}",
        printed,
    )
    assert f"outputs in {out}/: checkpoint_best.pt" in printed
    assert (
        f"next: label new volumes: python -m anatomask_fast.train predict --checkpoint "
        f"{out / 'checkpoint_best.pt'}" in printed
    )
    assert "elapsed" in printed and "left" in printed  # the bars' time and ETA


def test_plans_without_plans_file_serve_nnunet_and_stunet_trainers(finished_run):
    """The plans a run without --plans embeds: nnU-Net 2.8.1's own PlansManager reads
    every property, and every key STU-Net's nnU-Net 2.2 fork reads is there (the keys:
    uni-medical/STU-Net nnUNet-2.2/nnunetv2/utilities/plans_handling/plans_handler.py;
    its trainers also take pool_op_kernel_sizes[1:] as the strides)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    saved = torch.load(finished_run / "checkpoint_latest.pt", weights_only=True)
    plans = saved["init_args"]["plans"]
    manager = PlansManager(plans)
    config = manager.get_configuration("3d_fullres")
    assert config.patch_size == [32, 32, 32] and config.batch_size == 2
    assert config.pool_op_kernel_sizes == [[1, 1, 1]] + [[2, 2, 2]] * 5
    assert config.network_arch_init_kwargs["kernel_sizes"] == [[3, 3, 3]] * 6
    for name in (
        "data_identifier",
        "preprocessor_class",
        "median_image_size_in_voxels",
        "spacing",
        "normalization_schemes",
        "use_mask_for_norm",
        "network_arch_class_name",
        "network_arch_init_kwargs_req_import",
        "resampling_fn_data",
        "resampling_fn_probabilities",
        "resampling_fn_seg",
        "batch_dice",
        "next_stage_names",
        "previous_stage_name",
    ):
        getattr(config, name)
    for name in (
        "dataset_name",
        "plans_name",
        "original_median_spacing_after_transp",
        "original_median_shape_after_transp",
        "image_reader_writer_class",
        "transpose_forward",
        "transpose_backward",
        "available_configurations",
        "experiment_planner_name",
        "label_manager_class",
        "foreground_intensity_properties_per_channel",
    ):
        getattr(manager, name)
    labels = manager.get_label_manager(saved["init_args"]["dataset_json"])
    assert labels.num_segmentation_heads == 3
    stunet_configuration_keys = {
        "data_identifier",
        "preprocessor_name",
        "batch_size",
        "patch_size",
        "median_image_size_in_voxels",
        "spacing",
        "normalization_schemes",
        "use_mask_for_norm",
        "UNet_class_name",
        "UNet_base_num_features",
        "n_conv_per_stage_encoder",
        "n_conv_per_stage_decoder",
        "num_pool_per_axis",
        "pool_op_kernel_sizes",
        "conv_kernel_sizes",
        "unet_max_num_features",
        "resampling_fn_data",
        "resampling_fn_data_kwargs",
        "resampling_fn_probabilities",
        "resampling_fn_probabilities_kwargs",
        "resampling_fn_seg",
        "resampling_fn_seg_kwargs",
        "batch_dice",
    }
    stunet_plans_keys = {
        "dataset_name",
        "plans_name",
        "original_median_spacing_after_transp",
        "original_median_shape_after_transp",
        "image_reader_writer",
        "transpose_forward",
        "transpose_backward",
        "experiment_planner_used",
        "foreground_intensity_properties_per_channel",
        "configurations",
    }
    assert stunet_configuration_keys <= set(plans["configurations"]["3d_fullres"])
    assert stunet_plans_keys <= set(plans)
    stu = plans["configurations"]["3d_fullres"]
    assert stu["pool_op_kernel_sizes"][1:] == saved["strides"]
    assert stu["conv_kernel_sizes"] == saved["kernels"]


@pytest.mark.parametrize(
    "shape,overlap",
    [((32, 32, 32), 0.5), ((40, 36, 70), 0.5), ((33, 20, 64), 0.25), ((64, 64, 64), 0.0)],
)
def test_window_count_is_what_the_sliding_window_visits(shape, overlap):
    """The progress bars of validation and prediction are sized by window_count."""
    from anatomask_fast.models.segmentation import STUNet
    from anatomask_fast.train.inference import infer, window_count

    class Count:
        done = 0

        def update(self, n):
            self.done += n

    counter = Count()
    infer(
        STUNet("tiny", 1, 2, checkpointing=False),
        torch.zeros(1, 1, *shape),
        (32, 32, 32),
        overlap=overlap,
        progress=counter,
    )
    assert counter.done == window_count(shape, (32, 32, 32), overlap)
