"""Dataset builders: instruction data (the AgriMachine sample and any alpaca / sharegpt / messages file),
image-classification splits (folders, VTAB-1k, FGVC, few-shot lists), scikit-learn digits as images, and
DiT knowledge banks.

Names are exported lazily, so ``import datasets_builders`` stays light (no ``datasets``, no torch).
"""

from __future__ import annotations

from hf_tuning.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "instruction_formats": (
            "BadRowsError",
            "BuildReport",
            "DataSourceNotFoundError",
            "EmptyDatasetError",
            "FormatError",
            "build_instruction_dataset",
            "detect_format",
            "read_source",
        ),
        "agrimachine": (
            "DEFAULT_SYSTEM_PROMPT",
            "SAMPLE_PATH",
            "AgriMachineDataArguments",
            "build_agrimachine_dataset",
            "push_dataset",
            "save_dataset",
        ),
    },
    globals(),
)
