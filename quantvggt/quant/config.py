"""Quantization configs (one dataclass per algorithm) and the named recipes."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

SCOPES = ("aggregator", "patch_embed", "camera_head", "dpt_heads")
VALID_BITS = (4, 6, 8, 16)


@dataclass
class QuantConfig:
    """Common settings: bit widths (16 = not quantized), which parts to quantize, per-layer overrides.

    ``layer_bits`` maps an fnmatch pattern over module names (e.g. ``"aggregator.global_blocks.23.*"``)
    to ``(w_bits, a_bits)``; the last matching pattern wins.
    """

    w_bits: int = 4
    a_bits: int = 4
    scope: tuple[str, ...] = ("aggregator",)
    layer_bits: dict[str, tuple[int, int]] = field(default_factory=dict)
    seed: int = 0

    method = "base"
    rotate = False
    smooth = False

    def __post_init__(self) -> None:
        self.scope = tuple(self.scope)
        for s in self.scope:
            if s not in SCOPES:
                raise ValueError(f"unknown scope {s!r}; choose from {SCOPES}")
        if not self.scope:
            raise ValueError("scope is empty: nothing would be quantized")
        for where, (w, a) in [("w_bits/a_bits", (self.w_bits, self.a_bits))] + [
            (k, tuple(v)) for k, v in self.layer_bits.items()
        ]:
            if w not in VALID_BITS or a not in VALID_BITS:
                raise ValueError(f"{where}: bits must be in {VALID_BITS}, got ({w}, {a})")
            if w == 16:
                raise ValueError(
                    f"{where}: weights must be quantized (w_bits < 16); exclude the layer via scope instead"
                )
        self.layer_bits = {k: (int(v[0]), int(v[1])) for k, v in self.layer_bits.items()}

    @property
    def name(self) -> str:
        """Recipe-style name, e.g. ``quantvggt-w4a4``."""
        return f"{self.method}-w{self.w_bits}a{self.a_bits}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description including the method."""
        d = dataclasses.asdict(self)
        d["method"] = self.method
        d["scope"] = list(self.scope)
        d["layer_bits"] = {k: list(v) for k, v in self.layer_bits.items()}
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> QuantConfig:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        cls = METHODS[d.pop("method")]
        d["layer_bits"] = {k: tuple(v) for k, v in d.get("layer_bits", {}).items()}
        return cls(**d)


@dataclass
class RTNConfig(QuantConfig):
    """Round-to-nearest: per-channel weights, per-token activations, nothing else."""

    method = "rtn"


@dataclass
class SmoothQuantConfig(QuantConfig):
    """SmoothQuant: migrate activation outliers into weights with ``s = max|X|^a / max|W|^(1-a)``, then RTN."""

    alpha: float = 0.5
    method = "smoothquant"
    smooth = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")


@dataclass
class QuaRotConfig(QuantConfig):
    """QuaRot-style: randomised Hadamard rotation of each quantized linear's input, then RTN."""

    method = "quarot"
    rotate = True


@dataclass
class QuantVGGTConfig(QuantConfig):
    """QuantVGGT: Hadamard rotation + smoothing on the rotated tensors + learned clipping by block reconstruction."""

    alpha: float = 0.5
    alpha_grid: tuple[float, ...] = ()  # e.g. (0.0, 0.25, 0.5, 0.75): per-layer alpha search; () = paper (fixed alpha)
    epochs: int = 15
    lr_scale: float = 1e-3
    lr_clip: float = 1e-2
    weight_decay: float = 0.0
    learn_smooth: bool = True
    lwc: bool = True
    lac: bool = True
    clip_init: float = 4.0  # sigmoid(4) = 0.982 of the max
    method = "quantvggt"
    rotate = True
    smooth = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.alpha_grid = tuple(float(a) for a in self.alpha_grid)
        if not 0.0 <= self.alpha <= 1.0 or any(not 0.0 <= a <= 1.0 for a in self.alpha_grid):
            raise ValueError(f"alpha values must be in [0, 1], got {self.alpha} / {self.alpha_grid}")
        if self.epochs < 0 or self.lr_scale < 0 or self.lr_clip < 0:
            raise ValueError("epochs and learning rates must be non-negative")


METHODS: dict[str, type[QuantConfig]] = {
    c.method: c for c in (RTNConfig, SmoothQuantConfig, QuaRotConfig, QuantVGGTConfig)
}
BIT_SETTINGS = {"w4a4": (4, 4), "w4a8": (4, 8), "w6a6": (6, 6), "w8a8": (8, 8), "w4a16": (4, 16), "w8a16": (8, 16)}
RECIPES: dict[str, QuantConfig] = {
    f"{m}-{b}": cls(w_bits=w, a_bits=a) for m, cls in METHODS.items() for b, (w, a) in BIT_SETTINGS.items()
}


def get_recipe(name: str, **overrides: Any) -> QuantConfig:
    """A fresh copy of a named recipe (e.g. ``"quantvggt-w4a4"``), with field overrides."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(sorted(RECIPES))}")
    return dataclasses.replace(copy.deepcopy(RECIPES[name]), **overrides)
