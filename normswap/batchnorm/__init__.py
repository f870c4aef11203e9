"""BatchNorm → nothing: fold every inference-mode BatchNorm that follows a conv/linear layer into that layer, exactly.

* :func:`fold_batchnorms_` measures the structure on one forward, folds in float64, verifies, and reports what stayed
  (with the reason: a BatchNorm before a padded convolution, after a pooling, behind a shared producer, ...).
* The saved checkpoint keeps the stock keys (the stock class computes the folded function);
  :func:`fold_saved_batchnorms_` (used by ``normswap.load`` and the shipped remote code) removes the BatchNorms.
"""

from normswap.batchnorm.convert import (
    BatchNormReport,
    BatchStatisticsError,
    NothingToFoldError,
    check_inference_semantics,
    fold_batchnorms_,
)
from normswap.batchnorm.discover import Discovery, FoldPair, batchnorm_modules, discover
from normswap.publish.modeling_normswap import fold_saved_batchnorms_

__all__ = [
    "BatchNormReport",
    "BatchStatisticsError",
    "Discovery",
    "FoldPair",
    "NothingToFoldError",
    "batchnorm_modules",
    "check_inference_semantics",
    "discover",
    "fold_batchnorms_",
    "fold_saved_batchnorms_",
]
