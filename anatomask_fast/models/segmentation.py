"""The full STU-Net for segmentation (what fine-tuning trains), module for module and name for
name as STU-Net's trainers build it (``STUNetTrainer_small/_base/_large/_huge``): six
encoder stages ``conv_blocks_context.{0..5}`` (widths ``base * (1, 2, 4, 8, 16, 16)``,
the first five are what AnatoMask pretrains), per-stage strides (nnU-Net's
``pool_op_kernel_sizes[1:]``) and kernel sizes, a decoder of nearest up-sampling by the
stage's stride + 1x1x1 convolution (``upsample_layers.{u}.conv``), concatenation with
the skip, residual blocks (``conv_blocks_localization.{u}``) and a 1x1x1 head per
decoder level (``seg_outputs.{u}``, all of them returned under deep supervision).

Memory options (same weights, same function):
- ``fused``: InstanceNorm + LeakyReLU as one op (``sparse_norm`` with an all-visible
  mask) whose backward keeps only its input and statistics, the convolution after it
  recomputing it in backward (one sample at a time for maps over
  ``BATCHED_BACKWARD_BYTES``); the residual add + LeakyReLU keeps
  only its output (which the next layer keeps anyway); the up-sampling applies its
  1x1x1 convolution before the (nearest) up-sampling, which commutes with it; the first
  decoder block convolves the skip and the low-resolution map separately, the
  up-sampled half as phase convolutions of the low-resolution map
  (:func:`upsampled_conv`: 8/27 of the multiply-adds for 3x3x3 kernels and stride 2), so
  neither the concatenation nor any full-resolution up-sampled map exists.
- ``checkpointing``: encoder stages and decoder levels (with their heads) recomputed in
  backward instead of storing their activations: ``True`` all of them, ``False`` none,
  an int ``n`` those of the ``n`` highest resolutions (where the activations are
  largest, so recomputing there frees the most memory per recomputed FLOP).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..ops.gather_scatter import sparse_norm
from ..serialization import safe_load
from .amp import accumulate_fp32
from .stunet import BasicResBlock, STUNetEncoder, Triple, size_spec, stage, triple
from .upsampled_conv import nearest, upsampled_conv

SLOPE = 0.01
# Maps up to this size run their recomputing backward for the whole batch at once.
BATCHED_BACKWARD_BYTES = 32 * 2**20


class Upsample:
    """Nearest up-sampling by an integer factor per axis."""

    def __init__(self, scale: Triple) -> None:
        self.scale = scale

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return nearest(z, self.scale)


class UpsampleLayer(nn.Module):
    """STU-Net's Upsample_Layer_nearest: nearest up-sampling by the stage's stride,
    then a 1x1x1 conv."""

    def __init__(self, in_channels: int, out_channels: int, scale: Triple = (2, 2, 2)) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, 1)
        self.upsample = Upsample(triple(scale, "scale"))

    def forward(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        """``fused``: the 1x1x1 conv only, at the low resolution (it commutes with
        nearest up-sampling, which the fused decoder block then applies)."""
        if fused:
            return self.conv(x)
        return self.conv(self.upsample(x))


class _ResidualLeakyReLU(torch.autograd.Function):
    """leaky_relu(y + skip), saving only its output (its sign is the pre-activation's;
    the output is kept by its consumer anyway)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        out = F.leaky_relu_(y + skip, SLOPE)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (out,) = ctx.saved_tensors
        # One pass, one output (where(out < 0, grad * SLOPE, grad) made two maps and a
        # mask); as nn.LeakyReLU's backward, read off the output's sign.
        grad_in = torch.ops.aten.leaky_relu_backward(grad, out, SLOPE, True)
        return grad_in, grad_in


class _RecomputedConv(torch.autograd.Function):
    """``conv3d(fn(x, *shared))`` keeping the inputs only: ``fn`` (a norm + activation:
    cheap, element-wise) is recomputed in backward, the convolution is not. ``fn`` acts
    on each sample of ``x`` alone (instance norm; ``shared`` is the norm's affine), so
    backward can run one sample at a time: where ``x`` is large the recomputed map, its
    gradient and the convolution's temporaries then exist for one sample at once. Small
    maps take one batched call: there the memory is negligible, and PyTorch's CPU
    convolution takes its slow non-oneDNN path for a single small sample (measured: the
    backward of a 16-channel 32^3 convolution 25x slower as two single-sample calls)."""

    @staticmethod
    def forward(
        ctx,
        fn,
        conv: nn.Conv3d,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        x: torch.Tensor,
        *shared: torch.Tensor,
    ) -> torch.Tensor:
        with torch.no_grad():
            out = F.conv3d(fn(x, *shared), weight, bias, conv.stride, conv.padding)
        ctx.fn, ctx.stride, ctx.padding = fn, conv.stride, conv.padding
        ctx.has_bias = bias is not None
        ctx.save_for_backward(weight, x, *shared)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, x, *shared = ctx.saved_tensors
        grad_x = torch.empty_like(x) if x.requires_grad else None
        grad_shared: list[torch.Tensor | None] = [None] * len(shared)
        grad_w = grad_b = None
        # The forward's convolution ran in grad's dtype (autocast): its backward too.
        compute_weight = weight.to(grad.dtype)
        step = x.shape[0] if x.numel() * x.element_size() <= BATCHED_BACKWARD_BYTES else 1
        for n in range(0, x.shape[0], step):
            leaves = [
                t.detach().requires_grad_(t.requires_grad) for t in (x[n : n + step], *shared)
            ]
            with torch.enable_grad():
                a = ctx.fn(*leaves)
            grad_a, gw, gb = torch.ops.aten.convolution_backward(
                grad[n : n + step],
                a.detach().to(grad.dtype),
                compute_weight,
                [weight.shape[0]] if ctx.has_bias else None,
                list(ctx.stride),
                list(ctx.padding),
                [1, 1, 1],
                False,
                [0, 0, 0],
                1,
                [True, True, ctx.has_bias],
            )
            grad_w = accumulate_fp32(grad_w, gw)
            if ctx.has_bias:
                grad_b = accumulate_fp32(grad_b, gb)
            wanted = [t for t in leaves if t.requires_grad]
            found = iter(torch.autograd.grad(a, wanted, grad_a.to(a.dtype)) if wanted else ())
            del a, grad_a
            if grad_x is not None:
                grad_x[n : n + step] = next(found)
            for i, t in enumerate(leaves[1:]):
                if t.requires_grad:
                    grad_shared[i] = accumulate_fp32(grad_shared[i], next(found))
        return (
            None,
            None,
            grad_w.to(weight.dtype),
            grad_b.to(weight.dtype) if ctx.has_bias else None,
            grad_x,
            *(None if g is None else g.to(t.dtype) for g, t in zip(grad_shared, shared)),
        )


def _all_visible(x: torch.Tensor) -> torch.Tensor:
    return torch.ones((x.shape[0], 1, 1, 1, 1), dtype=torch.bool, device=x.device)


def norm_act(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, activation: str | None
) -> torch.Tensor:
    """Fused instance norm (+ LeakyReLU) that keeps only its input and statistics."""
    # Under autocast the convolutions give half precision; the norm takes one dtype.
    return sparse_norm(
        x,
        _all_visible(x),
        weight.to(x.dtype),
        bias.to(x.dtype),
        per_sample=True,
        eps=eps,
        activation=activation,
    )


def _conv_pair(
    conv: nn.Conv3d, upsample: Upsample, low: torch.Tensor, skip: torch.Tensor
) -> torch.Tensor:
    """``conv`` of the concatenation of the up-sampled ``low`` and ``skip``, without
    building it, and without the up-sampled map: its half of the convolution runs on
    ``low`` (:func:`upsampled_conv`)."""
    split = low.shape[1]
    out = upsampled_conv(low, conv.weight[:, :split], upsample.scale)
    return out.add_(F.conv3d(skip, conv.weight[:, split:], conv.bias, conv.stride, conv.padding))


def _conv_of(conv: nn.Conv3d, fn, x: torch.Tensor, *shared: torch.Tensor) -> torch.Tensor:
    return _RecomputedConv.apply(fn, conv, conv.weight, conv.bias, x, *shared)


def fused_block(
    block: BasicResBlock,
    x: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    upsample: Upsample | None = None,
) -> torch.Tensor:
    """``block(x)`` with the fused ops; ``x`` a tensor, or a decoder level's pair (the
    low-resolution up-sampling output, already through its 1x1x1 conv; the skip) with
    the ``upsample`` that brings the first to the skip's resolution (default x2)."""
    upsample = upsample or Upsample((2, 2, 2))
    # Locals are dropped as soon as they are consumed: in a checkpointed forward
    # nothing is saved, so the live intermediates make the peak.
    norm1, norm2 = block.norm1, block.norm2
    if isinstance(x, tuple):
        c1 = _conv_pair(block.conv1, upsample, *x)
    else:
        c1 = block.conv1(x)
    c2 = _conv_of(
        block.conv2,
        lambda c, w, b: norm_act(c, w, b, norm1.eps, "leaky_relu"),
        c1,
        norm1.weight,
        norm1.bias,
    )
    del c1
    y = norm_act(c2, norm2.weight, norm2.bias, norm2.eps, None)
    del c2
    if isinstance(x, tuple):
        skip = _conv_pair(block.conv3, upsample, *x)
    else:
        skip = block.conv3(x) if block.conv3 is not None else x
    return _ResidualLeakyReLU.apply(y, skip)


def _stage(blocks: nn.Sequential, x, fused: bool, upsample: Upsample | None = None) -> torch.Tensor:
    if not fused:
        return blocks(torch.cat(x, 1) if isinstance(x, tuple) else x)
    for block in blocks:
        x = fused_block(block, x, upsample)
        upsample = None
    return x


class STUNet(nn.Module):
    """STU-Net ("tiny", "S", "B", "L", "H") with ``num_classes`` outputs: six stages of
    ``depth`` blocks, ``strides`` (five, one per down-sampling; default (2, 2, 2)) and
    ``kernels`` (six, one per stage; default (3, 3, 3), as STU-Net's trainers use).
    ``forward`` returns the logits at the input resolution, or with
    ``deep_supervision`` a list of logits for every decoder level, highest resolution
    first."""

    def __init__(
        self,
        size: str = "B",
        in_channels: int = 1,
        num_classes: int = 2,
        *,
        strides: Sequence[Sequence[int] | int] | None = None,
        kernels: Sequence[Sequence[int] | int] | None = None,
        deep_supervision: bool = True,
        fused: bool = True,
        checkpointing: bool | int = True,
    ) -> None:
        super().__init__()
        spec = size_spec(size)
        dims, depth = spec.dims, spec.depth
        strides = [(2, 2, 2)] * 5 if strides is None else [triple(s, "strides[]") for s in strides]
        kernels = [(3, 3, 3)] * 6 if kernels is None else [triple(k, "kernels[]") for k in kernels]
        if len(strides) != 5 or len(kernels) != 6:
            raise ValueError(
                f"STUNet: arguments 'strides' and 'kernels': expected 5 strides "
                f"(one per down-sampling) and 6 kernels (one per stage), got "
                f"{len(strides)} and {len(kernels)}"
            )
        self.size, self.in_channels, self.num_classes = size, in_channels, num_classes
        self.strides, self.kernels = strides, kernels
        self.conv_blocks_context = STUNetEncoder(
            in_channels, dims, depth, strides, kernels
        ).conv_blocks_context
        self.upsample_layers = nn.ModuleList(
            UpsampleLayer(dims[-1 - u], dims[-2 - u], strides[-1 - u]) for u in range(5)
        )
        self.conv_blocks_localization = nn.ModuleList(
            stage(2 * dims[-2 - u], dims[-2 - u], depth, kernels[-2 - u], 1) for u in range(5)
        )
        self.seg_outputs = nn.ModuleList(nn.Conv3d(dims[-2 - u], num_classes, 1) for u in range(5))
        self.deep_supervision = deep_supervision
        self.fused = fused
        self.checkpointing = checkpointing
        self.downsampling = tuple(math.prod(s[axis] for s in strides) for axis in range(3))

    def _recomputed(self, resolution: int) -> bool:
        """Whether the stage / decoder level at ``resolution`` (0: the input's) is
        recomputed in backward."""
        if isinstance(self.checkpointing, bool):
            return self.checkpointing
        return resolution < self.checkpointing

    def _run(self, resolution: int, function, *args):
        if torch.is_grad_enabled() and self._recomputed(resolution):
            return checkpoint(function, *args, use_reentrant=False)
        return function(*args)

    def _encode(self, stage: int, x: torch.Tensor) -> torch.Tensor:
        return _stage(self.conv_blocks_context[stage], x, self.fused)

    def _decode(self, u: int, x: torch.Tensor, skip: torch.Tensor, head: bool):
        up = self.upsample_layers[u]
        x = _stage(
            self.conv_blocks_localization[u], (up(x, self.fused), skip), self.fused, up.upsample
        )
        return x, (self.seg_outputs[u](x) if head else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"STUNet: expected input (B, {self.in_channels}, D, H, W), got {tuple(x.shape)}"
            )
        if any(s % d for s, d in zip(x.shape[2:], self.downsampling)):
            raise ValueError(
                f"STUNet: the spatial shape {tuple(x.shape[2:])} must be "
                f"divisible by {self.downsampling} (the product of the strides)"
            )
        skips = []
        for s in range(len(self.conv_blocks_context)):
            x = self._run(s, lambda i, t: self._encode(i, t), s, x)
            skips.append(x)
        outputs = []
        levels = len(self.conv_blocks_localization)
        for u in range(levels):
            last = u == levels - 1
            x, logits = self._run(
                levels - 1 - u,
                lambda i, t, k, h: self._decode(i, t, k, h),
                u,
                x,
                skips[-2 - u],
                self.deep_supervision or last,
            )
            if logits is not None:
                outputs.append(logits)
        return outputs[::-1] if self.deep_supervision else outputs[-1]


def _encoder_weights(saved: dict, source: Path) -> dict[str, torch.Tensor]:
    """The pretrained ``conv_blocks_context...`` tensors of an encoder export
    (``state_dict``), a pretrained STU-Net export (``network_weights``, only the stages
    its ``anatomask_fast`` metadata names as pretrained) or a pretraining checkpoint
    (``model`` with ``encoder.`` prefixes)."""
    if isinstance(saved.get("anatomask_fast"), dict) and isinstance(
        saved.get("network_weights"), dict
    ):
        prefixes = tuple(p + "." for p in saved["anatomask_fast"].get("pretrained", ()))
        return {k: v for k, v in saved["network_weights"].items() if k.startswith(prefixes)}
    if isinstance(saved.get("state_dict"), dict):
        return saved["state_dict"]
    if isinstance(saved.get("model"), dict):
        prefix = "encoder."
        return {k[len(prefix) :]: v for k, v in saved["model"].items() if k.startswith(prefix)}
    if saved and all(isinstance(v, torch.Tensor) for v in saved.values()):
        return saved
    raise ValueError(
        f"{source}: not an encoder export (key 'state_dict'), a pretrained "
        f"STU-Net export (keys 'network_weights', 'anatomask_fast') or a "
        f"pretraining checkpoint (key 'model'); it has keys {sorted(saved)[:8]}"
    )


def _modules(names: list[str]) -> list[str]:
    """``conv_blocks_context.5.0.conv1.weight`` -> ``conv_blocks_context.5``, the decoder's
    and heads' tensors by their top module, in order."""
    found: dict[str, None] = {}
    for name in names:
        parts = name.split(".")
        found[".".join(parts[:2]) if parts[0] == "conv_blocks_context" else parts[0]] = None
    return list(found)


def load_encoder(model: STUNet, path: str | Path, *, verbose: bool = True) -> dict[str, list[str]]:
    """Loads the pretrained encoder stages matching ``model``'s by name and shape from a
    pretraining checkpoint, an encoder export or a pretrained STU-Net export; prints and
    returns what loaded (``loaded``, ``shape_mismatch``, ``missing``: encoder tensors the
    file lacks) and what starts fresh (``fresh``: modules, e.g. stage 5, the decoder and
    the heads). Raises when nothing fits."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"encoder weights {path} do not exist")
    weights = _encoder_weights(safe_load(path, "encoder weights"), path)
    own = model.state_dict()
    report: dict[str, list[str]] = {"loaded": [], "shape_mismatch": [], "missing": []}
    fitting = {}
    for name, value in own.items():
        if name not in weights:
            if name.startswith("conv_blocks_context.") and _modules([name])[0] in _modules(
                list(weights)
            ):
                report["missing"].append(name)
        elif tuple(weights[name].shape) != tuple(value.shape):
            report["shape_mismatch"].append(
                f"{name}: file {tuple(weights[name].shape)}, model {tuple(value.shape)}"
            )
        else:
            fitting[name] = weights[name]
            report["loaded"].append(name)
    if not fitting:
        detail = report["shape_mismatch"][:3] or [
            f"no 'conv_blocks_context.' keys among {sorted(weights)[:4]}"
        ]
        raise ValueError(
            f"{path}: no encoder weight fits STU-Net-{model.size} with "
            f"{model.in_channels} input channel(s) ({'; '.join(detail)})"
        )
    model.load_state_dict(fitting, strict=False)
    report["fresh"] = _modules([k for k in own if k not in fitting])
    if verbose:
        print(
            f"  encoder weights from {path}: {len(report['loaded'])}/{len(own)} tensors "
            f"loaded ({', '.join(_modules(report['loaded']))}), "
            f"{len(report['shape_mismatch'])} shape mismatches, "
            f"{len(report['missing'])} missing; starting fresh: {', '.join(report['fresh'])}"
        )
        for line in report["shape_mismatch"][:5] + report["missing"][:5]:
            print(f"    not loaded: {line}")
    return report
