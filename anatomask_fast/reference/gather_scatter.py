"""Reference gather/scatter ops, computed the way the published SparK/AnatoMask code does."""

from __future__ import annotations

import torch

from ..numerics import ACTIVATIONS


def upsample_mask(active: torch.Tensor, spatial: tuple[int, int, int]) -> torch.Tensor:
    """The full-resolution bool mask, as the reference builds it: ``repeat_interleave``
    three times."""
    h, w, d = active.shape[2:]
    H, W, D = spatial
    return (
        active.repeat_interleave(H // h, dim=2)
        .repeat_interleave(W // w, dim=3)
        .repeat_interleave(D // d, dim=4)
    )


def apply_mask_reference(x: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """``x * upsample(active)``: hidden positions of ``x`` set to zero."""
    return x * upsample_mask(active, tuple(x.shape[2:]))


def densify_reference(
    x: torch.Tensor, active: torch.Tensor, mask_token: torch.Tensor
) -> torch.Tensor:
    """Features at visible positions, the learned per-channel ``mask_token`` (shape
    ``(1, C, 1, 1, 1)`` as in the reference, or ``(C,)``) at hidden ones: the
    reference's ``torch.where(active_ex, x, mask_token.expand_as(x))``."""
    token = mask_token.reshape(1, -1, 1, 1, 1).expand_as(x)
    return torch.where(upsample_mask(active, tuple(x.shape[2:])).expand_as(x), x, token)


def sparse_norm_reference(
    x: torch.Tensor,
    active: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    per_sample: bool = False,
    eps: float = 1e-5,
    activation: str | None = None,
) -> torch.Tensor:
    """Normalization with statistics over visible voxels only, hidden outputs zero, the
    reference's way: gather the visible voxels into a ``(n, C)`` matrix by boolean
    indexing, normalize per channel (biased variance, ``eps`` inside the square root,
    affine), allocate zeros, scatter back, then the activation (``leaky_relu`` with
    slope 0.01 as STU-Net, or ``relu6``; both keep zeros at zero).

    ``per_sample=False`` is the reference's quirk: one ``(n, C)`` matrix for the whole
    batch, so statistics are per channel over the batch. ``per_sample=True`` gives
    per-sample instance statistics (what the dense network computes at fine-tuning).
    """
    ii = upsample_mask(active, tuple(x.shape[2:]))[:, 0]  # (B, H, W, D)
    bhwdc = x.permute(0, 2, 3, 4, 1)
    out = torch.zeros_like(bhwdc)
    groups = (
        [(ii[b : b + 1], slice(b, b + 1)) for b in range(x.shape[0])]
        if per_sample
        else [(ii, slice(None))]
    )
    for visible, batch in groups:
        nc = bhwdc[batch][visible]  # (n, C)
        normed = (
            torch.nn.functional.instance_norm(
                nc.t().unsqueeze(0), weight=weight, bias=bias, eps=eps
            )
            .squeeze(0)
            .t()
        )
        part = torch.zeros_like(bhwdc[batch])
        part[visible] = normed
        out[batch] = part
    return ACTIVATIONS[activation or "none"][1](out).permute(0, 4, 1, 2, 3)


def gather_tokens_reference(x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """The visible tokens ``(B, len_keep, C)`` of ``x`` ``(B, L, C)``, MAE's way:
    ``torch.gather`` with the index repeated over channels."""
    index = ids_keep.unsqueeze(-1).repeat(1, 1, x.shape[-1])
    return torch.gather(x, dim=1, index=index)


def scatter_tokens_reference(
    x_visible: torch.Tensor,
    ids_restore: torch.Tensor,
    mask_token: torch.Tensor,
    pos_embed: torch.Tensor | None = None,
) -> torch.Tensor:
    """The full sequence ``(B, L, C)``, MAE's way: append ``mask_token`` repeated over
    the hidden slots, unshuffle with ``torch.gather`` by ``ids_restore``, then add
    ``pos_embed`` (``(1, L, C)`` or ``(L, C)``) when given."""
    B, K, C = x_visible.shape
    L = ids_restore.shape[1]
    tokens = mask_token.reshape(1, 1, C).repeat(B, L - K, 1)
    full = torch.cat([x_visible, tokens], dim=1)
    out = torch.gather(full, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, C))
    if pos_embed is not None:
        out = out + pos_embed.reshape(1, L, C)
    return out
