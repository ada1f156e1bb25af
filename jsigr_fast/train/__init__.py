"""The training layer: ``jsigr-fast train`` and its Python API.

::

    from jsigr_fast.train import TrainConfig, train
    code = train(TrainConfig(method="jsigr", dataset="digits", epochs=5, out="runs/demo"))

Package map: ``config`` (the schema, files, presets), ``methods`` (one class per method),
``trainer`` (the loop), ``checkpoint`` (atomic, weights_only), ``distributed`` (torchrun/DDP),
``logs`` (CSV/TensorBoard), ``data`` / ``build`` (datasets, model, optimizer, schedule),
``throughput`` (img/s and epoch-time projection), ``signals`` (SIGTERM), ``cli``.
See docs/TRAINING.md.
"""
from .config import METHOD_NAMES, TrainConfig, build_config, load_config_file, resolve
from .errors import CheckpointError, ConfigError, DataError, NonFiniteError, TrainError
from .methods import METHODS
from .trainer import Trainer, train

__all__ = ["TrainConfig", "train", "Trainer", "METHODS", "METHOD_NAMES", "build_config", "load_config_file",
           "resolve", "TrainError", "ConfigError", "CheckpointError", "DataError", "NonFiniteError"]
