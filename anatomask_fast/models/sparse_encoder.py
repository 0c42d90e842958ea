"""The sparse STU-Net encoder of masked pretraining, in two executions that give the
same numbers:

- dense-masked (what the SparK/AnatoMask code does): the input is masked, every conv
  runs on the whole volume and its output is masked, the InstanceNorms become sparse
  norms with statistics over visible voxels only;
- packed (the sparse convolution written on visible data): each stage's visible patches are packed
  into (N_visible, C, q, q, q); before a 3x3x3 conv each patch gets its halo from its
  neighbours (zero where hidden or outside), so a conv with padding 0 yields the
  dense conv at visible positions. Compute and stored activations scale with the
  visible share: per block only the norms' inputs and the block's output are stored;
  halos are rebuilt and norm + LeakyReLU recomputed in backward
  (:mod:`~anatomask_fast.models.packed_conv`). The deepest stages, where the halo overhead ((q+2)/q)^3 outweighs
  the saving, run dense-masked (see :class:`~anatomask_fast.models.layout.MaskLayout`).

The engine (:class:`SparseEncoder`: masking, packing, the stage loop) runs the modules
of a dense network (shared, not copied), so parameter names and the state_dict are
those of the dense network: :class:`SparseSTUNetEncoder` a :class:`STUNetEncoder`'s,
:class:`~anatomask_fast.models.sparse_resenc.SparseResidualEncoder` a nnU-Net residual
encoder's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.gather_scatter import apply_mask, sparse_norm
from ..ops.packing import pack_patches, unpack_patches
from ..validation import check_active_mask, check_volume
from .layout import MaskLayout
from .packed_conv import halo_conv, norm_act_halo_conv
from .packed_norm import packed_norm
from .stunet import Triple

SLOPE = 0.01  # STU-Net's LeakyReLU


def _unsupported(name: str, layer: nn.Module, why: str) -> ValueError:
    return ValueError(
        f"SparseSTUNetEncoder: layer '{name}' ({layer!r}) cannot run in the sparse engine: {why}"
    )


def _check_conv(name: str, conv: object, kernel: int, strides: tuple[int, ...]) -> None:
    if type(conv) is not nn.Conv3d:
        raise _unsupported(name, conv, "expected nn.Conv3d")
    expected = dict(
        kernel_size=(kernel,) * 3,
        padding=(kernel // 2,) * 3,
        dilation=(1,) * 3,
        groups=1,
        padding_mode="zeros",
    )
    for attribute, value in expected.items():
        if getattr(conv, attribute) != value:
            raise _unsupported(
                name, conv, f"{attribute} must be {value}, got {getattr(conv, attribute)}"
            )
    if conv.stride not in [(s,) * 3 for s in strides]:
        raise _unsupported(name, conv, f"stride must be one of {strides} here, got {conv.stride}")


def _check_block(name: str, block: nn.Module, stride: int) -> None:
    """A STU-Net BasicResBlock: conv1, norm1, act1, conv2, norm2, [conv3], act2."""
    children = dict(block.named_children())
    required = ("conv1", "norm1", "act1", "conv2", "norm2", "act2")
    for child, layer in children.items():
        if child not in (*required, "conv3"):
            raise _unsupported(f"{name}.{child}", layer, "not a part of a STU-Net BasicResBlock")
    for child in required:
        if child not in children:
            raise _unsupported(name, block, f"a BasicResBlock needs '{child}'")
    _check_conv(f"{name}.conv1", block.conv1, 3, (stride,))
    _check_conv(f"{name}.conv2", block.conv2, 3, (1,))
    if getattr(block, "conv3", None) is not None:
        _check_conv(f"{name}.conv3", block.conv3, 1, (stride,))
    elif stride != 1 or block.conv1.in_channels != block.conv1.out_channels:
        raise _unsupported(name, block, "channels or stride change without a 'conv3' projection")
    for child in ("norm1", "norm2"):
        norm = children[child]
        if type(norm) is not nn.InstanceNorm3d or not norm.affine or norm.track_running_stats:
            raise _unsupported(
                f"{name}.{child}",
                norm,
                "expected nn.InstanceNorm3d with affine=True, track_running_stats=False",
            )
    for child in ("act1", "act2"):
        act = children[child]
        if type(act) is not nn.LeakyReLU or act.negative_slope != SLOPE:
            raise _unsupported(f"{name}.{child}", act, f"expected nn.LeakyReLU({SLOPE})")


class SparseEncoder(nn.Module):
    """The masked-pretraining engine shared by the encoders: the input masked (or
    packed), each stage's blocks run packed or dense-masked as the
    :class:`MaskLayout` plans, the packed stages unpacked for the decoder. A subclass
    names its stages and runs one block of its kind either way
    (``_packed_block`` / ``_dense_block``), and may run a stem first.

    ``patch``: the mask cell at the input resolution, ``divisor``: what the input's
    spatial shape must be divisible by (per axis)."""

    name = "SparseEncoder"

    def __init__(
        self, *, per_sample: bool, packed_stages: int | None, patch: Triple, divisor: Triple
    ) -> None:
        super().__init__()
        self.per_sample = per_sample
        self.packed_stages = packed_stages
        self.patch, self.divisor = patch, divisor

    def _stage_blocks(self, s: int) -> list[nn.Module]:
        raise NotImplementedError

    def _layout_options(self) -> dict:
        """Keyword arguments of :meth:`MaskLayout.build` beyond the mask."""
        raise NotImplementedError

    def _stem(
        self, h: torch.Tensor, layout: MaskLayout, packed: bool, group: torch.Tensor, groups: int
    ) -> torch.Tensor:
        return h

    def _packed_block(
        self,
        s: int,
        i: int,
        block: nn.Module,
        h: torch.Tensor,
        layout: MaskLayout,
        group: torch.Tensor,
        groups: int,
    ) -> torch.Tensor:
        raise NotImplementedError

    def _dense_block(
        self, block: nn.Module, h: torch.Tensor, visible: torch.Tensor | None
    ) -> torch.Tensor:
        raise NotImplementedError

    def layout(self, active: torch.Tensor) -> MaskLayout:
        """The mask layout of one step (share it between passes with the same mask)."""
        return MaskLayout.build(active, packed_stages=self.packed_stages, **self._layout_options())

    def forward(
        self, x: torch.Tensor, active: torch.Tensor | MaskLayout, *, first: int = 0
    ) -> list[torch.Tensor | None]:
        """Stages below ``first`` give None instead of their map (a packed one is then
        never unpacked): the lean decoder never reads the full-resolution stage."""
        layout = active if isinstance(active, MaskLayout) else None
        active = layout.active if layout is not None else active
        self._check_inputs(x, active)
        if layout is None:
            layout = self.layout(active)
        features: list[torch.Tensor | None] = []
        packed: dict[int, torch.Tensor] = {}
        group = layout.sample if self.per_sample else torch.zeros_like(layout.sample)
        groups = layout.batch if self.per_sample else 1
        packed_input = layout.stages[0].packed
        h = pack_patches(x, layout.patches, layout.slots) if packed_input else apply_mask(x, active)
        h = self._stem(h, layout, packed_input, group, groups)
        for s, plan in enumerate(layout.stages):
            if not plan.packed and s and layout.stages[s - 1].packed:
                # The dense-masked stages read the last packed stage's dense map.
                h = features[-1] = unpack_patches(packed.pop(s - 1), layout.patches, layout.slots)
            visible = active if plan.masked else None
            for i, block in enumerate(self._stage_blocks(s)):
                h = (
                    self._packed_block(s, i, block, h, layout, group, groups)
                    if plan.packed
                    else self._dense_block(block, h, visible)
                )
            features.append(None if plan.packed else h)
            if plan.packed:
                packed[s] = h
        # The other packed stages are unpacked last, so that backward runs their unpack
        # first and frees the dense gradients of these maps early.
        for s, p in packed.items():
            features[s] = unpack_patches(p, layout.patches, layout.slots) if s >= first else None
        return features

    def _check_inputs(self, x: torch.Tensor, active: torch.Tensor) -> None:
        op = self.name
        check_volume(op, "x", x)
        spatial = tuple(x.shape[2:])
        if any(s % d for s, d in zip(spatial, self.divisor)):
            raise ValueError(
                f"{op}: the spatial shape {spatial} of 'x' must be divisible by the "
                f"total downsampling {_short(self.divisor)}"
            )
        grid = tuple(s // p for s, p in zip(spatial, self.patch))
        check_active_mask(op, active, x)
        if tuple(active.shape[2:]) != grid:
            raise ValueError(
                f"{op}: argument 'active' must have the grid {grid} (the spatial "
                f"shape of 'x' / {_short(self.patch)}), got "
                f"{tuple(active.shape[2:])}"
            )

    def norm(
        self,
        t: torch.Tensor,
        visible: torch.Tensor | None,
        layer: nn.Module,
        activation: str | None,
    ) -> torch.Tensor:
        """``layer`` (an affine InstanceNorm) as a sparse norm over the visible voxels,
        or over all voxels where ``visible`` is None (an unmasked stage)."""
        return sparse_norm(
            t,
            all_visible(t) if visible is None else visible,
            layer.weight,
            layer.bias,
            per_sample=self.per_sample,
            eps=layer.eps,
            activation=activation,
        )


def all_visible(t: torch.Tensor) -> torch.Tensor:
    """The one-cell visible mask of ``t``'s batch: every voxel visible."""
    return torch.ones((t.shape[0], 1, 1, 1, 1), dtype=torch.bool, device=t.device)


def masked(t: torch.Tensor, visible: torch.Tensor | None) -> torch.Tensor:
    """``t`` with hidden positions zeroed (unchanged in an unmasked stage)."""
    return t if visible is None else apply_mask(t, visible)


def _short(value: Triple) -> int | Triple:
    return value[0] if len(set(value)) == 1 else value


class SparseSTUNetEncoder(SparseEncoder):
    """Masked-pretraining execution of a dense STU-Net encoder's modules.

    ``forward(x, active)`` takes the input (B, C, H, W, D), H, W, D divisible by the
    total downsampling 2^(stages-1), and the visible mask (B, 1, H/16, W/16, D/16)
    (or a prebuilt :class:`MaskLayout`), and returns each stage's dense-masked output
    (hidden positions exactly zero), shallowest first: the maps densify needs.

    ``per_sample=False`` reproduces the reference's batch-pooled norm statistics,
    ``True`` gives per-sample statistics (as the dense network at fine-tuning).
    ``packed_stages``: None chooses per stage by cost; 0 is the dense-masked
    reference execution; k packs the first k stages.
    """

    name = "SparseSTUNetEncoder"

    def __init__(
        self, encoder: nn.Module, *, per_sample: bool = False, packed_stages: int | None = None
    ) -> None:
        stages = getattr(encoder, "conv_blocks_context", None)
        if not isinstance(stages, nn.ModuleList):
            raise ValueError(
                f"SparseSTUNetEncoder: argument 'encoder' must have a "
                f"'conv_blocks_context' nn.ModuleList of stages, got "
                f"{type(encoder).__name__}"
            )
        for s, stage in enumerate(stages):
            blocks = stage if isinstance(stage, nn.Sequential) else [stage]
            for i, block in enumerate(blocks):
                _check_block(
                    f"conv_blocks_context.{s}.{i}"
                    if isinstance(stage, nn.Sequential)
                    else f"conv_blocks_context.{s}",
                    block,
                    2 if s and not i else 1,
                )
        downsampling = 2 ** (len(stages) - 1)
        super().__init__(
            per_sample=per_sample,
            packed_stages=packed_stages,
            patch=(downsampling,) * 3,
            divisor=(downsampling,) * 3,
        )
        self.conv_blocks_context = stages
        self.downsampling = downsampling
        self.widths = tuple(_stage_list(stage)[-1].conv2.out_channels for stage in stages)
        self.strides = ((2, 2, 2),) * (len(stages) - 1)  # between consecutive stages

    def _stage_blocks(self, s: int) -> list[nn.Module]:
        return _stage_list(self.conv_blocks_context[s])

    def _layout_options(self) -> dict:
        return {"stages": len(self.conv_blocks_context)}

    def _packed_block(self, s, i, block, h, layout, group, groups):
        return _packed_block(block, h, layout, 2 if s and not i else 1, group, groups)

    def _dense_block(self, block, h, visible):
        return _dense_block(self, block, h, visible)


def _stage_list(stage: nn.Module) -> list[nn.Module]:
    return list(stage) if isinstance(stage, nn.Sequential) else [stage]


def _dense_block(
    engine: SparseEncoder, block: nn.Module, x: torch.Tensor, visible: torch.Tensor | None
) -> torch.Tensor:
    """One BasicResBlock, SparK-style: dense convs, outputs masked, sparse norms."""
    y = engine.norm(masked(block.conv1(x), visible), visible, block.norm1, "leaky_relu")
    y = engine.norm(masked(block.conv2(y), visible), visible, block.norm2, None)
    skip = masked(block.conv3(x), visible) if block.conv3 is not None else x
    return F.leaky_relu(y + skip, SLOPE)


def _packed_block(
    block: nn.Module,
    x: torch.Tensor,
    layout: MaskLayout,
    stride: int,
    group: torch.Tensor,
    groups: int,
) -> torch.Tensor:
    """One BasicResBlock on packed patches (N, C, q, q, q), storing for backward only
    the outputs of conv1 (unless recomputed) and conv2 (the norms' inputs) and the
    block's output (also the next block's input). A stride-2 3x3x3 conv (padding 1) reads input voxels
    2o-1..2o+1: a one-voxel halo on the low side."""
    conv1 = (block.conv1, 1, 1 if stride == 1 else 0)
    if block.conv1.in_channels * stride**3 < block.conv1.out_channels:
        # conv1's input is smaller than its output (the image channels): recompute
        # conv1 in backward instead of storing its output.
        y = norm_act_halo_conv(
            x, block.norm1, group, groups, SLOPE, layout.neighbours, block.conv2, first=conv1
        )
    else:
        y = norm_act_halo_conv(
            halo_conv(x, layout.neighbours, *conv1),
            block.norm1,
            group,
            groups,
            SLOPE,
            layout.neighbours,
            block.conv2,
        )
    y = packed_norm(y, block.norm2.weight, block.norm2.bias, group, groups, eps=block.norm2.eps)
    skip = halo_conv(x, layout.neighbours, block.conv3, 0, 0) if block.conv3 is not None else x
    # In place: the block's output is the one tensor LeakyReLU's backward keeps.
    return F.leaky_relu_(y.add_(skip), SLOPE)
