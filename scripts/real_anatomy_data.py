"""Labelled real brain MRI for the guidance figures of the README, from files that
install here (see /work/shared/DATA.md):

- Colin27 T1 with the AAL atlas (116 regions): Debian's ``mricron-data``
  (``/usr/share/mricron/templates/ch2.nii.gz``, ``aal.nii.gz``);
- the MNI152 2009a T1 with grey- and white-matter maps thresholded at 0.5 (label 1
  grey, 2 white matter; white wins where both exceed it): ``nilearn``'s
  ``datasets/data``.

Writes ``OUT/colin27`` and ``OUT/mni152`` (paired ``images/`` + ``labels/`` folders, for
``python -m anatomask_fast.guidance``) and ``OUT/pretrain`` (both images, for
``python -m anatomask_fast.train pretrain``), all at the files' 1 mm grids.

    python scripts/real_anatomy_data.py OUT
"""
from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np

MRICRON = Path("/usr/share/mricron/templates")


def _nilearn_data() -> Path:
    import nilearn

    return Path(nilearn.__file__).parent / "datasets" / "data"


def _write(out: Path, name: str, image: nib.Nifti1Image, label: np.ndarray) -> None:
    for folder in ("images", "labels"):
        (out / name / folder).mkdir(parents=True, exist_ok=True)
    data = np.asanyarray(image.dataobj).astype(np.float32)
    nib.save(nib.Nifti1Image(data, image.affine), out / name / "images" / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(label.astype(np.int16), image.affine),
             out / name / "labels" / f"{name}.nii.gz")
    (out / "pretrain").mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, image.affine), out / "pretrain" / f"{name}.nii.gz")


def main(out: Path) -> None:
    colin, aal = MRICRON / "ch2.nii.gz", MRICRON / "aal.nii.gz"
    if not colin.exists():
        sys.exit(f"{colin} is missing: apt-get install -y mricron-data")
    _write(out, "colin27", nib.load(colin), np.asanyarray(nib.load(aal).dataobj))
    base = _nilearn_data()
    t1 = nib.load(base / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    grey, white = (np.asanyarray(nib.load(base / f"mni_icbm152_{k}_tal_nlin_sym_09a_converted"
                                                  ".nii.gz").dataobj) / 255.0
                   for k in ("gm", "wm"))
    label = np.where(white > 0.5, 2, np.where(grey > 0.5, 1, 0))
    _write(out, "mni152", t1, label)
    print(f"wrote {out}/colin27, {out}/mni152 (images/ + labels/) and {out}/pretrain")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
