"""Merging adapters into a base: the weight arithmetic, the streamed checkpoint merge, ONNX
initializer surgery, and merges into quantized bases (GGUF models, bitsandbytes 4-bit
checkpoints) with a survival report. Torch-free."""

from .bnb import BnbMergeResult, merge_bnb
from .checkpoint import MergeResult, merge_checkpoint, unmerge_checkpoint
from .gguf import GgufMergeResult, merge_gguf
from .plan import MergePlan, TensorOp, open_adapter, plan_merge
from .weights import Contribution, merge_bias, merge_weight

__all__ = [
    "BnbMergeResult",
    "Contribution",
    "GgufMergeResult",
    "MergePlan",
    "MergeResult",
    "TensorOp",
    "merge_bias",
    "merge_bnb",
    "merge_checkpoint",
    "merge_gguf",
    "merge_weight",
    "open_adapter",
    "plan_merge",
    "unmerge_checkpoint",
]
