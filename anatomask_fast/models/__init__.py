"""STU-Net encoder models: the dense encoder whose weights are exported, and the
sparse (dense-masked or visible-patch packed) execution used in pretraining."""
from .layout import MaskLayout, StagePlan
from .sparse_encoder import SparseSTUNetEncoder
from .stunet import STUNET_SIZES, BasicResBlock, STUNetEncoder, STUNetSize

__all__ = ["BasicResBlock", "MaskLayout", "STUNET_SIZES", "STUNetEncoder", "STUNetSize",
           "SparseSTUNetEncoder", "StagePlan"]
