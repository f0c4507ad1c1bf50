"""Runnable recipes (``python recipes/<name>.py`` or ``accelerate launch recipes/<name>.py``) with their YAML
configs in ``recipes/configs/``. From the repository root they also import as modules (``recipes.<name>``),
which is how the tests and the experiments call their ``main``."""
