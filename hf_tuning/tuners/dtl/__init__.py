"""DTL and DTL+ (Disentangled Transfer Learning): a compact side network beside a frozen backbone.

* settings: :mod:`hf_tuning.tuners.dtl.config` (``DTLConfig``; ``kernel_size > 0`` is DTL+)
* modules: :mod:`hf_tuning.tuners.dtl.layer` (low-rank map, patch-grid convolution)
* the walk over the blocks: :mod:`hf_tuning.tuners.dtl.model` (``DTLModel``)
"""

from hf_tuning.tuners.dtl.config import DTLConfig
from hf_tuning.tuners.dtl.model import DTLModel

__all__ = ["DTLConfig", "DTLModel"]
