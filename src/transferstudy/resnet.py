"""ResNet-50, as torchvision defines it: the same modules, parameter names, computation and
random initialisation, so torchvision's state_dicts (ImageNet weights, local files) load into
it unchanged and a seed draws the same network.

It lives here so that the engine never imports torchvision just to build a network:
importing torchvision takes 3-4 s on a CPU (``torchvision.ops`` imports ``torch._dynamo``),
all of it in a process that does not train (predict, the report, a fan-out's parent), about
1 s in one that does (``torch.optim`` imports ``torch._dynamo`` itself). torchvision is
imported only to obtain its ImageNet weights (``model.py``). ``tests/test_model.py`` holds
this definition to torchvision's: parameter names and shapes, the random draw from one RNG
state, and the forward pass, exactly.

Layout (He et al. 2016, "ResNet v1.5"): a 7x7 stride-2 stem with max pooling, then four stages
of bottleneck blocks (3, 4, 6, 3 blocks; 64, 128, 256, 512 planes, 4x expansion) in which the
first block of stages 2-4 halves the resolution in its 3x3 convolution.
"""

from __future__ import annotations

import torch
from torch import nn

EXPANSION = 4


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand, each with batch norm; the shortcut is
    the input, or its 1x1-convolved projection (``downsample``) where the shape changes."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        # Registration order is torchvision's: the init loop below draws conv weights in it.
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * EXPANSION, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * EXPANSION)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != planes * EXPANSION:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * EXPANSION, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * EXPANSION),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


def _stage(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """``blocks`` bottlenecks; the first one changes the width (and the resolution if ``stride``)."""
    rest = (Bottleneck(planes * EXPANSION, planes) for _ in range(blocks - 1))
    return nn.Sequential(Bottleneck(inplanes, planes, stride), *rest)


class ResNet50(nn.Module):
    """``conv1 bn1 relu maxpool layer1..layer4 avgpool fc``, torchvision's names.

    ``init=False`` skips torchvision's re-initialisation, for a skeleton whose values are loaded
    next: on the meta device, ``normal_`` goes through a torch reference implementation that
    imports ``torch._dynamo``.
    """

    def __init__(self, num_classes: int = 1000, init: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = _stage(64, 64, blocks=3, stride=1)
        self.layer2 = _stage(256, 128, blocks=4, stride=2)
        self.layer3 = _stage(512, 256, blocks=6, stride=2)
        self.layer4 = _stage(1024, 512, blocks=3, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * EXPANSION, num_classes)
        # torchvision's init, in registration order (it replaces every conv's default draw,
        # which only moves the RNG on by a fixed count)
        for m in self.modules() if init else ():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))
