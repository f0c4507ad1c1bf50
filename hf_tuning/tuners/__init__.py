"""Parameter-efficient transfer methods, one folder per method, PEFT style.

Each method lives in ``hf_tuning/tuners/<method>/``: ``config.py`` (a validated dataclass), ``layer.py``
(the modules it adds) and ``model.py`` (attaching them to a backbone and running it). Shared pieces:

* the methods and their classes: ``METHODS`` in :mod:`hf_tuning.tuners.model`
* the wrapper every method returns, saving, loading and pushing: :mod:`hf_tuning.tuners.model`
* the config base class: :mod:`hf_tuning.tuners.config`
* how a method walks a timm / transformers backbone: :mod:`hf_tuning.tuners.backbones`

Methods: ``dtl`` (DTL and DTL+, :mod:`hf_tuning.tuners.dtl`), ``dyt`` (Dynamic Tuning,
:mod:`hf_tuning.tuners.dyt`), ``snell`` and ``snella`` (kernelized sparse tuning, :mod:`hf_tuning.tuners.snell`).

The tuners sit between the engine core and the application domains (``llm``, ``vision``,
``diffusion``): they import only the core, and the domains may import them.

    from hf_tuning.tuners import DTLConfig, get_petl_model, load_petl_model

    model = get_petl_model(backbone, DTLConfig(rank=2))   # frozen backbone + side network + head
    model.save_pretrained("outputs/vit-dtl")             # adapter_config.json, adapter_model.safetensors, README.md
    model = load_petl_model(backbone, "outputs/vit-dtl")  # or a Hub repo id
"""

from __future__ import annotations

from hf_tuning.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "backbones": ("PetlBackboneError",),
        "config": ("PetlConfig", "PetlConfigError"),
        "dtl": ("DTLConfig", "DTLModel"),
        "dyt": ("DyTConfig", "DyTModel"),
        "snell": ("SNELLConfig", "SNELLAConfig", "SNELLModel"),
        "model": ("METHODS", "PetlModel", "get_petl_model", "load_petl_model"),
    },
    globals(),
)
