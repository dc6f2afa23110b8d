"""quantize_ dispatches on the config type: a new method is one config class + one handler registration."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from quantvggt.model import VGGT
from quantvggt.quant import (
    QuantConfig,
    QuantJob,
    QuantLinear,
    get_recipe,
    load_quantized,
    quantize_,
    register_quantize_handler,
    save_quantized,
    steps,
)
from tests.quant.conftest import calib_batches


@dataclass
class HalfClipConfig(QuantConfig):
    """Toy method: rotate, then clip every weight row at ``clip`` of its maximum (no calibration)."""

    clip: float = 0.9
    method: ClassVar[str] = "toyclip"


@register_quantize_handler(HalfClipConfig)
def _toyclip(job: QuantJob) -> None:
    cfg: HalfClipConfig = job.config  # type: ignore[assignment]
    steps.add_rotation(job)
    steps.wrap(job, lwc=True, clip_init=float(torch.logit(torch.tensor(cfg.clip))))


def test_toy_method_is_one_config_and_one_handler(tiny_model: VGGT, tmp_path: Path) -> None:
    ref = copy.deepcopy(tiny_model)
    rep = quantize_(tiny_model, get_recipe("toyclip-w4a8", clip=0.8))
    assert rep.recipe == "toyclip-w4a8" and len(rep.layers) == 32
    layers = [m for m in tiny_model.modules() if isinstance(m, QuantLinear)]
    assert all(m.rotate and m.w_bits == 4 and m.a_bits == 8 for m in layers)
    x = torch.rand(2, 3, 28, 42)
    with torch.no_grad():
        got, want = tiny_model(x)["depth"], ref(x)["depth"]
    assert float((got - want).norm() / want.norm()) < 0.1
    loaded = load_quantized(save_quantized(tiny_model, tmp_path / "toy"))  # config round-trips by method name
    assert loaded.quant_meta["config"]["method"] == "toyclip" and loaded.quant_meta["config"]["clip"] == 0.8
    with torch.no_grad():
        assert torch.equal(loaded(x)["depth"], got)


def test_unregistered_config_type_is_a_clear_error(tiny_model: VGGT) -> None:
    @dataclass
    class Orphan(QuantConfig):
        method: ClassVar[str] = "orphan-test"

    with pytest.raises(ValueError, match="no quantize handler for Orphan"):
        quantize_(tiny_model, Orphan())


def test_recipe_overrides_are_checked_against_the_method() -> None:
    with pytest.raises(ValueError, match="recipe rtn-w4a4 has no option 'epochs'"):
        get_recipe("rtn-w4a4", epochs=3)
    assert get_recipe("quantvggt-w4a4", epochs=3).epochs == 3
    with pytest.raises(ValueError, match="unknown recipe"):
        get_recipe("quantvggt-w5a5")


def test_calibration_free_methods_need_no_data(tiny_model: VGGT) -> None:
    quantize_(copy.deepcopy(tiny_model), get_recipe("quarot-w4a4"))
    with pytest.raises(ValueError, match="needs calibration"):
        quantize_(copy.deepcopy(tiny_model), get_recipe("quantvggt-w4a4"))
    quantize_(tiny_model, get_recipe("smoothquant-w8a8"), calib_batches(1, 0))
