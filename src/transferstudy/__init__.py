"""transferstudy: how to transfer an ImageNet-pretrained ResNet-50 to a new image dataset.

The engine (this package) prepares data, builds and fine-tunes the network and scores it.
It never imports Prefect; only ``study`` and ``report`` import Optuna, so the training core
runs wherever torch, torchvision and numpy are installed.
"""

__version__ = "0.1.0"
