"""Dataset importers. Each returns a ``DatasetIndex`` (class names, labelled files, problems).

``transferstudy.prepare.open_dataset`` picks the importer for a path.
"""

from .base import DatasetError, DatasetIndex, Problem, Sample
from .folders import scan_folders
from .manifest import read_manifest, write_manifest
from .stanford import scan_stanford_devkit

__all__ = [
    "DatasetError",
    "DatasetIndex",
    "Problem",
    "Sample",
    "read_manifest",
    "scan_folders",
    "scan_stanford_devkit",
    "write_manifest",
]
