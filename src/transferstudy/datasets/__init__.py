"""Dataset importers. Each returns a ``DatasetIndex`` (sorted classes, labelled files, problems)."""

from .base import DatasetError, DatasetIndex, Problem, Sample
from .folders import scan_folders

__all__ = ["DatasetError", "DatasetIndex", "Problem", "Sample", "scan_folders"]
