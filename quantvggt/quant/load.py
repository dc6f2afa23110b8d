"""One loader for every model source: float (hub id, file, folder, ``s3://``, shipped name), quantized checkpoint
folders (``quant.json``), and ``demo-random`` (the tiny architecture with seeded random weights)."""

from __future__ import annotations

import json
import logging

import torch

from quantvggt.lowbit.registry import KernelOptions, get_kernel
from quantvggt.model import VGGT, VGGTConfig, load_vggt
from quantvggt.model.loading import ASSETS_DIR
from quantvggt.quant.checkpoint import load_quantized
from quantvggt.storage import local_path, open_storage

log = logging.getLogger(__name__)
QUANT_META = "quant.json"  # the file that makes a folder a quantized checkpoint

DEMO_RANDOM = "demo-random"  # the tiny architecture with seeded random (untrained) weights: tries commands offline


def load_model(
    source: str, device: str | None = None, compile: bool = False, kernels: KernelOptions | dict | None = None
) -> torch.nn.Module:
    """A float model source (hub id, file, folder, s3://, shipped name), a quantized checkpoint, or ``demo-random``.

    ``kernels`` (:class:`~quantvggt.lowbit.registry.KernelOptions`) chooses the kernels and prepares the model for
    them: oneDNN's prepacked int8 GEMM and bf16 for the rest on CPUs that have them (``float_dtype="auto"``), fp32
    and the portable path otherwise; None keeps the model as loaded (fp32, kernels chosen on first use).
    ``compile=True`` returns it ``torch.compile``-d (zero graph breaks; quantized layers run as custom ops).
    """
    model = _load_model(source, device)
    if kernels is not None:
        apply = get_kernel("apply_options", "any")
        if apply is None:  # pragma: no cover - quantvggt/__init__ imports the kernels
            raise RuntimeError("no kernels registered: import quantvggt first")
        model = apply(model, KernelOptions.from_dict(kernels))
    return model.compile_() if compile else model


def is_quantized_source(source: str) -> bool:
    """Whether ``source`` is a quantized checkpoint folder (local or in any storage backend): it holds quant.json."""
    local = local_path(source)
    if local is not None:
        return (local / QUANT_META).is_file()
    return open_storage(source).exists(QUANT_META)


def _load_model(source: str, device: str | None = None) -> torch.nn.Module:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if source == DEMO_RANDOM:
        return demo_model().to(device)
    if is_quantized_source(source):
        return load_quantized(source, device=device)
    return load_vggt(source, device=device)


def demo_model(seed: int = 0) -> VGGT:
    """The tiny architecture with seeded random weights (no download; for trying commands offline)."""
    cfg = VGGTConfig.from_dict(json.loads((ASSETS_DIR / "vggt-tiny-config.json").read_text()))
    torch.manual_seed(seed)
    return VGGT(cfg).eval()
