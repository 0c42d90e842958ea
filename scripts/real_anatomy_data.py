"""Labelled real volumes for the guidance figures of the README, from files that
install here (see /work/shared/DATA.md):

- MR: Colin27 T1 with the AAL atlas (116 regions), Debian's ``mricron-data``
  (``/usr/share/mricron/templates/ch2.nii.gz``, ``aal.nii.gz``); the MNI152 2009a T1
  with grey- and white-matter maps thresholded at 0.5 (label 1 grey, 2 white matter;
  white wins where both exceed it), ``nilearn``'s ``datasets/data``; TotalSegmentator's
  abdominal MR example (3 mm, its ``total_mr`` labels, 23 structures).
- CT: the two CTs that TotalSegmentator's source distribution ships with its tests
  (``pip download --no-deps --no-binary :all: totalsegmentator==2.18.0``; the labels
  are TotalSegmentator's own reference segmentations, not manual ones):
  ``ct_abdomen``, a thorax-abdomen-pelvis CT at 3 mm (122 x 101 x 112) with the 61
  structures of its ``--fast --force_split`` segmentation (organs, vessels, bones,
  muscles); ``ct_thorax``, a contrast CT angiography at 1.5 mm (233 x 167 x 191) with
  the heart (1), aorta (2), pulmonary artery (3), vertebra T12 (4) and the aortic
  branches (5) of its aorta and pulmonary report tests, placed on the full grid.

Writes, at the files' own grids, paired ``images/`` + ``labels/`` folders (for
``python -m anatomask_fast.guidance`` and ``preprocess --labels``): ``OUT/colin27``,
``OUT/mni152``, ``OUT/mr_abdomen``, ``OUT/ct_abdomen``, ``OUT/ct_thorax``, and
``OUT/mr`` and ``OUT/ct`` with each modality's volumes together (pretraining data).

    python scripts/real_anatomy_data.py OUT [TOTALSEGMENTATOR_SDIST.tar.gz]

Without the sdist path the script fetches it with pip.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

MRICRON = Path("/usr/share/mricron/templates")
TOTALSEG = "totalsegmentator==2.18.0"
REFERENCE = "tests/reference_files/"
# ct_thorax: label files (on the full grid or a crop of it) -> label value, later wins.
THORAX_LABELS = {
    "pulmonary_report/models/heart.nii.gz": 1,
    "aorta_report/test_result/models/brachiocephalic_trunk.nii.gz": 5,
    "aorta_report/test_result/models/common_carotid_artery_left.nii.gz": 5,
    "aorta_report/test_result/models/subclavian_artery_left.nii.gz": 5,
    "aorta_report/test_result/models/celiac_trunk.nii.gz": 5,
    "aorta_report/test_result/models/superior_mesenteric_artery.nii.gz": 5,
    "aorta_report/test_result/models/aorta.nii.gz": 2,
    "pulmonary_report/models/pulmonary_artery.nii.gz": 3,
    "aorta_report/test_result/models/vertebrae_T12.nii.gz": 4,
}


def _nilearn_data() -> Path:
    import nilearn

    return Path(nilearn.__file__).parent / "datasets" / "data"


def _write(
    out: Path, name: str, modality: str, data: np.ndarray, affine: np.ndarray, label: np.ndarray
) -> None:
    for folder in (name, modality.lower()):
        for sub in ("images", "labels"):
            (out / folder / sub).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(data, affine), out / folder / "images" / f"{name}.nii.gz")
        nib.save(
            nib.Nifti1Image(label.astype(np.int16), affine),
            out / folder / "labels" / f"{name}.nii.gz",
        )


def _array(image: nib.Nifti1Image) -> np.ndarray:
    return np.asanyarray(image.dataobj).astype(np.float32)


def _sdist(path: str | None, scratch: Path) -> Path:
    if path is not None:
        return Path(path)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            TOTALSEG,
            "-d",
            str(scratch),
        ],
        check=True,
    )
    return next(scratch.glob("totalsegmentator-*.tar.gz"))


def _members(sdist: Path, scratch: Path) -> Path:
    """The sdist's reference files extracted under ``scratch``; returns their folder."""
    with tarfile.open(sdist) as archive:
        chosen = [m for m in archive.getmembers() if REFERENCE in m.name and m.isfile()]
        archive.extractall(scratch, members=chosen, filter="data")
    return next(scratch.glob(f"totalsegmentator-*/{REFERENCE}"))


def _thorax_label(files: Path, grid: nib.Nifti1Image) -> np.ndarray:
    label = np.zeros(grid.shape, np.int16)
    inverse = np.linalg.inv(grid.affine)
    for name, value in THORAX_LABELS.items():
        part = nib.load(files / name)
        offset = inverse @ part.affine  # an integer translation of the full grid
        if not np.allclose(offset[:3, :3], np.eye(3)) or not np.allclose(
            offset[:3, 3], np.round(offset[:3, 3])
        ):
            raise ValueError(f"{name} is not on a crop of the CT's grid")
        start = np.round(offset[:3, 3]).astype(int)
        where = tuple(slice(s, s + n) for s, n in zip(start, part.shape))
        label[where][np.asanyarray(part.dataobj) > 0] = value
    return label


def main(out: Path, sdist: str | None) -> None:
    colin, aal = MRICRON / "ch2.nii.gz", MRICRON / "aal.nii.gz"
    if not colin.exists():
        sys.exit(f"{colin} is missing: apt-get install -y mricron-data")
    image = nib.load(colin)
    _write(out, "colin27", "MR", _array(image), image.affine, np.asanyarray(nib.load(aal).dataobj))
    base = _nilearn_data()
    t1 = nib.load(base / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    grey, white = (
        np.asanyarray(nib.load(base / f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz").dataobj)
        / 255.0
        for k in ("gm", "wm")
    )
    _write(
        out,
        "mni152",
        "MR",
        _array(t1),
        t1.affine,
        np.where(white > 0.5, 2, np.where(grey > 0.5, 1, 0)),
    )
    with tempfile.TemporaryDirectory() as scratch:
        files = _members(_sdist(sdist, Path(scratch)), Path(scratch))
        mr = nib.load(files / "example_mr_sm.nii.gz")
        _write(
            out,
            "mr_abdomen",
            "MR",
            _array(mr),
            mr.affine,
            np.asanyarray(nib.load(files / "example_seg_mr.nii.gz").dataobj),
        )
        ct = nib.load(files / "example_ct.nii.gz")
        _write(
            out,
            "ct_abdomen",
            "CT",
            _array(ct),
            ct.affine,
            np.asanyarray(nib.load(files / "example_seg_fast_force_split.nii.gz").dataobj),
        )
        thorax = nib.load(files / "aorta_report/example_ct.nii.gz")
        _write(out, "ct_thorax", "CT", _array(thorax), thorax.affine, _thorax_label(files, thorax))
    print(
        f"wrote {out}/: colin27, mni152, mr_abdomen, ct_abdomen, ct_thorax (images/ + "
        "labels/), and mr/, ct/ with each modality's volumes"
    )


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) == 3 else None)
