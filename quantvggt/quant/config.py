"""Quantization configs: one dataclass per algorithm, registered by its ``method`` name, and the named recipes.

A config only describes *what* to do; the handler registered for its type in :mod:`quantvggt.quant.api`
does it. Defining a subclass with a new ``method`` registers it for (de)serialisation and for recipe names
(``"<method>-w4a4"``); :func:`quantvggt.quant.api.register_quantize_handler` makes ``quantize_`` accept it.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

SCOPES = ("aggregator", "patch_embed", "camera_head", "dpt_heads")
VALID_BITS = (4, 6, 8, 16)
BIT_SETTINGS = {"w4a4": (4, 4), "w4a8": (4, 8), "w6a6": (6, 6), "w8a8": (8, 8), "w4a16": (4, 16), "w8a16": (8, 16)}
METHODS: dict[str, type[QuantConfig]] = {}
# ranges of the numeric options (a quant.json or an override with "x", -1 or 1e9 there failed deep inside, or never)
_INT_RANGE = {"seed": (0, 2**63 - 1), "epochs": (0, 10_000)}
_FLOAT_RANGE = (0.0, 1e6)


def _check_numbers(config: QuantConfig) -> None:
    """Refuse numeric and boolean options of the wrong type or out of range, naming the option."""
    for f in dataclasses.fields(config):
        value, kind = getattr(config, f.name), str(f.type)
        if kind == "int" and f.name not in ("w_bits", "a_bits"):  # bits have their own check and message
            lo, hi = _INT_RANGE.get(f.name, (0, 2**31))
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ValueError(f"{f.name} must be a whole number in {lo}..{hi}, got {value!r}")
        elif kind == "float":
            lo, hi = _FLOAT_RANGE
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
                raise ValueError(f"{f.name} must be a number in {lo:g}..{hi:g}, got {value!r}")
        elif kind == "bool" and not isinstance(value, bool):
            raise ValueError(f"{f.name} must be true or false, got {value!r}")


@dataclass
class QuantConfig:
    """Settings every method shares: bit widths (16 = not quantized), parts to quantize, per-layer overrides.

    ``layer_bits`` maps an fnmatch pattern over module names (e.g. ``"aggregator.global_blocks.23.*"``)
    to ``(w_bits, a_bits)``; the last matching pattern wins; ``(16, 16)`` leaves a layer in float.
    """

    w_bits: int = 4
    a_bits: int = 4
    scope: tuple[str, ...] = ("aggregator",)
    layer_bits: dict[str, tuple[int, int]] = field(default_factory=dict)
    seed: int = 0

    method: ClassVar[str] = "base"
    needs_calibration: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.method != "base":
            METHODS[cls.method] = cls

    def __post_init__(self) -> None:
        _check_numbers(self)
        if isinstance(self.scope, str) or not isinstance(self.scope, (list, tuple)):
            raise ValueError(f"scope must be a list of parts, got {self.scope!r}")
        if not isinstance(self.layer_bits, dict):
            raise ValueError(f"layer_bits must be an object of pattern: [w_bits, a_bits], got {self.layer_bits!r}")
        self.scope = tuple(self.scope)
        for s in self.scope:
            if s not in SCOPES:
                raise ValueError(f"unknown scope {s!r}; choose from {SCOPES}")
        if not self.scope:
            raise ValueError("scope is empty: nothing would be quantized")
        pairs = [("w_bits/a_bits", (self.w_bits, self.a_bits))]
        pairs += [(k, tuple(v)) for k, v in self.layer_bits.items()]
        for where, bits in pairs:
            if isinstance(bits, str) or len(bits) != 2:
                raise ValueError(f"{where}: expected (w_bits, a_bits), got {bits}")
            w, a = bits
            if w not in VALID_BITS or a not in VALID_BITS:
                raise ValueError(f"{where}: bits must be in {VALID_BITS}, got ({w}, {a})")
            if w == 16 and (where == "w_bits/a_bits" or a != 16):
                raise ValueError(
                    f"{where}: weights must be quantized (w_bits < 16); (16, 16) in layer_bits keeps a layer float"
                )
        self.layer_bits = {k: (int(v[0]), int(v[1])) for k, v in self.layer_bits.items()}

    @property
    def name(self) -> str:
        """Recipe-style name, e.g. ``quantvggt-w4a4``."""
        return f"{self.method}-w{self.w_bits}a{self.a_bits}"

    def bits_for(self, layer: str) -> tuple[int, int]:
        """``(w_bits, a_bits)`` for a module name: the defaults, or the last matching ``layer_bits`` pattern."""
        bits = (self.w_bits, self.a_bits)
        for pattern, b in self.layer_bits.items():
            if fnmatch.fnmatch(layer, pattern):
                bits = b
        return bits

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description including the method."""
        d = dataclasses.asdict(self)
        d["method"] = self.method
        d["scope"] = list(self.scope)
        d["layer_bits"] = {k: list(v) for k, v in self.layer_bits.items()}
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> QuantConfig:
        """Inverse of :meth:`to_dict`; unknown methods or options raise ``ValueError`` naming them."""
        d = dict(d)
        method = d.pop("method", None)
        if method not in METHODS:
            raise ValueError(f"unknown quantization method {method!r}; known: {', '.join(sorted(METHODS))}")
        cls = METHODS[method]
        _check_options(cls, d, f"method {method}")
        d["layer_bits"] = {k: tuple(v) for k, v in d.get("layer_bits", {}).items()}
        return cls(**d)


def _check_options(cls: type[QuantConfig], options: dict[str, Any], what: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(
            f"{what} has no option {', '.join(map(repr, unknown))}; its options: {', '.join(sorted(known))}"
        )


@dataclass
class RTNConfig(QuantConfig):
    """Round-to-nearest: per-channel weights, per-token activations, nothing else."""

    method: ClassVar[str] = "rtn"


@dataclass
class SmoothQuantConfig(QuantConfig):
    """SmoothQuant: migrate activation outliers into weights with ``s = max|X|^a / max|W|^(1-a)``, then RTN."""

    alpha: float = 0.5
    method: ClassVar[str] = "smoothquant"
    needs_calibration: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")


@dataclass
class QuaRotConfig(QuantConfig):
    """QuaRot-style: randomised Hadamard rotation of each quantized linear's input, then RTN."""

    method: ClassVar[str] = "quarot"


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
    method: ClassVar[str] = "quantvggt"
    needs_calibration: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.alpha_grid = tuple(float(a) for a in self.alpha_grid)
        if not 0.0 <= self.alpha <= 1.0 or any(not 0.0 <= a <= 1.0 for a in self.alpha_grid):
            raise ValueError(f"alpha values must be in [0, 1], got {self.alpha} / {self.alpha_grid}")
        if self.epochs < 0 or self.lr_scale < 0 or self.lr_clip < 0:
            raise ValueError("epochs and learning rates must be non-negative")


RECIPES: dict[str, QuantConfig] = {
    f"{m}-{b}": cls(w_bits=w, a_bits=a) for m, cls in METHODS.items() for b, (w, a) in BIT_SETTINGS.items()
}


def get_recipe(name: str, **overrides: Any) -> QuantConfig:
    """A fresh config for a recipe name ``<method>-<bits>`` (e.g. ``"quantvggt-w4a4"``), with option overrides.

    Works for any registered method; an option the method does not have raises ``ValueError`` naming it.
    """
    method, _, bits = name.rpartition("-")
    if name in RECIPES:
        base = copy.deepcopy(RECIPES[name])
    elif method in METHODS and bits in BIT_SETTINGS:
        w, a = BIT_SETTINGS[bits]
        base = METHODS[method](w_bits=w, a_bits=a)
    else:
        known = ", ".join(sorted(METHODS))
        raise ValueError(
            f"unknown recipe {name!r}; recipes are <method>-<bits> with method in ({known}) "
            f"and bits in ({', '.join(BIT_SETTINGS)})"
        )
    _check_options(type(base), overrides, f"recipe {name}")
    return dataclasses.replace(base, **overrides)


def recipe_overrides(
    seed: int | None = None, scope: Sequence[str] | None = None, epochs: int | None = None
) -> dict[str, Any]:
    """``get_recipe`` keyword overrides from command/flow options; options left at ``None`` keep the recipe's value.

    The recipe itself rejects an option it does not have (e.g. ``epochs`` for rtn-w4a4), so this never filters.
    """
    overrides: dict[str, Any] = {}
    if seed is not None:
        overrides["seed"] = seed
    if scope is not None:  # an empty scope is refused by the recipe ("nothing would be quantized")
        overrides["scope"] = tuple(scope)
    if epochs is not None:
        overrides["epochs"] = epochs
    return overrides


# What the pipeline ships (CLI `quantize`, the quantize flow and its deployment, the demo): every part at 4-bit
# weights. The recipes' own default scope (the paper's: aggregator only) stays what `evaluate` rows mean by a bare
# recipe name.
SHIPPED_SCOPE: tuple[str, ...] = ("aggregator", "camera_head", "dpt_heads")
