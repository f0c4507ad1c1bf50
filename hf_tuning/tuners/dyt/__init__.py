"""DyT (Dynamic Tuning): per-token routing around each block's frozen MLP, with a parallel adapter.

* settings: :mod:`hf_tuning.tuners.dyt.config` (``DyTConfig``)
* modules: :mod:`hf_tuning.tuners.dyt.layer` (router, Gumbel gate, adapter, MoE adapter)
* the gated blocks, the efficient inference path and the method's loss: :mod:`hf_tuning.tuners.dyt.model`
"""

from hf_tuning.tuners.dyt.config import DyTConfig
from hf_tuning.tuners.dyt.model import DyTModel

__all__ = ["DyTConfig", "DyTModel"]
