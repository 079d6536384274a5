"""The model zoo: the networks of the DeepIoT paper, adapted to a data set's shape.

Every builder takes ``input_shape`` (one sample, no batch axis) and ``num_classes`` and returns a
plain ``nn.Module`` whose ``forward`` is traceable by ``torch.fx`` (no data-dependent control
flow, shapes taken from tensors rather than hard-coded), because compression and export work on
the traced graph.
"""

from __future__ import annotations

import torch
from torch import nn

from deepfleet.errors import ModelError

Shape = tuple[int, ...]


def _refuse_flat(name: str, input_shape: Shape, needs: str) -> None:
    """One clear line for flat (F,) feature vectors given to a model that needs structure."""
    if len(input_shape) == 1:
        raise ModelError(
            f"{name} needs {needs}, but the data gives flat feature vectors of shape "
            f"{tuple(input_shape)}; use the model 'mlp' (or a module:function model) for (N, F) features"
        )


def _image_shape(name: str, input_shape: Shape, min_side: int) -> tuple[int, int, int]:
    _refuse_flat(name, input_shape, "images shaped (C, H, W)")
    if len(input_shape) != 3:
        raise ModelError(
            f"{name} needs images shaped (C, H, W), but the data gives samples of shape "
            f"{tuple(input_shape)}; use an image data set such as 'digits', or the model 'bilstm' "
            "or 'deepsense' for (C, T) sequences"
        )
    c, h, w = input_shape
    if min(h, w) < min_side:
        raise ModelError(
            f"{name} needs images of at least {min_side}x{min_side}, but got {h}x{w}; "
            "resize the images or use the model 'mlp'"
        )
    return c, h, w


def _sequence_shape(name: str, input_shape: Shape) -> tuple[int, int]:
    _refuse_flat(name, input_shape, "sequences shaped (C, T) or images (C, H, W)")
    if len(input_shape) == 2:
        return input_shape[0], input_shape[1]
    if len(input_shape) == 3:  # an image read row by row: features C*W, time H
        c, h, w = input_shape
        return c * w, h
    raise ModelError(
        f"{name} needs sequences shaped (C, T) or images (C, H, W), but got {tuple(input_shape)}"
    )


class MLP(nn.Module):
    """Flatten, hidden fully connected ReLU layers, classifier: LeNet-300-100 by default. Takes
    any sample shape, flat (F,) feature vectors included."""

    def __init__(self, in_features: int, num_classes: int, hidden: tuple[int, ...] = (300, 100)):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LeNet5(nn.Module):
    """The LeNet5 of DeepIoT: conv 5x5 x20, pool, conv 5x5 x50, pool, fc 500, classifier.

    On 28x28 inputs this is the paper's 431,080-parameter network.
    """

    def __init__(self, input_shape: Shape, num_classes: int):
        super().__init__()
        c, h, w = _image_shape("lenet5", input_shape, min_side=16)
        self.conv1 = nn.Conv2d(c, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        fh, fw = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2
        self.fc1 = nn.Linear(50 * fh * fw, 500)
        self.fc2 = nn.Linear(500, num_classes)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))  # (B, 20, 12, 12) on 28x28
        x = self.pool(torch.relu(self.conv2(x)))  # (B, 50, 4, 4)
        x = torch.flatten(x, 1)  # (B, 800): channel c owns rows 16c..16c+15
        x = torch.relu(self.fc1(x))
        return self.fc2(x)


class VGG(nn.Module):
    """A small VGG: blocks of 3x3 conv + BN + ReLU, max-pooling between blocks, two fc layers."""

    def __init__(self, input_shape: Shape, num_classes: int, width: int = 16, blocks: int = 3):
        super().__init__()
        c, h, w = _image_shape("vgg", input_shape, min_side=2**blocks)
        layers: list[nn.Module] = []
        ch = c
        for b in range(blocks):
            out = width * 2**b
            for _ in range(2):
                layers += [nn.Conv2d(ch, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
                ch = out
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(ch * h * w, 8 * width),
            nn.ReLU(),
            nn.Dropout(0.3),
            nn.Linear(8 * width, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BiLSTM(nn.Module):
    """Stacked bidirectional LSTM over time, mean over time, classifier."""

    def __init__(self, input_shape: Shape, num_classes: int, hidden: int = 64, layers: int = 2):
        super().__init__()
        features, _ = _sequence_shape("bilstm", input_shape)
        self.image = len(input_shape) == 3
        self.lstm = nn.LSTM(features, hidden, num_layers=layers, bidirectional=True, batch_first=True)
        self.fc = nn.Linear(2 * hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.image:
            x = x.permute(0, 2, 1, 3).flatten(2)  # (B, H, C*W): rows are time steps
        else:
            x = x.transpose(1, 2)  # (B, T, C)
        out, _ = self.lstm(x)  # (B, T, 2H)
        return self.fc(out.mean(1))


class DeepSense(nn.Module):
    """DeepSense: per-sensor conv branches, merge by concatenation, merge conv, 2-layer GRU.

    Input (C, T): consecutive groups of ``sensor_channels`` channels are one sensor (x, y, z of
    an accelerometer, then of a gyroscope, ...).
    """

    def __init__(
        self, input_shape: Shape, num_classes: int, sensor_channels: int = 3, width: int = 32
    ):
        super().__init__()
        _refuse_flat("deepsense", input_shape, "multi-sensor sequences shaped (C, T)")
        if len(input_shape) != 2:
            raise ModelError(
                f"deepsense needs multi-sensor sequences shaped (C, T), but got {tuple(input_shape)}; "
                "use the data set 'sensing' or an .npz with X of shape (N, C, T)"
            )
        channels = input_shape[0]
        if channels % sensor_channels:
            raise ModelError(
                f"deepsense splits the {channels} input channels into sensors of {sensor_channels} "
                f"axes each, but {channels} is not a multiple of {sensor_channels}"
            )
        self.sensor_channels = sensor_channels
        self.branches = nn.ModuleList(
            nn.Sequential(
                nn.Conv1d(sensor_channels, width, 5, padding=2),
                nn.BatchNorm1d(width),
                nn.ReLU(),
                nn.Conv1d(width, width, 5, padding=2),
                nn.BatchNorm1d(width),
                nn.ReLU(),
            )
            for _ in range(channels // sensor_channels)
        )
        merged = width * len(self.branches)
        self.merge = nn.Sequential(
            nn.Conv1d(merged, 2 * width, 3, padding=1), nn.BatchNorm1d(2 * width), nn.ReLU()
        )
        self.gru = nn.GRU(2 * width, 2 * width, num_layers=2, batch_first=True)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.sensor_channels
        parts = [branch(x[:, i * k : (i + 1) * k]) for i, branch in enumerate(self.branches)]
        x = self.merge(torch.cat(parts, 1))  # (B, 2W, T)
        out, _ = self.gru(x.transpose(1, 2))  # (B, T, 2W)
        return self.fc(out.mean(1))


def mlp(input_shape: Shape, num_classes: int) -> nn.Module:
    features = 1
    for d in input_shape:
        features *= d
    return MLP(features, num_classes)


def deepear(input_shape: Shape, num_classes: int) -> nn.Module:
    """DeepEar's DNN (Lane et al., UbiComp 2015): three fully connected hidden layers of 1024
    ReLU units on a window of log-mel frames, flattened.

    Any sample shape is flattened; it is meant for (mel bands, frames) windows such as the
    ``audio`` set's (24, 8). The two 1024 x 1024 layers hold 2,099,200 parameters whatever the
    input; 24 bands x 8 frames = 192 inputs add 197,632 and 8 classes 8,200: 2,305,032 in all,
    DeepEar's 2.3 M.
    """
    features = 1
    for d in input_shape:
        features *= d
    return MLP(features, num_classes, hidden=(1024, 1024, 1024))


def lenet5(input_shape: Shape, num_classes: int) -> nn.Module:
    return LeNet5(input_shape, num_classes)


def vgg(input_shape: Shape, num_classes: int, width: int = 16) -> nn.Module:
    return VGG(input_shape, num_classes, width=width)


def bilstm(input_shape: Shape, num_classes: int) -> nn.Module:
    return BiLSTM(input_shape, num_classes)


def deepsense(input_shape: Shape, num_classes: int) -> nn.Module:
    return DeepSense(input_shape, num_classes)


ZOO = {"mlp": mlp, "lenet5": lenet5, "vgg": vgg, "bilstm": bilstm, "deepsense": deepsense,
       "deepear": deepear}
