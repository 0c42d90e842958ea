"""AnatoMask-guided pretraining of MONAI's MaskedAutoEncoderViT, a few steps on the
embedded phantom: the EMA teacher reconstructs under a random mask, its per-patch
errors pick the student's mask, and the fused token gather/scatter run the model.

    python examples/pretrain_monai_mae.py [--steps 20] [--out runs/mae]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
from monai.networks.nets import MaskedAutoEncoderViT

from anatomask_fast.integrations.monai_mae import MaskedViTAdapter, patchify, token_errors
from anatomask_fast.masker import AnatoMasker
from anatomask_fast.train.optim import ema_update
from anatomask_fast.train.phantom import write_phantom_dataset
from anatomask_fast.train.sampling import BatchOrder, RandomCrops
from anatomask_fast.train.store import StoreOptions, prepare
from anatomask_fast.train.volumes import open_store

PATCH = (16, 16, 16)
CROP = (64, 64, 64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "anatomask_mae")
    args = parser.parse_args()

    store = prepare(
        write_phantom_dataset(args.out / "data", cases=4), StoreOptions(), args.out / "store"
    )
    data = RandomCrops(
        open_store(store), CROP, seed=0, rank=0, batch_size=args.batch_size, augmentation="light"
    )
    order = BatchOrder(steps_per_epoch=args.steps, batch_size=args.batch_size)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, sampler=order)
    torch.manual_seed(0)
    student = MaskedViTAdapter(
        MaskedAutoEncoderViT(
            in_channels=1,
            img_size=CROP,
            patch_size=PATCH,
            hidden_size=192,
            mlp_dim=384,
            num_layers=4,
            num_heads=4,
            decoder_hidden_size=96,
            decoder_mlp_dim=192,
            decoder_num_layers=2,
            decoder_num_heads=4,
        )
    )
    teacher = copy.deepcopy(student).requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=1e-5)
    masker = AnatoMasker(
        num_patches=student.num_patches,
        mask_ratio=0.6,
        total_epochs=2,
        steps_per_epoch=args.steps // 2,
        by_step=True,
    )

    step = 0
    while step < args.steps:
        for batch in loader:
            x = batch["image"]
            target = patchify(x, PATCH)
            with torch.no_grad():  # teacher: random mask, errors
                teacher_mask = masker.random(x.shape[0], x.device)
                pred, hidden = teacher(x, teacher_mask)
                mask = masker.anatomical(token_errors(pred, target, hidden))
            pred, hidden = student(x, mask)  # student: AnatoMask's mask
            loss = token_errors(pred, target, hidden).sum() / hidden.sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            ema_update(teacher, student, 0.999)
            masker.step()
            step += 1
            print(
                f"step {step:3d}  loss {loss.item():.4f}  hard_frac {mask.n_hard / (mask.ids_hidden.shape[1]):.2f}"
            )
            if step == args.steps:
                break


if __name__ == "__main__":
    main()
