"""ResEnc pretraining's files against the field's real loaders, on a tiny dataset that
nnunetv2 itself planned with ``nnUNetPlannerResEncM`` and pre-processed:

- the nnU-Net layout through what ``nnUNetv2_train 17 3d_fullres 0 -p
  nnUNetResEncUNetMPlans -pretrained_weights FILE`` runs (nnunetv2 2.8.1's trainer
  ``initialize`` and ``load_pretrained_weights``): every tensor of the trainer's network
  but the heads holds the file's values, under every one of its names;
- the nnssl format: loadable with ``weights_only=True``, the adaptation plan indexed as
  nnU-Net master's ``preprocess_like_nnssl`` indexes it, its architecture built by
  nnunetv2's ``get_network_from_plans`` and the encoder and stem loaded strictly as
  master's ``PretrainedTrainer.load_pretrained_weights`` loads them (the real master
  code is run once by ``scripts/verify_nnssl_adaptation.py``: README);
- this library's fine-tuning from either file, end to end through the CLI."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import nibabel as nib
import pytest
import torch

from anatomask_fast.models.networks import export_resenc, network_spec, pretraining_network
from anatomask_fast.models.resenc import ResidualEncoderUNet
from anatomask_fast.models.resenc_export import load_pretrained
from anatomask_fast.train.__main__ import main
from anatomask_fast.train.checkpoint import atomic_save, atomic_write_text

from .helpers import nnunet_dataset

pytest.importorskip("nnunetv2")
PLANS = "nnUNetResEncUNetMPlans"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """The pre-processed Dataset017_Phantom (plans nnUNetResEncUNetMPlans)."""
    return nnunet_dataset(tmp_path_factory.mktemp("nnunet"), planner="nnUNetPlannerResEncM")


@pytest.fixture(scope="module")
def exported(dataset, tmp_path_factory):
    """A pretraining network of the plans' ResEnc with random weights (norms too), its
    files as a pretraining run writes them, and its encoder weights."""
    out = tmp_path_factory.mktemp("export")
    spec = network_spec("resenc-m", "B", str(dataset / f"{PLANS}.json"))
    torch.manual_seed(0)
    student = pretraining_network(spec, 1)
    with torch.no_grad():
        for p in student.encoder.parameters():
            p.uniform_(-0.5, 0.5)
    files = export_resenc(
        student,
        spec,
        out,
        in_channels=1,
        crop=spec.patch_size,
        spacing=(2.0, 1.5, 1.5),
        modality="CT",
        dataset_name=dataset.name,
        epochs=1,
        save=atomic_save,
        write_text=atomic_write_text,
    )
    encoder = {f"encoder.{k}": v for k, v in student.encoder_state_dict().items()}
    return spec, files, encoder


_NNUNET_TRAIN = textwrap.dedent("""
    import json, sys
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint

    if __name__ == "__main__":
        path, plans = sys.argv[1], sys.argv[2]
        trainer = get_trainer_from_args("17", "3d_fullres", 0, "nnUNetTrainer", plans,
                                        device=torch.device("cpu"))
        maybe_load_checkpoint(trainer, False, False, path)   # -pretrained_weights path
        saved = torch.load(path, weights_only=True)["network_weights"]
        state = trainer.network.state_dict()
        print(json.dumps({"checked": [k for k in state if ".seg_layers." not in k],
                          "differ": [k for k in state if ".seg_layers." not in k
                                     and not torch.equal(state[k], saved[k])],
                          "class": type(trainer.network).__name__}))
""")


@pytest.mark.slow
def test_nnunet_pretrained_weights_load_the_nnunet_export(dataset, exported, tmp_path):
    spec, (nnunet_file, _), encoder = exported
    saved = torch.load(nnunet_file, weights_only=True)
    weights = saved["network_weights"]
    assert saved["anatomask_fast"]["fresh"] == [
        "decoder.stages",
        "decoder.transpconvs",
        "decoder.seg_layers",
    ]
    for name, value in encoder.items():  # the encoder under both of its names
        assert torch.equal(weights[name], value) and torch.equal(weights[f"decoder.{name}"], value)
    for name, value in weights.items():  # and conv / norm under all_modules.0 / .1
        twin = name.replace(".conv.", ".all_modules.0.").replace(".norm.", ".all_modules.1.")
        assert torch.equal(weights[twin], value), name
    script = tmp_path / "train.py"
    script.write_text(_NNUNET_TRAIN)
    root = dataset.parent.parent
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "nnUNet_raw": str(root / "raw"),
        "nnUNet_preprocessed": str(root / "preprocessed"),
        "nnUNet_compile": "false",
        "nnUNet_results": str(tmp_path / "results"),
    }
    result = subprocess.run(
        [sys.executable, str(script), str(nnunet_file), PLANS],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["class"] == "ResidualEncoderUNet" and report["differ"] == []
    assert len(report["checked"]) == len([k for k in weights if ".seg_layers." not in k])
    # A file holding the encoder only fails there (it asserts on every non-head key).
    torch.save({"network_weights": encoder}, tmp_path / "encoder_only.pth")
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "encoder_only.pth"), PLANS],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode != 0 and "decoder.encoder.stem.convs.0.conv.weight" in result.stderr


def test_the_nnssl_export_is_what_nnunets_adaptation_reads(dataset, exported):
    get_network = pytest.importorskip("nnunetv2.utilities.get_network_from_plans")
    spec, (_, nnssl_file), encoder = exported
    saved = torch.load(nnssl_file, weights_only=True)  # tensors and plain values only
    plan = saved["nnssl_adaptation_plan"]
    assert json.loads((nnssl_file.parent / "adaptation_plan.json").read_text()) == plan
    # preprocess_like_nnssl's reads
    configuration = list(plan["pretrain_plan"]["configurations"].values())[0]
    assert configuration["spacing"] == [2.0, 1.5, 1.5]
    assert configuration["patch_size"] == list(spec.patch_size)
    assert plan["recommended_downstream_patchsize"] == list(spec.patch_size)
    assert plan["pretrain_num_input_channels"] == 1 and plan["key_to_lpe"] is None
    architecture = plan["architecture_plans"]
    assert (
        architecture["arch_kwargs"]
        == json.loads((dataset / f"{PLANS}.json").read_text())["configurations"]["3d_fullres"][
            "architecture"
        ]["arch_kwargs"]
    )
    # PretrainedTrainer: the network from the plan, then encoder and stem strictly.
    network = get_network.get_network_from_plans(
        architecture["arch_class_name"],
        architecture["arch_kwargs"],
        architecture["arch_kwargs_requiring_import"],
        1,
        3,
        allow_init=True,
        deep_supervision=False,
    )
    weights = saved["network_weights"]
    for key in (plan["key_to_encoder"], plan["key_to_stem"]):
        part = {k[len(key) + 1 :]: v for k, v in weights.items() if k.startswith(key + ".")}
        network.get_submodule(key).load_state_dict(part)  # strict
    state = network.state_dict()
    for name, value in encoder.items():
        assert torch.equal(state[name], value), name
    for key in plan["keys_to_in_proj"]:
        assert network.get_submodule(key).weight.shape[1] == 1


def test_finetuning_loads_either_file(exported, tmp_path):
    spec, files, encoder = exported
    checkpoint = tmp_path / "checkpoint_latest.pt"  # a pretraining checkpoint's "model"
    torch.save({"model": {**encoder, "decoder.proj.weight": torch.zeros(1)}}, checkpoint)
    for path in [*files, checkpoint]:
        model = ResidualEncoderUNet(spec.arch, 1, 3).initialize()
        report = load_pretrained(model, path, verbose=False)
        assert report["fresh"] == ["decoder.stages", "decoder.transpconvs", "decoder.seg_layers"]
        state = model.state_dict()
        for name, value in encoder.items():
            assert torch.equal(state[name], value) and torch.equal(state[f"decoder.{name}"], value)
    # Two input channels from one pretrained: the input projection repeated, halved.
    model = ResidualEncoderUNet(spec.arch, 2, 3)
    load_pretrained(model, files[1], verbose=False)
    stem = "encoder.stem.convs.0.conv.weight"
    assert torch.equal(model.state_dict()[stem], encoder[stem].repeat(1, 2, 1, 1, 1) / 2)
    # Another network: named, nothing loaded.
    other = ResidualEncoderUNet(
        dataclasses.replace(spec.arch, features=(32, 64, 128, 256, 256)), 1, 3
    )
    with pytest.raises(
        ValueError,
        match=r"does not fit the ResidualEncoderUNet \(32, 64, 128, "
        r"256, 256\).*file \(320",
    ):
        load_pretrained(other, files[0], verbose=False)


@pytest.mark.slow
def test_pretrain_finetune_predict_end_to_end(dataset, tmp_path):
    """The CLI on the nnU-Net pre-processed data with its ResEnc-M plans (narrowed to
    widths 4-16 and 32^3 crops, to stay quick): pretraining (AnatoMask, then SparK's
    random masks at 0.75), fine-tuning from each of its files, prediction."""
    plans = json.loads((dataset / f"{PLANS}.json").read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    arch.update(
        features_per_stage=[min(4 * 2**s, 16) for s in range(arch["n_stages"])],
        n_blocks_per_stage=[1] + [2] * (arch["n_stages"] - 1),
    )
    (tmp_path / "plans.json").write_text(json.dumps(plans))
    common = [
        "--network",
        "resenc-m",
        "--plans",
        str(tmp_path / "plans.json"),
        "--crop",
        "32",
        "32",
        "32",
        "--batch-size",
        "2",
        "--workers",
        "0",
        "--steps-per-epoch",
        "1",
        "--augmentation",
        "none",
    ]
    pretraining = [
        *common,
        "--epochs",
        "2",
        "--preview-every",
        "0",
        "--warmup-epochs",
        "0",
        "--data",
        str(dataset / "nnUNetPlans_3d_fullres"),
    ]
    pre, spark = tmp_path / "pre", tmp_path / "spark"
    assert main(["pretrain", "--out", str(pre), *pretraining]) == 0
    assert (
        main(
            [
                "pretrain",
                "--out",
                str(spark),
                *pretraining,
                "--hard-schedule",
                "none",
                "--mask-ratio",
                "0.75",
            ]
        )
        == 0
    )
    lines = [json.loads(line) for line in (spark / "metrics.jsonl").read_text().splitlines()]
    assert [line["hard_frac"] for line in lines] == [None, None]
    raw = dataset.parent.parent / "raw" / "Dataset017_Phantom"
    for i, path in enumerate(
        [pre / "resenc_m_pretrained.pth", spark / "nnssl" / "checkpoint_final.pth"]
    ):
        out = tmp_path / f"ft{i}"
        assert (
            main(
                [
                    "finetune",
                    "--data",
                    str(raw),
                    "--out",
                    str(out),
                    *common,
                    "--epochs",
                    "1",
                    "--spacing",
                    "3",
                    "3",
                    "4",
                    "--pretrained",
                    str(path),
                ]
            )
            == 0
        )
        saved = torch.load(out / "checkpoint_latest.pt", weights_only=True)
        assert saved["network"] == "resenc-m" and saved["trainer_name"] == "nnUNetTrainer"
    image = sorted((raw / "imagesTr").iterdir())[0]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / image.name).symlink_to(image)
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(tmp_path / "ft0" / "checkpoint_latest.pt"),
                "--input",
                str(tmp_path / "in"),
                "--output",
                str(tmp_path / "labels"),
                "--no-mirroring",
            ]
        )
        == 0
    )
    label = nib.load(tmp_path / "labels" / "case0.nii.gz")
    assert label.shape == nib.load(image).shape
