"""Training a CaptionModel on a feature store (`prefixcap train`).

`config` holds the options and imports no training library (the CLI's --help reads it); `trainer` holds
the loop: `Trainer(TrainConfig(...)).fit()`.
"""

from prefixcap.training.config import TrainConfig, resolve_config

__all__ = ["TrainConfig", "resolve_config"]
