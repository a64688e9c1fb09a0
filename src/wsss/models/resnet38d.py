"""ResNet-38d: the wide ResNet-38 of Wu, Shen and van den Hengel ("Wider or Deeper", 2019) as PSA, SEAM
and their successors use it for WSSS: pre-activation residual units, output stride 8 (the strides of
the first seven stages stop after b4; b5 is dilated by 2, b6 and b7 by 4), 4096 output channels, and
Dropout2d inside the two bottleneck stages b6 and b7.

Module names follow the PyTorch conversion of the published MXNet ImageNet weights
(`ilsvrc-cls_rna-a1_cls1000_ep-0001.params` -> `conv1a.weight`, `b2.bn_branch2a.running_mean`,
`b4_5.conv_branch2b1.weight`, `b7.conv_branch2b2.weight`, `bn7.weight`, ...): such a file loads into
`ResNet38d` tensor by tensor (`load_resnet38d_weights`). That conversion has no `num_batches_tracked`
buffers and no classifier; both are tolerated, anything else that does not match is an error.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from wsss.io import DataError, load_checkpoint

# Dropout2d probabilities of b6 and b7 in the published network.
DEFAULT_DROPOUT = (0.3, 0.5)


class _Unit(nn.Module):
    """Pre-activation unit of two 3x3 convs: BN-ReLU, then the residual branch and (when the shape
    changes) a 1x1 projection of the activated input."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int = 1, dilation: int = 1, first_dilation: int | None = None):
        super().__init__()
        d1 = dilation if first_dilation is None else first_dilation
        self.bn_branch2a = nn.BatchNorm2d(cin)
        self.conv_branch2a = nn.Conv2d(cin, mid, 3, stride, padding=d1, dilation=d1, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(mid)
        self.conv_branch2b1 = nn.Conv2d(mid, cout, 3, padding=dilation, dilation=dilation, bias=False)
        self.project = cin != cout or stride != 1
        if self.project:
            self.conv_branch1 = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn_branch2a(x))
        shortcut = self.conv_branch1(a) if self.project else x
        y = self.conv_branch2b1(F.relu(self.bn_branch2b1(self.conv_branch2a(a))))
        return shortcut + y


class _Bottleneck(nn.Module):
    """Pre-activation bottleneck 1x1 (C/4) - 3x3 dilated (C/2) - 1x1 (C), Dropout2d before the last two
    convs, always with a 1x1 projection shortcut."""

    def __init__(self, cin: int, cout: int, dilation: int, dropout: float):
        super().__init__()
        q, h = cout // 4, cout // 2
        self.bn_branch2a = nn.BatchNorm2d(cin)
        self.conv_branch2a = nn.Conv2d(cin, q, 1, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(q)
        self.dropout_2b1 = nn.Dropout2d(dropout)
        self.conv_branch2b1 = nn.Conv2d(q, h, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn_branch2b2 = nn.BatchNorm2d(h)
        self.dropout_2b2 = nn.Dropout2d(dropout)
        self.conv_branch2b2 = nn.Conv2d(h, cout, 1, bias=False)
        self.conv_branch1 = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn_branch2a(x))
        y = self.conv_branch2b1(self.dropout_2b1(F.relu(self.bn_branch2b1(self.conv_branch2a(a)))))
        y = self.conv_branch2b2(self.dropout_2b2(F.relu(self.bn_branch2b2(y))))
        return self.conv_branch1(a) + y


class ResNet38d(nn.Module):
    """[B,3,H,W] -> [B,4096,ceil(H/8),ceil(W/8)] (after the final BN-ReLU, `bn7`)."""

    out_channels = 4096
    stride = 8

    def __init__(self, dropout: tuple[float, float] | list[float] = DEFAULT_DROPOUT):
        super().__init__()
        if len(dropout) != 2:
            raise ValueError(f"resnet38d: dropout needs two probabilities (b6, b7), got {list(dropout)}")
        self.conv1a = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.b2, self.b2_1, self.b2_2 = _Unit(64, 128, 128, stride=2), _Unit(128, 128, 128), _Unit(128, 128, 128)
        self.b3, self.b3_1, self.b3_2 = _Unit(128, 256, 256, stride=2), _Unit(256, 256, 256), _Unit(256, 256, 256)
        self.b4 = _Unit(256, 512, 512, stride=2)
        for i in range(1, 6):
            setattr(self, f"b4_{i}", _Unit(512, 512, 512))
        self.b5 = _Unit(512, 512, 1024, dilation=2, first_dilation=1)
        self.b5_1, self.b5_2 = _Unit(1024, 512, 1024, dilation=2), _Unit(1024, 512, 1024, dilation=2)
        self.b6 = _Bottleneck(1024, 2048, dilation=4, dropout=float(dropout[0]))
        self.b7 = _Bottleneck(2048, 4096, dilation=4, dropout=float(dropout[1]))
        self.bn7 = nn.BatchNorm2d(4096)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def units(self) -> list[nn.Module]:
        """conv1a, then the residual units in order (b2 ... b7); bn7 follows b7."""
        return [m for name, m in self.named_children() if name != "bn7"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.units():
            x = m(x)
        return F.relu(self.bn7(x))


_PREFIXES = ("", "module.", "model.", "backbone.", "backbone.model.", "module.backbone.", "encoder.")


def load_resnet38d_weights(net: ResNet38d, path: str | Path) -> int:
    """Load a ResNet-38d weights file key by key (weights_only=True). The key prefix (none, `module.`,
    `backbone.model.`, ...) is the one that matches most keys. Missing `num_batches_tracked` buffers are
    fine (the published conversion has none); any other missing, unexpected or misshapen key raises a
    DataError naming them. Returns the number of tensors loaded."""
    from wsss.models.backbones import _unwrap_state_dict

    sd = _unwrap_state_dict(load_checkpoint(path), str(path))
    target = net.state_dict()
    prefix = max(_PREFIXES, key=lambda p: sum(k.startswith(p) and k[len(p) :] in target for k in sd))
    sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)} if prefix else sd
    missing = [k for k in target if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in target]
    shapes = [f"{k} {tuple(sd[k].shape)} != {tuple(target[k].shape)}" for k in target if k in sd and sd[k].shape != target[k].shape]
    if missing or unexpected or shapes:

        def some(keys: list[str]) -> str:
            return ", ".join(keys[:6]) + (f" ... ({len(keys)} in all)" if len(keys) > 6 else "")

        parts = [
            f"{label}: {some(keys)}"
            for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes))
            if keys
        ]
        raise DataError(f"{path}: not a ResNet-38d weights file ({'; '.join(parts)})")
    net.load_state_dict(sd, strict=False)
    return len(sd)
