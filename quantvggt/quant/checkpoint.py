"""Quantized checkpoint format: a folder with ``model.safetensors`` (packed weights + the rest) and ``quant.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import quantvggt
from quantvggt.fsutil import atomic_dir
from quantvggt.model.config import VGGTConfig
from quantvggt.model.loading import CheckpointError, _strict_load
from quantvggt.model.vggt import VGGT
from quantvggt.quant.calibrate import _set_module
from quantvggt.quant.linear import QuantConv2d, QuantLinear

FORMAT = "quantvggt-checkpoint"
FORMAT_VERSION = 1


def save_quantized(model: VGGT, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write a quantized model to folder ``path`` atomically (temporary folder renamed into place)."""
    meta = getattr(model, "quant_meta", None)
    if not meta:
        raise ValueError("model is not quantized (run quantize_ first)")
    path = Path(path)
    with atomic_dir(path) as tmp:
        sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(sd, str(tmp / "model.safetensors"))
        doc = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "library_version": quantvggt.__version__,
            "model_config": model.config.to_dict(),
            "model_source": getattr(model, "source", None),
            **meta,
            **(extra or {}),
        }
        (tmp / "quant.json").write_text(json.dumps(doc, indent=1))
    return path


def read_quant_meta(path: str | Path) -> dict[str, Any]:
    """The ``quant.json`` of a quantized checkpoint folder."""
    meta_path = Path(path) / "quant.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{path}: not a quantized checkpoint (no quant.json)")
    doc = json.loads(meta_path.read_text())
    if doc.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: unknown format {doc.get('format')!r}")
    if doc.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_path}: format version {doc['format_version']} is newer than this library supports"
        )
    return doc


def load_quantized(path: str | Path, device: str | torch.device = "cpu") -> VGGT:
    """Load a folder written by :func:`save_quantized`; outputs are bit-identical to the saved model's."""
    if str(path).startswith("s3://"):
        from quantvggt.storage import download_to_cache

        path = download_to_cache(str(path))
    path = Path(path)
    doc = read_quant_meta(path)
    config = VGGTConfig.from_dict({"image_size": int(doc.get("image_size", 518)), **doc["model_config"]})
    with torch.device("meta"):
        model = VGGT(config)
        for name, spec in doc["layers"].items():
            ql = QuantLinear(
                spec["in_features"], spec["out_features"], spec["w_bits"], spec["a_bits"], spec["bias"], spec["rotate"]
            )
            _set_module(model, name, ql)
        for name, spec in doc.get("convs", {}).items():
            qc = QuantConv2d(
                spec["in_channels"],
                spec["out_channels"],
                tuple(spec["kernel_size"]),
                tuple(spec["stride"]),
                tuple(spec["padding"]),
                spec["bias"],
                spec["w_bits"],
                spec["transposed"],
            )
            _set_module(model, name, qc)
    weights = path / "model.safetensors"
    try:
        sd = load_file(str(weights))
    except Exception as e:
        raise CheckpointError(f"{weights}: cannot read ({type(e).__name__}: {e})") from e
    _strict_load(model, sd, str(weights))
    model.aggregator.reset_buffers()
    model.quant_meta = {k: doc.get(k, {}) for k in ("config", "layers", "convs", "calibration_ids", "source_sha256")}  # type: ignore[assignment]
    model.source = doc.get("model_source")  # type: ignore[assignment]
    return model.eval().to(device)


def count_quant_layers(model: nn.Module) -> int:
    """Number of :class:`QuantLinear` modules in ``model``."""
    return sum(isinstance(m, QuantLinear) for m in model.modules())
