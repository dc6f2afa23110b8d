"""Model configuration: one dataclass per part, holding that part's upstream constructor arguments."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from quantvggt.lowbit.attention import check_attention_kind
from quantvggt.model.dinov2 import VIT_SIZES

# Every size in a config is a whole number in 1..MAX_SIZE unless listed in _SIZE_RANGE: a config.json or quant.json
# with 0, -1, "1024" or 1e9 there ended in a traceback (or a multi-GB allocation) inside the model's constructor
MAX_SIZE = 65536
_SIZE_RANGE = {"num_register_tokens": (0, 64), "rope_freq": (0, 1_000_000), "corr_radius": (0, 64)}
_NUMBER_RANGE = {"mlp_ratio": (1e-3, 64.0), "init_values": (0.0, 10.0)}
MAX_PARAMETERS = 2e10  # ~80 GB of float32 aggregator weights: no config of ours comes near (VGGT-1B: 1.2e9)


def _check_types(obj: Any) -> None:
    """Refuse a field of the wrong type or outside its range (``ValueError`` naming the field and the value)."""
    for f in dataclasses.fields(obj):
        value, kind = getattr(obj, f.name), str(f.type)
        if kind == "int":
            lo, hi = _SIZE_RANGE.get(f.name, (1, MAX_SIZE))
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ValueError(f"{f.name} must be a whole number in {lo}..{hi}, got {value!r}")
        elif kind == "float":
            lo, hi = _NUMBER_RANGE.get(f.name, (0.0, 1e6))
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
                raise ValueError(f"{f.name} must be a number in {lo:g}..{hi:g}, got {value!r}")
        elif kind == "bool" and not isinstance(value, bool):
            raise ValueError(f"{f.name} must be true or false, got {value!r}")
        elif kind == "str" and not isinstance(value, str):
            raise ValueError(f"{f.name} must be a string, got {value!r}")
        elif kind.startswith("list[") and not isinstance(value, list):
            raise ValueError(f"{f.name} must be a list, got {value!r}")
        elif kind == "list[int]":
            signed = f.name == "intermediate_layer_idx"  # negative indices count from the last block
            lo, hi = (-MAX_SIZE, MAX_SIZE) if signed else (1, MAX_SIZE)
            if any(isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi for v in value):
                raise ValueError(f"{f.name} must be whole numbers in {lo}..{hi}, got {value!r}")
        elif kind == "list[str]" and any(not isinstance(v, str) for v in value):
            raise ValueError(f"{f.name} must be strings, got {value!r}")


def _check_keys(cls: type, d: dict, where: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; known keys are {sorted(known)}")


@dataclass
class AggregatorConfig:
    """Alternating-attention aggregator (upstream ``Aggregator``)."""

    img_size: int = 518
    patch_size: int = 14
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_register_tokens: int = 4
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    patch_embed: str = "dinov2_vitl14_reg"
    aa_order: list[str] = field(default_factory=lambda: ["frame", "global"])
    aa_block_size: int = 1
    qk_norm: bool = True
    rope_freq: int = 100
    init_values: float = 0.01
    attention: str = "sdpa"  # frame/global attention: exact "sdpa" or "int8" Q·K^T (quantvggt.lowbit.attention)

    def __post_init__(self) -> None:
        _check_types(self)
        check_attention_kind(self.attention)
        if self.depth % self.aa_block_size:
            raise ValueError(f"depth {self.depth} must be divisible by aa_block_size {self.aa_block_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} must be divisible by num_heads {self.num_heads}")
        if any(t not in ("frame", "global") for t in self.aa_order):
            raise ValueError(f"aa_order entries must be 'frame' or 'global', got {self.aa_order}")
        if "conv" not in self.patch_embed:
            if self.patch_embed not in VIT_SIZES:
                raise ValueError(f"unknown patch_embed {self.patch_embed!r}")
            if VIT_SIZES[self.patch_embed][0] != self.embed_dim:
                raise ValueError(
                    f"{self.patch_embed} has width {VIT_SIZES[self.patch_embed][0]}, not embed_dim {self.embed_dim}"
                )


@dataclass
class CameraHeadConfig:
    """Iterative camera head (upstream ``CameraHead``)."""

    dim_in: int = 2048
    trunk_depth: int = 4
    pose_encoding_type: str = "absT_quaR_FoV"
    num_heads: int = 16
    mlp_ratio: int = 4
    init_values: float = 0.01
    trans_act: str = "linear"
    quat_act: str = "linear"
    fl_act: str = "relu"

    def __post_init__(self) -> None:
        _check_types(self)
        if self.pose_encoding_type != "absT_quaR_FoV":
            raise ValueError(f"unsupported pose_encoding_type {self.pose_encoding_type!r}")


@dataclass
class DPTHeadConfig:
    """Dense prediction head (upstream ``DPTHead``)."""

    dim_in: int = 2048
    patch_size: int = 14
    output_dim: int = 4
    activation: str = "inv_log"
    conf_activation: str = "expp1"
    features: int = 256
    out_channels: list[int] = field(default_factory=lambda: [256, 512, 1024, 1024])
    intermediate_layer_idx: list[int] = field(default_factory=lambda: [4, 11, 17, 23])
    pos_embed: bool = True
    feature_only: bool = False
    down_ratio: int = 1

    def __post_init__(self) -> None:
        _check_types(self)
        if len(self.out_channels) != 4 or len(self.intermediate_layer_idx) != 4:
            raise ValueError("DPT head needs exactly 4 out_channels and 4 intermediate_layer_idx")


def _depth_head_default() -> DPTHeadConfig:
    return DPTHeadConfig(output_dim=2, activation="exp")


@dataclass
class TrackHeadConfig:
    """Point tracking head (upstream ``TrackHead``)."""

    dim_in: int = 2048
    patch_size: int = 14
    features: int = 128
    iters: int = 4
    predict_conf: bool = True
    stride: int = 2
    corr_levels: int = 7
    corr_radius: int = 4
    hidden_size: int = 384
    pos_embed: bool = True  # upstream's current default; releases before its track-head fix hard-coded False

    def __post_init__(self) -> None:
        _check_types(self)


_PARTS: dict[str, type] = {
    "aggregator": AggregatorConfig,
    "camera_head": CameraHeadConfig,
    "depth_head": DPTHeadConfig,
    "point_head": DPTHeadConfig,
    "track_head": TrackHeadConfig,
}


@dataclass
class VGGTConfig:
    """Whole-model config; the defaults are VGGT-1B. A part set to ``None`` is absent."""

    aggregator: AggregatorConfig = field(default_factory=AggregatorConfig)
    camera_head: CameraHeadConfig | None = field(default_factory=CameraHeadConfig)
    depth_head: DPTHeadConfig | None = field(default_factory=_depth_head_default)
    point_head: DPTHeadConfig | None = field(default_factory=DPTHeadConfig)
    track_head: TrackHeadConfig | None = field(default_factory=TrackHeadConfig)
    image_size: int = 518  # preprocessing target width the model was trained at (shipped small models: 112)

    def __post_init__(self) -> None:
        if self.aggregator is None:
            raise ValueError("the aggregator is required")
        size = self.image_size
        if isinstance(size, bool) or not isinstance(size, int) or not 14 <= size <= MAX_SIZE or size % 14:
            raise ValueError(f"image_size must be a positive multiple of 14 up to {MAX_SIZE}, got {size!r}")
        params = 24 * self.aggregator.depth * self.aggregator.embed_dim**2  # frame + global blocks, 12 d^2 each
        if params > MAX_PARAMETERS:
            raise ValueError(
                f"aggregator: depth {self.aggregator.depth} x embed_dim {self.aggregator.embed_dim} is ~{params:.1e}"
                f" parameters, over the {MAX_PARAMETERS:.0e} limit"
            )
        width = 2 * self.aggregator.embed_dim
        depth = self.aggregator.depth
        for name in ("camera_head", "depth_head", "point_head", "track_head"):
            part = getattr(self, name)
            if part is not None and part.dim_in != width:
                raise ValueError(f"{name}.dim_in is {part.dim_in}, expected 2*embed_dim = {width}")
        for name in ("depth_head", "point_head"):
            part = getattr(self, name)
            if part is not None and any(not -depth <= i < depth for i in part.intermediate_layer_idx):
                raise ValueError(
                    f"{name}.intermediate_layer_idx {part.intermediate_layer_idx} out of range for depth {depth}"
                )

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict with every argument filled in (``None`` for absent parts)."""
        d: dict[str, Any] = {
            name: (None if getattr(self, name) is None else dataclasses.asdict(getattr(self, name))) for name in _PARTS
        }
        d["image_size"] = self.image_size
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VGGTConfig:
        """Build from a nested dict; missing arguments take upstream defaults, missing parts are absent."""
        if "config" in d and isinstance(d["config"], dict) and "aggregator" in d["config"]:
            d = d["config"]
        unknown = set(d) - set(_PARTS) - {"image_size"}
        if unknown:
            raise ValueError(f"unknown model parts {sorted(unknown)}; expected {sorted(_PARTS)} and image_size")
        kwargs: dict[str, Any] = {"image_size": d.get("image_size", 518)}
        for name, part_cls in _PARTS.items():
            sub = d.get(name)
            if sub is None:
                if name == "aggregator":
                    raise ValueError("config has no 'aggregator' part")
                kwargs[name] = None
                continue
            if not isinstance(sub, dict):
                raise ValueError(f"{name} must be an object of options or null, got {sub!r}")
            _check_keys(part_cls, sub, name)
            base = _depth_head_default() if name == "depth_head" else part_cls()
            try:
                kwargs[name] = dataclasses.replace(base, **sub)
            except ValueError as e:  # the part's own check: say which part
                raise ValueError(f"{name}: {e}") from None
        return cls(**kwargs)

    @classmethod
    def from_upstream(cls, img_size: int = 518, patch_size: int = 14, embed_dim: int = 1024) -> VGGTConfig:
        """Config of upstream ``VGGT(img_size, patch_size, embed_dim)`` (the hub ``config.json`` form)."""
        agg = AggregatorConfig(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim)
        w = 2 * embed_dim
        return cls(
            image_size=img_size,
            aggregator=agg,
            camera_head=CameraHeadConfig(dim_in=w),
            depth_head=DPTHeadConfig(dim_in=w, patch_size=patch_size, output_dim=2, activation="exp"),
            point_head=DPTHeadConfig(dim_in=w, patch_size=patch_size),
            track_head=TrackHeadConfig(dim_in=w, patch_size=patch_size),
        )
