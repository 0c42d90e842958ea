"""MONAI's ``MaskedAutoEncoderViT`` with AnatoMask's masks and the fused token
gather/scatter, without editing MONAI: the adapter runs the model's own modules in
the model's own order, taking the mask from the caller instead of drawing one."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.gather_scatter import gather_tokens, scatter_tokens
from ..ops.mask_select import MaskResult


class MaskedViTAdapter(nn.Module):
    """``forward(x, mask) -> (pred, hidden)`` as ``MaskedAutoEncoderViT.forward``:
    ``pred`` (B, N, prod(patch) * C) per patch, ``hidden`` (B, N) int, 1 = masked."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        for name in (
            "patch_embedding",
            "cls_token",
            "blocks",
            "decoder_embed",
            "mask_tokens",
            "decoder_pos_embedding",
            "decoder_blocks",
            "decoder_pred",
        ):
            if not hasattr(model, name):
                raise TypeError(
                    f"MaskedViTAdapter: argument 'model' must be a MONAI "
                    f"MaskedAutoEncoderViT; {type(model).__name__} has no {name!r}"
                )
        self.model = model

    @property
    def num_patches(self) -> int:
        return self.model.patch_embedding.n_patches

    def forward(self, x: torch.Tensor, mask: MaskResult) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        tokens = m.patch_embedding(x)
        if mask.ids_restore.shape != tokens.shape[:2]:
            raise ValueError(
                f"MaskedViTAdapter: the mask covers {tuple(mask.ids_restore.shape)} "
                f"patches, the model makes {tuple(tokens.shape[:2])}"
            )
        visible = gather_tokens(tokens, mask.ids_keep)
        cls = m.cls_token.expand(visible.shape[0], -1, -1)
        encoded = m.decoder_embed(m.blocks(torch.cat((cls, visible), dim=1)))
        full = scatter_tokens(
            encoded[:, 1:], mask.ids_restore, m.mask_tokens, m.decoder_pos_embedding
        )
        decoded = m.decoder_pred(m.decoder_blocks(torch.cat((encoded[:, :1], full), dim=1)))
        return decoded[:, 1:], (~mask.active.reshape(full.shape[:2])).int()


def patchify(x: torch.Tensor, patch_size: tuple[int, ...]) -> torch.Tensor:
    """(B, C, H, W, D) -> (B, N, prod(patch) * C) in MONAI's token order (patches
    row-major; within a patch the values in ``decoder_pred``'s (p1 p2 p3 c) order)."""
    B, C, H, W, D = x.shape
    p1, p2, p3 = patch_size
    t = x.reshape(B, C, H // p1, p1, W // p2, p2, D // p3, p3)
    return t.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(B, -1, p1 * p2 * p3 * C)


def token_errors(pred: torch.Tensor, target: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Per-patch squared error (B, N) on hidden patches (zero elsewhere): the teacher's
    errors for :meth:`AnatoMasker.anatomical` in the token layout."""
    return (pred.float() - target.float()).pow(2).mean(-1) * hidden
