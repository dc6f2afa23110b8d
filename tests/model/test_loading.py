"""load_vggt over every source kind, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from quantvggt.model import VGGT, VGGTConfig, load_vggt, loading
from quantvggt.model.loading import CheckpointError
from tests.conftest import tiny_config_dict


def _tiny(seed: int = 0) -> VGGT:
    torch.manual_seed(seed)
    return VGGT(VGGTConfig.from_dict(tiny_config_dict())).eval()


def _same(a: VGGT, b: VGGT) -> None:
    x = torch.rand(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(a(x)["depth"], b(x)["depth"], rtol=0, atol=0)


def test_folder_with_nested_config(tmp_path: Path) -> None:
    m = _tiny()
    save_file(m.state_dict(), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(m.config.to_dict()))
    _same(m, load_vggt(str(tmp_path)))


@pytest.mark.parametrize("want", [None, torch.float16, torch.bfloat16])
def test_16bit_checkpoint_loads_straight_into_the_asked_dtype(
    tmp_path: Path, want: torch.dtype | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = _tiny()
    save_file(
        {k: v.half() if v.is_floating_point() else v for k, v in m.state_dict().items()},
        str(tmp_path / "w.safetensors"),
    )
    (tmp_path / "config.json").write_text(json.dumps(m.config.to_dict()))
    made: list[torch.dtype] = []  # every float dtype a checkpoint tensor is converted to on the way in

    def spy(method: str) -> object:
        orig = getattr(torch.Tensor, method)

        def conv(self: torch.Tensor, *a: object, **k: object) -> torch.Tensor:
            out = orig(self, *a, **k)
            if out is not self and out.is_floating_point():
                made.append(out.dtype)
            return out

        return conv

    for method in ("to", "float", "half", "bfloat16"):
        monkeypatch.setattr(torch.Tensor, method, spy(method))
    got = load_vggt(str(tmp_path / "w.safetensors"), dtype=want)
    monkeypatch.undo()
    expect = want or torch.float32
    assert {p.dtype for p in got.parameters()} == {expect}
    assert set(made) <= {expect}  # a 16-bit model is never built through a float32 copy
    if want is None:
        _same(got, load_vggt(str(tmp_path / "w.safetensors")))


def test_pt_file_loads_weights_only(tmp_path: Path) -> None:
    m = _tiny()
    torch.save({"model": m.state_dict()}, tmp_path / "ckpt.pt")
    (tmp_path / "config.json").write_text(json.dumps({"config": m.config.to_dict()}))
    _same(m, load_vggt(str(tmp_path / "ckpt.pt")))


def test_pt_with_code_is_refused(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt: cannot read"):
        loading.read_state_dict(tmp_path / "evil.pt")


def test_upstream_hub_config_form() -> None:
    cfg = loading.config_from_json({"img_size": 518, "patch_size": 14, "embed_dim": 1024})
    assert cfg == VGGTConfig()


def test_wrong_checkpoint_names_keys(tmp_path: Path) -> None:
    m = _tiny()
    sd = m.state_dict()
    sd.pop("camera_head.embed_pose.weight")
    sd["extra.weight"] = torch.zeros(1)
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(m.config.to_dict()))
    with pytest.raises(CheckpointError) as e:
        load_vggt(str(tmp_path))
    assert "missing keys: camera_head.embed_pose.weight" in str(e.value)
    assert "unexpected keys: extra.weight" in str(e.value)
    assert "model.safetensors" in str(e.value)


def test_truncated_file(tmp_path: Path) -> None:
    m = _tiny()
    save_file(m.state_dict(), str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "config.json").write_text(json.dumps(m.config.to_dict()))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor \S+ needs bytes .* truncated or corrupt"):
        load_vggt(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(data[:100])
    with pytest.raises(CheckpointError, match="model.safetensors: not a safetensors file"):
        load_vggt(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes((40).to_bytes(8, "little") + b"{" * 40)
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt safetensors header"):
        load_vggt(str(tmp_path))


def test_safetensors_reader_round_trips_into_separate_memory(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    sd = {
        "f32": torch.randn(3, 5, generator=g),
        "bf16": torch.randn(7, generator=g).bfloat16(),
        "f16": torch.randn(2, 2, generator=g).half(),
        "i8": torch.randint(-128, 127, (4, 3), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 255, (9,), generator=g, dtype=torch.uint8),
        "i64": torch.arange(5),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }
    save_file(sd, str(tmp_path / "a.safetensors"))
    got = loading.read_safetensors(tmp_path / "a.safetensors")
    assert set(got) == set(sd)
    for k, v in sd.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    # no shared mapping: a freed tensor gives its memory back (the reason this reader exists)
    ptrs = [t.untyped_storage().data_ptr() for t in got.values() if t.numel()]
    assert len(set(ptrs)) == len(ptrs)
    as32 = loading.read_safetensors(tmp_path / "a.safetensors", torch.float32)
    assert {as32[k].dtype for k in ("f32", "bf16", "f16", "scalar")} == {torch.float32}
    assert as32["i8"].dtype == torch.int8 and torch.equal(as32["bf16"], sd["bf16"].float())


def test_offline_hub_error_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def unreachable(*a: object, **k: object) -> str:
        raise OSError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    with pytest.raises(CheckpointError) as e:
        load_vggt("facebook/VGGT-1B")
    msg = str(e.value)
    assert "unreachable" in msg and "local path" in msg and "facebook/VGGT-1B" in msg


def test_unknown_source() -> None:
    with pytest.raises(CheckpointError, match="not a file, folder"):
        load_vggt("./does/not/exist.safetensors")


def test_s3_uri(tmp_path: Path, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3

    m = _tiny()
    save_file(m.state_dict(), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(m.config.to_dict()))
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="models")
    for name in ("model.safetensors", "config.json"):
        s3.upload_file(str(tmp_path / name), "models", f"tiny/{name}")
    monkeypatch.setenv("QUANTVGGT_CACHE", str(tmp_path / "cache"))
    _same(m, load_vggt("s3://models/tiny"))


def test_building_on_meta_stays_light() -> None:
    # random init ops on the meta device run as Python refs that import torch._dynamo and sympy (~150 MB per worker
    # process that loads a checkpoint); the loaders build on meta, so the model must not draw there
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from quantvggt.model import VGGT, VGGTConfig\n"
        "with torch.device('meta'):\n"
        "    VGGT(VGGTConfig())\n"
        "print('torch._dynamo' in sys.modules, 'sympy' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
