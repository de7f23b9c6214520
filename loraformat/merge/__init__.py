"""Merging adapters into a base: the weight arithmetic, the streamed checkpoint merge, and ONNX
initializer surgery. Torch-free."""

from .checkpoint import MergeResult, merge_checkpoint, unmerge_checkpoint
from .plan import MergePlan, TensorOp, open_adapter, plan_merge
from .weights import Contribution, merge_bias, merge_weight

__all__ = [
    "Contribution",
    "MergePlan",
    "MergeResult",
    "TensorOp",
    "merge_bias",
    "merge_checkpoint",
    "merge_weight",
    "open_adapter",
    "plan_merge",
    "unmerge_checkpoint",
]
