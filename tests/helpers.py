"""Shared test utilities."""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

# Tolerances by dtype for results accumulated in fp32 and compared with a float64 or
# fp32 reference: about 8 ulps of the stored dtype, since outputs are rounded once.
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=8e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=6e-2, atol=1e-2),
}


def random_mask(
    batch: int,
    grid: tuple[int, int, int],
    *,
    keep: float = 0.4,
    generator: torch.Generator | None = None,
    device: str = "cpu",
) -> torch.Tensor:
    """A random visible mask (B, 1, h, w, d) with at least one visible cell per sample."""
    mask = torch.rand(batch, 1, *grid, generator=generator) < keep
    mask.view(batch, -1)[:, 0] = True
    return mask.to(device)


_NNUNET = textwrap.dedent("""
    import sys
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints, plan_experiments, preprocess)

    if __name__ == "__main__":
        planner = sys.argv[1]
        extract_fingerprints([17], num_processes=1, check_dataset_integrity=True, verbose=False)
        plans = plan_experiments([17], experiment_planner_class_name=planner)
        preprocess([17], plans_identifier=plans, configurations=("3d_fullres",),
                   num_processes=(1,), verbose=False)
""")


def nnunet_dataset(root: Path, planner: str = "ExperimentPlanner") -> Path:
    """Two small phantom cases as an nnU-Net raw dataset (``Dataset017_Phantom``),
    planned by nnunetv2's ``planner`` and pre-processed (3d_fullres) by nnunetv2 itself,
    in a subprocess with ``nnUNet_raw`` / ``nnUNet_preprocessed`` under ``root``;
    returns the dataset's pre-processed folder (its plans and configuration folders)."""
    from anatomask_fast.train.phantom import make_case

    raw = root / "raw" / "Dataset017_Phantom"
    for sub in ("imagesTr", "labelsTr"):
        (raw / sub).mkdir(parents=True)
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    for i in range(2):
        image, label = make_case(i)
        image, label = image[16:80, 16:80, 10:70], label[16:80, 16:80, 10:70]
        nib.save(nib.Nifti1Image(image, affine), raw / "imagesTr" / f"case{i}_0000.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), raw / "labelsTr" / f"case{i}.nii.gz")
    (raw / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "CT"},
                "labels": {"background": 0, "liver": 1, "kidney": 2, "spleen": 3},
                "numTraining": 2,
                "file_ending": ".nii.gz",
            }
        )
    )
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "nnUNet_raw": str(root / "raw"),
        "nnUNet_preprocessed": str(root / "preprocessed"),
        "nnUNet_results": str(root / "results"),
    }
    script = root / "plan_and_preprocess.py"
    script.write_text(_NNUNET)
    result = subprocess.run(
        [sys.executable, str(script), planner], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "preprocessed" / "Dataset017_Phantom"


def raw_op(name: str, backend: str):
    """The raw operator ``name`` of a compiled backend (overload ``default``): the C++
    one for ``cpu`` and ``cuda``, its ``_triton`` twin for ``triton`` (every kernel
    module imported, so that the Triton operators are registered)."""
    if backend == "triton":
        import anatomask_fast.kernels as kernels

        for module in pkgutil.iter_modules(kernels.__path__):
            importlib.import_module(f"anatomask_fast.kernels.{module.name}")
        name += "_triton"
    return getattr(torch.ops.anatomask_fast, name).default


def on(device: str, *values):
    """``values`` with every tensor moved to ``device`` (leaves keep requires_grad)."""
    return tuple(
        v.detach().to(device).requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v
        for v in values
    )


def opcheck(name: str, backend: str, device: str, *args) -> None:
    """``torch.library.opcheck`` of backend's operator ``name`` on ``args`` (on
    ``device``): its fake kernel, its autograd registration, torch.compile's traces."""
    torch.library.opcheck(raw_op(name, backend), on(device, *args))
