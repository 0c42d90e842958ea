"""Runs nnU-Net master's own nnssl fine-tuning path on an nnssl checkpoint written by
this library's ResEnc pretraining (``RUN/nnssl/checkpoint_final.pth``)::

    python scripts/verify_nnssl_adaptation.py --nnunet /path/to/nnUNet.git \\
        --checkpoint RUN/nnssl/checkpoint_final.pth --work /tmp/verify_nnssl

``--nnunet`` is a git directory of github.com/MIC-DKFZ/nnUNet (bare or not): its HEAD's
``nnunetv2`` package is extracted under ``--work`` and imported instead of the installed
release. With that code, in this order:

1. a raw dataset (6 cases of the library's CT-like phantom, ``Dataset017_Phantom``),
   fingerprinted and planned by ``nnUNetPlannerResEncM``: the base plan that
   ``nnUNetv2_preprocess_like_nnssl`` requires;
2. ``preprocess_like_nnssl`` (``nnUNetv2_preprocess_like_nnssl -d 17 -n anatomask -pc
   CHECKPOINT -am like_pretrained``): reads the checkpoint with ``weights_only=True``,
   writes the ``ptPlans__...`` plans with the checkpoint's architecture and patch size,
   pre-processes the data at the pretraining spacing;
3. the ``PretrainedTrainer`` that ``nnUNetv2_train_pretrained 17 3d_fullres 0 -p
   ptPlans__... -tr PretrainedTrainer`` makes (``get_trainer_from_args``): its
   ``initialize()`` builds the network from the plans and loads the checkpoint's encoder
   and stem (``load_pretrained_weights``);
4. checks that every encoder and stem tensor of the trainer's network equals the
   checkpoint's, then runs ``--steps`` training steps on the trainer's own data loader.

Only dynamic-network-architectures' Primus module is kept from importing (it pulls
timm and torchvision, which do not import against a CPU torch): master's own import
guard then leaves Primus out. Prints one JSON line with what was checked.
"""

from __future__ import annotations

import argparse
import importlib.abc
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class _NoPrimus(importlib.abc.MetaPathFinder):
    """Makes ``import dynamic_network_architectures.architectures.primus`` an ImportError
    (what master's guard in ``get_network_via_name`` catches)."""

    def find_spec(self, name, path, target=None):
        if name == "dynamic_network_architectures.architectures.primus":
            raise ImportError("Primus needs timm / torchvision, which do not import here")
        return None


def _extract(repo: Path, work: Path) -> tuple[Path, str]:
    commit = subprocess.run(
        ["git", f"--git-dir={_git_dir(repo)}", "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    target = work / "nnunet_master"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    archive = subprocess.run(
        ["git", f"--git-dir={_git_dir(repo)}", "archive", "HEAD", "nnunetv2"],
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target, commit


def _git_dir(repo: Path) -> Path:
    return repo / ".git" if (repo / ".git").exists() else repo


def _raw_dataset(work: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from anatomask_fast.train.phantom import write_phantom_dataset

    target = work / "raw" / "Dataset017_Phantom"
    if not target.exists():
        shutil.copytree(write_phantom_dataset(work / "phantom", cases=6), target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nnunet", type=Path, required=True, help="git directory of nnUNet")
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    work = args.work.resolve()
    master, commit = _extract(args.nnunet, work)
    _raw_dataset(work)
    os.environ.update(
        nnUNet_raw=str(work / "raw"),
        nnUNet_preprocessed=str(work / "preprocessed"),
        nnUNet_results=str(work / "results"),
        nnUNet_compile="false",
        nnUNet_n_proc_DA="1",
    )
    sys.path.insert(0, str(master))
    sys.meta_path.insert(0, _NoPrimus())

    import nnunetv2
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.experiment_planning.like_nnssl import preprocess_like_nnssl
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
    )
    from nnunetv2.run.run_training_from_pretrained import get_trainer_from_args

    assert Path(nnunetv2.__file__).is_relative_to(master), nnunetv2.__file__
    extract_fingerprints([17], num_processes=1, check_dataset_integrity=True, verbose=False)
    plan_experiments([17], experiment_planner_class_name="nnUNetPlannerResEncM")
    preprocess_like_nnssl(
        dataset_id=17,
        pretrain_name="anatomask",
        pt_ckpt=str(args.checkpoint),
        adaptation_mode="like_pretrained",
        override_spacing=None,
        num_processes=1,
        verbose=False,
        overwrite_pp=True,
    )
    dataset = work / "preprocessed" / "Dataset017_Phantom"
    plans_file = next(dataset.glob("ptPlans__anatomask*.json"))
    plans = load_json(str(plans_file))
    # nnUNetv2_train_pretrained 17 3d_fullres 0 -p ptPlans__... -tr PretrainedTrainer
    trainer = get_trainer_from_args(
        "17", "3d_fullres", 0, "PretrainedTrainer", plans_file.stem, device=torch.device("cpu")
    )
    trainer.initialize()
    saved = torch.load(args.checkpoint, weights_only=True)
    plan = saved["nnssl_adaptation_plan"]
    weights, state = saved["network_weights"], trainer.network.state_dict()
    keys = [
        k for k in state if k.startswith((plan["key_to_encoder"] + ".", plan["key_to_stem"] + "."))
    ]
    differ = [k for k in keys if not torch.equal(state[k], weights[k])]
    os.environ["nnUNet_n_proc_DA"] = "0"  # the data loader in this process
    trainer.on_train_start()
    losses = [
        float(trainer.train_step(next(trainer.dataloader_train))["loss"]) for _ in range(args.steps)
    ]
    trainer.on_train_end()
    report = {
        "nnunet_commit": commit,
        "plans": plans_file.name,
        "network": type(trainer.network).__name__,
        "patch_size": plans["configurations"]["3d_fullres"]["patch_size"],
        "spacing": plans["configurations"]["3d_fullres"]["spacing"],
        "encoder_and_stem_tensors": len(keys),
        "differ": differ,
        "train_losses": losses,
    }
    print(json.dumps(report))
    if differ or not keys:
        sys.exit(1)


if __name__ == "__main__":
    main()
