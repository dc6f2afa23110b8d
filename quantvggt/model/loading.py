"""Load VGGT weights from the Hugging Face hub, a local file or folder, an ``s3://`` URI, or a shipped name.

Never unpickles code: safetensors, or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch

from quantvggt.model.config import VGGTConfig
from quantvggt.model.vggt import VGGT

log = logging.getLogger(__name__)

DEFAULT_SOURCE = "facebook/VGGT-1B"
ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
WEIGHT_NAMES = ("model.safetensors", "model.pt", "pytorch_model.bin", "weights.safetensors")


class CheckpointError(RuntimeError):
    """A checkpoint could not be found, read, or matched to the model."""


def config_from_json(d: dict[str, Any]) -> VGGTConfig:
    """Accept either our nested dict or upstream's hub form (``img_size``/``patch_size``/``embed_dim``)."""
    if "config" in d and isinstance(d["config"], dict):
        d = d["config"]
    if "aggregator" in d:
        return VGGTConfig.from_dict(d)
    keys = {"img_size", "patch_size", "embed_dim"}
    if set(d) & keys or not d:
        return VGGTConfig.from_upstream(**{k: d[k] for k in keys if k in d})
    raise CheckpointError(f"config.json has neither model parts nor img_size/patch_size/embed_dim: keys {sorted(d)}")


_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_safetensors(path: Path, float_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Each tensor of a ``.safetensors`` file read into its own memory, floats converted to ``float_dtype`` as read.

    ``safetensors.torch.load_file`` maps the whole file and its tensors share that mapping: a tensor freed later (the
    int4 weights CPU speed mode replaces, 16-bit tensors converted to float32) keeps its pages resident for as long as
    any tensor of the file lives, so a 16-bit checkpoint loaded as float32 peaked at both copies. Here the peak is the
    loaded dict plus one tensor. The format (8-byte little-endian header size, JSON header, raw little-endian data)
    is the library's documented one; its writer stays ``safetensors.torch.save_file``.
    """
    size = path.stat().st_size
    out: dict[str, torch.Tensor] = {}
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
        if not 0 < n <= size - 8:
            raise CheckpointError(f"{path}: not a safetensors file (header size {n} for a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
        base = 8 + n
        staging = torch.empty(0, dtype=torch.uint8)
        entries = [(k, v) for k, v in header.items() if k != "__metadata__"]
        for name, info in sorted(entries, key=lambda kv: kv[1]["data_offsets"][0]):  # one forward pass over the file
            dtype = _ST_DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')!r}")
            shape, (begin, end) = [int(d) for d in info["shape"]], info["data_offsets"]
            nbytes = math.prod(shape) * dtype.itemsize
            if end - begin != nbytes or base + end > size:
                raise CheckpointError(
                    f"{path}: tensor {name} needs bytes {base + begin}-{base + end} of a {size}-byte file "
                    f"({nbytes} for {info['dtype']} {shape}): truncated or corrupt"
                )
            convert = float_dtype is not None and dtype.is_floating_point and dtype != float_dtype
            if convert:  # read into one reused staging buffer: no per-tensor transient left to fragment the heap
                if staging.numel() < nbytes:
                    staging = torch.empty(nbytes, dtype=torch.uint8)
                buf = staging[:nbytes]
            else:
                buf = torch.empty(nbytes, dtype=torch.uint8)
            f.seek(base + begin)
            view, got = memoryview(buf.numpy()), 0
            while got < nbytes:
                k = f.readinto(view[got:])
                if not k:
                    raise CheckpointError(f"{path}: tensor {name}: file ends early (truncated)")
                got += k
            t = buf.view(dtype).reshape(shape)
            out[name] = t.to(float_dtype) if convert else t
    return {k: out[k] for k, _ in entries}  # the file's key order


def read_state_dict(path: str | Path, float_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Read a safetensors or torch checkpoint file without executing pickled code (floats as ``float_dtype``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: checkpoint file is empty")
    if path.suffix == ".safetensors":
        try:
            return read_safetensors(path, float_dtype)
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, OSError) as e:  # header fields of the wrong form
            raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from e
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign files surface as many exception types
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from e
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return obj


def _download_remote(uri: str) -> Path:
    from quantvggt.storage import download_to_cache

    return download_to_cache(uri)


def _download_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import EntryNotFoundError
    except ImportError as e:  # pragma: no cover - dependency is declared
        raise CheckpointError("huggingface_hub is not installed; pass a local checkpoint path instead") from e
    try:
        cfg = Path(hf_hub_download(repo_id, "config.json"))
        for name in ("model.safetensors", "model.pt"):
            try:
                weights = Path(hf_hub_download(repo_id, name))
                break
            except EntryNotFoundError:
                continue
        else:
            raise CheckpointError(f"hub repo {repo_id} has neither model.safetensors nor model.pt")
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(
            f"cannot fetch {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "The hub may be unreachable from this machine: download the checkpoint elsewhere and pass "
            "a local path (a model.safetensors/model.pt file, or a folder with config.json + model.safetensors), "
            "or an s3:// URI, e.g. `load_vggt('/models/VGGT-1B/model.pt')`. Offline, the shipped small model "
            "works: `--model vggt-tiny-synthetic`."
        ) from e
    if cfg.parent != weights.parent:
        raise CheckpointError(f"hub files for {repo_id} landed in different folders")
    return weights.parent


def resolve_source(source: str) -> tuple[Path, Path | None]:
    """Map a source to (weights file, config.json or None), downloading when needed."""
    from quantvggt.storage import is_remote, local_path

    if is_remote(source):  # s3:// or any other storage backend: fetched into the cache first
        local = _download_remote(source)
        return resolve_source(str(local))
    path = local_path(source) or Path(os.path.expanduser(source))
    if not path.exists() and (ASSETS_DIR / source).is_dir():
        path = ASSETS_DIR / source
    if path.is_dir():
        for name in WEIGHT_NAMES:
            if (path / name).is_file():
                cfg = path / "config.json"
                return path / name, cfg if cfg.is_file() else None
        raise CheckpointError(f"{path}: folder has none of {', '.join(WEIGHT_NAMES)}")
    if path.is_file():
        cfg = path.parent / "config.json"
        return path, cfg if cfg.is_file() else None
    if source.count("/") == 1 and not source.startswith((".", "/", "~")):
        folder = _download_hub(source)
        return resolve_source(str(folder))
    raise CheckpointError(f"{source}: not a file, folder, s3:// URI, shipped model or hub repo id")


def _strict_load(model: VGGT, sd: dict[str, torch.Tensor], origin: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    if missing or unexpected or wrong:

        def show(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        if wrong:
            parts.append(
                "shape mismatch: " + show([f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in wrong])
            )
        raise CheckpointError(f"{origin}: checkpoint does not match the model config; " + "; ".join(parts))
    model.load_state_dict(sd, strict=True, assign=True)


def build_model(
    config: VGGTConfig, sd: dict[str, torch.Tensor], origin: str = "state dict", dtype: torch.dtype | None = None
) -> VGGT:
    """Instantiate ``VGGT(config)`` without initialising weights, then load ``sd`` strictly, floats as ``dtype``.

    ``dtype=None`` is float32 (16-bit checkpoints such as the shipped small model load like the official one).
    """
    with torch.device("meta"):
        model = VGGT(config)
    # converted in place, one tensor at a time, so the checkpoint's copy is freed as we go: peak RSS is the model in
    # ``dtype`` plus one tensor, never the whole state dict twice (a 16-bit checkpoint loaded as 16-bit makes no fp32)
    want = dtype or torch.float32
    for k in list(sd):
        if sd[k].is_floating_point() and sd[k].dtype != want:
            sd[k] = sd[k].to(want)
    _strict_load(model, sd, origin)
    model.aggregator.reset_buffers()
    return model.eval()


def load_vggt(
    source: str = DEFAULT_SOURCE,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    config: VGGTConfig | None = None,
    compile: bool = False,
) -> VGGT:
    """Load a VGGT from a hub id, local file/folder, ``s3://`` URI or shipped model name, in eval mode.

    ``compile=True`` wraps the forward in ``torch.compile`` (see :meth:`VGGT.compile_`).
    """
    weights, cfg_path = resolve_source(source)
    if cfg_path is not None and config is None:
        try:
            config = config_from_json(json.loads(cfg_path.read_text()))
        except (json.JSONDecodeError, ValueError, TypeError) as e:
            raise CheckpointError(f"{cfg_path}: invalid model config ({e})") from e
    if config is None:
        config = VGGTConfig()
    log.info("loading VGGT weights from %s", weights)
    model = build_model(config, read_state_dict(weights, dtype or torch.float32), str(weights), dtype=dtype)
    model.source = source
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.compile_() if compile else model
