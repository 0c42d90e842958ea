"""The AnatoMask / SparK pretraining network: a sparse encoder (STU-Net's, or nnU-Net's
residual encoder: ``AnatoMaskNet(encoder=...)``), densify (sparse norm, mask token,
projection per stage) and the light decoder.

Parameter names follow the published code (``encoder.conv_blocks_context...``,
``mask_tokens.{i}``, ``densify_norms.{i}``, ``densify_projs.{i}``, ``decoder.dec...``),
so one state_dict serves both executions:

- ``lean=False``: densifies all five stages, the full-resolution one included, which
  the decoder never reads, and runs the decoder storing every activation;
- ``lean=True``: skips that unused densify and runs the decoder's memory-lean path.
Both give the same reconstruction. :func:`reference_execution` runs the networks the
published code's way (dense-masked encoder, plain-PyTorch reference ops, ``lean`` off):
the baseline of the benchmarks and of the equivalence tests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ..dispatch import use_backend
from ..ops.gather_scatter import densify, sparse_norm
from .decoder import LightDecoder
from .sparse_encoder import SparseEncoder, SparseSTUNetEncoder, all_visible
from .stunet import STUNetEncoder

# Decoder widths of the published setting (512 for STU-Net); the tiny test model
# keeps the same 16x ratio to its first stage.
DECODER_WIDTHS = {"tiny": 128, "S": 512, "B": 512, "L": 512, "H": 512}
# Decoder levels whose input has at least this many voxels per channel run channels-last
# (see AnatoMaskNet._densify). Measured on CPU, STU-Net-B widths, up-sampling + conv
# forward: 512 ch at 4^3 is 1.5x slower channels-last, 256 at 8^3 equal, 128 at 16^3
# and 64 at 32^3 1.1x and 1.5x faster.
CHANNELS_LAST_MIN_VOXELS = 16**3
# The published densify norm (SparseInstanceNorm) uses eps 1e-6, not PyTorch's 1e-5.
DENSIFY_EPS = 1e-6


class AnatoMaskNet(nn.Module):
    """``per_sample_norm=False`` (published): the sparse norms' statistics are pooled over
    the batch; True: per sample, as the dense network at fine-tuning.

    By default the encoder is STU-Net's of ``size``; ``encoder`` (a
    :class:`SparseEncoder`, built with the same ``per_sample_norm`` and
    ``packed_stages``) and ``decoder_width`` give another."""

    def __init__(
        self,
        size: str = "B",
        in_channels: int = 1,
        *,
        per_sample_norm: bool = False,
        packed_stages: int | None = None,
        sync_bn: bool = False,
        encoder: SparseEncoder | None = None,
        decoder_width: int | None = None,
    ) -> None:
        super().__init__()
        self.size = size
        self.per_sample_norm = per_sample_norm
        if encoder is None:
            encoder = SparseSTUNetEncoder(
                STUNetEncoder.from_size(size, in_channels),
                per_sample=per_sample_norm,
                packed_stages=packed_stages,
            )
            decoder_width = DECODER_WIDTHS[size]
        self.encoder = encoder
        widths = encoder.widths[::-1]  # deepest first
        # Stages coarser than the mask cells are unmasked: no mask token is ever used.
        self.masked_levels = getattr(encoder, "masked_stages", (True,) * len(widths))[::-1]
        self.mask_tokens = nn.ParameterList()
        self.densify_norms = nn.ModuleList()
        self.densify_projs = nn.ModuleList()
        for i, width in enumerate(widths):
            out = decoder_width // 2**i
            token = nn.Parameter(torch.zeros(1, width, 1, 1, 1))
            nn.init.trunc_normal_(token, mean=0, std=0.02, a=-0.02, b=0.02)
            self.mask_tokens.append(token)
            self.densify_norms.append(nn.InstanceNorm3d(width, affine=True, eps=DENSIFY_EPS))
            if i == 0:
                proj = nn.Identity() if width == out else nn.Conv3d(width, out, 1)
            else:
                proj = nn.Conv3d(width, out, 3, padding=1)
            self.densify_projs.append(proj)
        self.decoder = LightDecoder(
            levels=len(widths) - 1,
            width=decoder_width,
            out_channels=in_channels,
            sync_bn=sync_bn,
            strides=encoder.strides[::-1],
        )
        patch = encoder.patch
        self.patch_size = patch[0] if len(set(patch)) == 1 else patch
        self.lean = True  # False in reference_execution

    def unused_in_lean_mode(self) -> list[nn.Parameter]:
        """The full-resolution densify's parameters: computed by the reference, never read
        by the decoder, so they never receive a gradient either way; and the mask tokens
        of unmasked stages."""
        last = len(self.densify_projs) - 1
        return [
            self.mask_tokens[last],
            *self.densify_norms[last].parameters(),
            *self.densify_projs[last].parameters(),
            *(
                token
                for token, masked in zip(self.mask_tokens[:last], self.masked_levels)
                if not masked
            ),
        ]

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The dense encoder's weights (STU-Net: ``conv_blocks_context...``)."""
        return {k: v.detach().clone() for k, v in self.encoder.state_dict().items()}

    def forward(self, x: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """The reconstruction of ``x`` (B, C, H, W, D) seen through the visible mask
        ``active`` (B, 1, H/p, W/p, D/p), p the ``patch_size`` (16)."""
        return self.decode(self.densify_features(self.encode(x, active), active))

    # The three parts of forward, public for benchmarks.bench_pretrain_phases, which
    # times (and differentiates) each on its own.
    def encode(self, x: torch.Tensor, active: torch.Tensor) -> list[torch.Tensor | None]:
        """Every encoder stage's dense-masked output, deepest first; when lean, None for
        the stages the decoder does not read (the full-resolution one)."""
        stages = len(self.densify_norms)  # one per encoder stage
        first = stages - self._densified(stages)
        return self.encoder(x, active, first=first)[::-1]

    def densify_features(
        self, features: list[torch.Tensor | None], active: torch.Tensor
    ) -> list[torch.Tensor]:
        """The decoder's inputs: per stage (deepest first) the sparse norm, mask tokens at
        hidden positions, the projection; the full-resolution stage only when not lean
        (the decoder never reads it)."""
        return [
            self._densify(i, features[i], active) for i in range(self._densified(len(features)))
        ]

    def _densified(self, stages: int) -> int:
        return len(self.decoder.dec) if self.lean else stages

    def decode(self, maps: list[torch.Tensor]) -> torch.Tensor:
        return self.decoder(maps, lean=self.lean)

    def _densify(self, i: int, feature: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        norm = self.densify_norms[i]
        visible = active if self.masked_levels[i] else all_visible(feature)
        feature = sparse_norm(
            feature, visible, norm.weight, norm.bias, per_sample=self.per_sample_norm, eps=norm.eps
        )
        if self.masked_levels[i]:
            feature = densify(feature, active, self.mask_tokens[i])
        if self.lean and feature.shape[2:].numel() >= CHANNELS_LAST_MIN_VOXELS:
            # The decoder's large levels run channels-last: oneDNN's (transposed)
            # convolutions then need no im2col workspace, which on CPU is the largest
            # transient of a step. The deep levels stay plain: there the weights are
            # larger than the activations, and each convolution would first reorder
            # its (up to 64 MiB) weight to channels-last.
            feature = feature.contiguous(memory_format=torch.channels_last_3d)
        return self.densify_projs[i](feature)


@contextlib.contextmanager
def reference_execution(*networks: AnatoMaskNet) -> Iterator[None]:
    """Inside the block ``networks`` run as the published code does: every encoder
    stage dense-masked, every op on the reference backend, no lean decoder."""
    saved = [(net.encoder.packed_stages, net.lean) for net in networks]
    for net in networks:
        net.encoder.packed_stages, net.lean = 0, False
    try:
        with use_backend("reference"):
            yield
    finally:
        for net, (packed, lean) in zip(networks, saved):
            net.encoder.packed_stages, net.lean = packed, lean
