"""STU-Net encoder models: the dense encoder whose weights are exported, and the
sparse (dense-masked or visible-patch packed) execution used in pretraining, and the
AnatoMask pretraining network (``reference_execution`` runs it the published way)."""

from .anatomask import AnatoMaskNet, reference_execution
from .layout import MaskLayout, StagePlan
from .sparse_encoder import SparseSTUNetEncoder
from .stunet import STUNET_SIZES, BasicResBlock, STUNetEncoder, STUNetSize

__all__ = [
    "AnatoMaskNet",
    "BasicResBlock",
    "MaskLayout",
    "STUNET_SIZES",
    "STUNetEncoder",
    "STUNetSize",
    "SparseSTUNetEncoder",
    "StagePlan",
    "reference_execution",
]
