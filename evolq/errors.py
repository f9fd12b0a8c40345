"""Exception types. Every user mistake raises a subclass of ``EvolQError`` with a
one-line message; the CLI prints it and exits with code 2."""

__all__ = [
    "EvolQError", "ConfigError", "UnknownModelError", "WeightsError", "DataError",
    "UnsupportedModelError", "CheckpointError", "ExportError", "ScaleOutError",
]


class EvolQError(Exception):
    """Base class of evolq's user-facing errors."""


class ConfigError(EvolQError, ValueError):
    """A configuration value is out of range or unknown (bits, searcher, loss, budgets...)."""


class UnknownModelError(EvolQError, KeyError):
    """No model of that name exists in timm (or torchvision)."""

    def __str__(self):  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class WeightsError(EvolQError):
    """A weights file is missing, unreadable, or does not fit the architecture."""


class DataError(EvolQError):
    """A dataset is missing, empty, unlabeled, unreadable or badly shaped."""


class UnsupportedModelError(EvolQError, TypeError):
    """No adapter knows this model's architecture."""


class CheckpointError(EvolQError):
    """A checkpoint or saved model is missing, tampered with, or belongs to another run."""


class ExportError(EvolQError):
    """A model, path or setting that cannot be exported (e.g. to ONNX)."""


class ScaleOutError(EvolQError):
    """Scale-out on Ray failed: a cluster that cannot be reached or started, fewer resources than
    asked, actors that cannot start or keep dying (``evolq.scaleout``)."""
