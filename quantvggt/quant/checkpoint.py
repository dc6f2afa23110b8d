"""Quantized checkpoint format: a folder with ``model.safetensors`` (packed weights + the rest) and ``quant.json``.

``quant.json`` (format version 2) holds the model config (with ``image_size``), the quantization config, one
:class:`QuantLinearSpec` / :class:`QuantConv2dSpec` per quantized layer, calibration ids and the source weights'
SHA-256, and ``attention`` ("sdpa" | "int8": the aggregator's frame/global attention, also inside ``model_config``) so
a model saved with INT8 attention reloads with it. Version 1 (layer entries also carried ``block_loss``; ``image_size``
at the top level) still loads; files without ``attention`` (v1, early v2) load with exact "sdpa" attention.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

import quantvggt
from quantvggt.fsutil import atomic_dir, check_output_folder
from quantvggt.lowbit.attention import ATTENTION_KINDS
from quantvggt.model.config import VGGTConfig
from quantvggt.model.loading import CheckpointError, _strict_load, read_state_dict
from quantvggt.model.vggt import VGGT
from quantvggt.quant.calibrate import set_module
from quantvggt.quant.config import QuantConfig
from quantvggt.quant.linear import QuantConv2d, QuantConv2dSpec, QuantLinear, QuantLinearSpec

FORMAT = "quantvggt-checkpoint"
FORMAT_VERSION = 2
REQUIRED_KEYS = ("format", "format_version", "model_config", "config", "layers")


def save_quantized(
    model: VGGT, path: str | Path, extra: dict[str, Any] | None = None, inputs: Iterable[str | Path] = ()
) -> Path:
    """Write a quantized model to folder ``path`` atomically (temporary folder renamed into place).

    ``path`` may be new, empty or an earlier checkpoint (it has ``quant.json``); a folder of anything else, or one
    that is, contains or lies inside one of ``inputs`` (calibration scenes, the source model), is refused with a
    ``ValueError`` before anything is written: ``quantize --out photos`` used to replace the photos.
    """
    meta = getattr(model, "quant_meta", None)
    if not meta:
        raise ValueError("model is not quantized (run quantize_ first)")
    path = Path(path)
    check_output_folder(path, inputs, own_marker="quant.json")
    with atomic_dir(path) as tmp:
        sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(sd, str(tmp / "model.safetensors"))
        doc = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "library_version": quantvggt.__version__,
            "model_config": model.config.to_dict(),
            "model_source": model.source,
            **meta,
            "attention": model.config.aggregator.attention,  # top level too: visible without parsing model_config
            **(extra or {}),
        }
        (tmp / "quant.json").write_text(json.dumps(doc, indent=1))
    return path


def read_quant_meta(path: str | Path) -> dict[str, Any]:
    """The validated ``quant.json`` of a quantized checkpoint folder, upgraded to the current format version."""
    meta_path = Path(path) / "quant.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{path}: not a quantized checkpoint (no quant.json)")
    try:
        doc = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_path}: not valid JSON ({e})") from e
    if not isinstance(doc, dict):
        raise CheckpointError(f"{meta_path}: expected a JSON object")
    if doc.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: unknown format {doc.get('format')!r} (expected {FORMAT!r})")
    version = doc.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{meta_path}: invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_path}: format version {version} is newer than this library supports ({FORMAT_VERSION}); "
            "upgrade quantvggt"
        )
    missing = [k for k in REQUIRED_KEYS if k not in doc]
    if missing:
        raise CheckpointError(f"{meta_path}: format version {version} is missing keys {missing}")
    return _upgrade(doc, meta_path)


def _upgrade(doc: dict[str, Any], where: Path) -> dict[str, Any]:
    """Bring an older ``quant.json`` to the current layout."""
    doc = dict(doc)
    if doc["format_version"] == 1:
        if not isinstance(doc["layers"], dict) or not isinstance(doc.get("model_config"), dict):
            raise CheckpointError(f"{where}: format version 1 with malformed 'layers' or 'model_config'")
        block_loss = {}
        layers = {}
        for name, spec in doc["layers"].items():
            spec = dict(spec) if isinstance(spec, dict) else spec
            if isinstance(spec, dict) and spec.get("block_loss") is not None:
                block_loss[name.rsplit(".", 2)[0]] = spec["block_loss"]
            if isinstance(spec, dict):
                spec.pop("block_loss", None)
            layers[name] = spec
        doc["layers"] = layers
        doc.setdefault("block_loss", block_loss)
        doc["model_config"] = {"image_size": int(doc.get("image_size", 518)), **doc["model_config"]}
        doc["format_version"] = FORMAT_VERSION
    return _upgrade_attention(doc, where)


def _upgrade_attention(doc: dict[str, Any], where: Path) -> dict[str, Any]:
    """Reconcile the top-level ``attention`` with ``model_config.aggregator.attention`` (absent in older files)."""
    agg = doc["model_config"].get("aggregator") if isinstance(doc["model_config"], dict) else None
    inner = agg.get("attention") if isinstance(agg, dict) else None
    outer = doc.get("attention")
    for value in (outer, inner):
        if value is not None and value not in ATTENTION_KINDS:
            raise CheckpointError(f"{where}: attention must be one of {ATTENTION_KINDS}, got {value!r}")
    if outer is not None and inner is not None and outer != inner:
        raise CheckpointError(f"{where}: attention {outer!r} disagrees with model_config's {inner!r}")
    kind = outer or inner or "sdpa"  # files written before attention was recorded ran exact attention
    doc["attention"] = kind
    if isinstance(doc["model_config"], dict) and inner is None and (isinstance(agg, dict) or kind != "sdpa"):
        doc["model_config"] = {**doc["model_config"], "aggregator": {**(agg or {}), "attention": kind}}
    return doc


def _parse_specs(
    doc: dict[str, Any], where: Path
) -> tuple[QuantConfig, dict[str, QuantLinearSpec], dict[str, QuantConv2dSpec]]:
    try:
        config = QuantConfig.from_dict(doc["config"])
    except (ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{where}: invalid quantization config ({e})") from e
    if not isinstance(doc["layers"], dict) or not isinstance(doc.get("convs", {}), dict):
        raise CheckpointError(f"{where}: 'layers' and 'convs' must be objects")
    try:
        layers = {n: QuantLinearSpec.from_dict(s, f"layer {n}") for n, s in doc["layers"].items()}
        convs = {n: QuantConv2dSpec.from_dict(s, f"conv {n}") for n, s in doc.get("convs", {}).items()}
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from e
    for n, spec in layers.items():  # bits are derived from the config: a hand-edited layer must not load silently
        w, a = config.bits_for(n)
        if (spec.w_bits, spec.a_bits) != (w, a):
            raise CheckpointError(
                f"{where}: layer {n} says w{spec.w_bits}a{spec.a_bits} but the recorded config "
                f"({config.name}, layer_bits {config.layer_bits}) gives w{w}a{a}"
            )
    return config, layers, convs


def load_quantized(path: str | Path, device: str | torch.device = "cpu") -> VGGT:
    """Load a folder written by :func:`save_quantized`; outputs are bit-identical to the saved model's."""
    from quantvggt.storage import download_to_cache, is_remote

    if is_remote(path):
        path = download_to_cache(str(path))
    path = Path(path)
    doc = read_quant_meta(path)
    meta_path = path / "quant.json"
    try:
        config = VGGTConfig.from_dict(doc["model_config"])
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{meta_path}: invalid model_config ({e})") from e
    _, layers, convs = _parse_specs(doc, meta_path)
    with torch.device("meta"):
        model = VGGT(config)
        for name, spec in {**layers, **convs}.items():
            try:
                model.get_submodule(name)
            except AttributeError as e:
                raise CheckpointError(f"{meta_path}: layer {name} does not exist in this model") from e
            layer = QuantLinear.from_spec(spec) if isinstance(spec, QuantLinearSpec) else QuantConv2d.from_spec(spec)
            set_module(model, name, layer)
    weights = path / "model.safetensors"
    try:
        sd = read_state_dict(weights)  # own memory per tensor: buffers freed later (speed mode) leave RAM
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{weights}: cannot read ({type(e).__name__}: {e})") from e
    _strict_load(model, sd, str(weights))
    model.aggregator.reset_buffers()
    model.quant_meta = {
        "config": doc["config"],
        "layers": {n: s.to_dict() for n, s in layers.items()},
        "convs": {n: s.to_dict() for n, s in convs.items()},
        "block_loss": doc.get("block_loss", {}),
        "calibration_ids": doc.get("calibration_ids", []),
        "source_sha256": doc.get("source_sha256"),
    }
    model.source = doc.get("model_source")
    return model.eval().to(device)


def count_quant_layers(model: nn.Module) -> int:
    """Number of :class:`QuantLinear` modules in ``model``."""
    return sum(isinstance(m, QuantLinear) for m in model.modules())
