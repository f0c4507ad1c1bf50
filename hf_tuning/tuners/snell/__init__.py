"""SNELL and SNELLA (kernelized sparse tuning): a sparse high-rank delta on every targeted linear layer.

* settings: :mod:`hf_tuning.tuners.snell.config` (``SNELLConfig``, ``SNELLAConfig``)
* modules: :mod:`hf_tuning.tuners.snell.layer` (the kernel delta, the sparsification, the adapted linear layer)
* SNELLA's budget allocator: :mod:`hf_tuning.tuners.snell.allocator`
* attaching, merging and unmerging: :mod:`hf_tuning.tuners.snell.model` (``SNELLModel``)
"""

from hf_tuning.tuners.snell.config import SNELLAConfig, SNELLConfig
from hf_tuning.tuners.snell.model import SNELLModel

__all__ = ["SNELLConfig", "SNELLAConfig", "SNELLModel"]
