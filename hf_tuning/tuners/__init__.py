"""Parameter-efficient transfer methods, one folder per method, PEFT style.

Each method lives in ``hf_tuning/tuners/<method>/`` with ``config.py`` (a validated dataclass),
``layer.py`` (the modules it adds to a backbone) and ``model.py`` (wrapping a backbone: freezing it,
adding the layers, saving and loading). The methods partition their parameters by the block they sit
in, so the staged engine runs ``dt1``..``dt4`` over them unchanged. None is implemented yet; see
``docs/petl.md`` for the planned methods and API.
"""
