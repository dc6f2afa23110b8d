"""The console script."""

from __future__ import annotations

import subprocess
import sys

import pytest

from quantvggt.cli import Command


def test_predict_runs_on_bundled_samples() -> None:
    from quantvggt.cli import ASSETS

    imgs = [str(p) for p in sorted((ASSETS / "samples").glob("*.png"))]
    out = subprocess.run(
        [sys.executable, "-m", "quantvggt.cli", "predict", *imgs, "--model", "demo-random"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "frame_00.png" in out.stdout and "frame_02.png" in out.stdout
    assert "random weights" in out.stdout


def test_predict_reports_bad_image_clearly(tmp_path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"")
    out = subprocess.run(
        [sys.executable, "-m", "quantvggt.cli", "predict", str(bad), "--model", "demo-random"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2
    assert "broken.png" in out.stderr and "empty" in out.stderr


def test_quantize_command_writes_checkpoint(tmp_path) -> None:
    import json as _json

    import torch
    from safetensors.torch import save_file

    from quantvggt.model import VGGT, VGGTConfig
    from tests.conftest import tiny_config_dict

    torch.manual_seed(0)
    m = VGGT(VGGTConfig.from_dict(tiny_config_dict()))
    (tmp_path / "model").mkdir()
    save_file(m.state_dict(), str(tmp_path / "model" / "model.safetensors"))
    (tmp_path / "model" / "config.json").write_text(_json.dumps(m.config.to_dict()))
    from quantvggt.cli import ASSETS

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "quantvggt.cli",
            "quantize",
            "--model",
            str(tmp_path / "model"),
            "--calibration",
            str(ASSETS / "samples"),
            "--recipe",
            "quantvggt-w4a4",
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "q"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "q" / "quant.json").is_file()
    meta = _json.loads((tmp_path / "q" / "quant.json").read_text())
    assert meta["calibration_ids"][0].startswith("samples:frame_00.png")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "quantvggt.cli",
            "predict",
            str(ASSETS / "samples" / "frame_00.png"),
            str(ASSETS / "samples" / "frame_01.png"),
            "--model",
            str(tmp_path / "q"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "frame_01.png" in out.stdout


def test_synth_and_reconstruct_commands(tmp_path) -> None:
    import json as _json

    from safetensors.torch import save_file

    from tests.conftest import sane_tiny_model

    m = sane_tiny_model()
    (tmp_path / "model").mkdir()
    save_file(m.state_dict(), str(tmp_path / "model" / "model.safetensors"))
    (tmp_path / "model" / "config.json").write_text(_json.dumps({**m.config.to_dict(), "image_size": 112}))

    def run(*a):
        return subprocess.run([sys.executable, "-m", "quantvggt.cli", *a], capture_output=True, text=True, timeout=600)

    out = run("synth", str(tmp_path / "scenes"), "--scenes", "2", "--frames", "3", "--size", "112x84")
    assert out.returncode == 0, out.stderr
    (tmp_path / "scenes" / "scene_empty").mkdir()
    out = run(
        "reconstruct",
        str(tmp_path / "scenes" / "scene_000"),
        str(tmp_path / "scenes" / "scene_empty"),
        str(tmp_path / "scenes" / "scene_001"),
        "--model",
        str(tmp_path / "model"),
        "--out",
        str(tmp_path / "out"),
        "--max-points",
        "100",
        "--text",
    )
    assert out.returncode == 1  # one scene failed, the others were still reconstructed
    assert "scene_empty: FAILED" in out.stdout and "2 of 3 scenes reconstructed" in out.stdout
    assert (tmp_path / "out" / "scene_001" / "sparse" / "0" / "images.txt").is_file()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quantvggt.cli", *args], capture_output=True, text=True, timeout=300)


def test_recipe_option_it_lacks_is_a_one_line_error(tmp_path) -> None:
    # rtn has no block reconstruction: the recipe rejects --epochs before any model is loaded
    out = _cli(
        "quantize",
        "--model",
        str(tmp_path / "no-model"),
        "--calibration",
        str(tmp_path / "no-scenes"),
        "--recipe",
        "rtn-w4a4",
        "--epochs",
        "3",
        "--out",
        str(tmp_path / "q"),
    )
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "rtn-w4a4" in lines[0] and "epochs" in lines[0], out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "q").exists()


def test_missing_scene_folder_is_one_line_and_verbose_adds_the_traceback(tmp_path) -> None:
    args = ("reconstruct", str(tmp_path / "nowhere"), "--model", "demo-random", "--out", str(tmp_path / "out"))
    out = _cli(*args)
    assert out.returncode == 1 and "nowhere: FAILED: " in out.stdout and "not a folder" in out.stdout
    out = _cli("predict", str(tmp_path / "missing.png"), "--model", "demo-random")
    assert out.returncode == 2 and "missing.png" in out.stderr and "Traceback" not in out.stderr
    assert len([line for line in out.stderr.splitlines() if "error" in line.lower()]) == 1
    out = _cli("-v", "predict", str(tmp_path / "missing.png"), "--model", "demo-random")
    assert out.returncode == 2 and "Traceback" in out.stderr


def test_orchestration_commands_come_from_entry_points() -> None:
    from quantvggt.cli import COMMANDS, build_parser, plugin_commands

    plugins = {c.name for c in plugin_commands(list(COMMANDS))}
    assert {"demo", "submit", "serve", "status"} <= plugins
    text = build_parser().format_help()
    for name in (*COMMANDS, "demo", "submit", "serve", "status"):
        assert name in text
    assert "reconstruct deployment" in " ".join(text.split())


def _fresh_python(code: str) -> str:
    """stdout of ``code`` in a new interpreter (what it imports is not hidden by this process's modules)."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_library_parser_imports_neither_prefect_nor_ray() -> None:
    code = (
        "import sys; import quantvggt.cli as c; c.build_parser(c.builtin_commands()); "
        "import quantvggt.reconstruct, quantvggt.options, quantvggt.scene; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'ray')))"
    )
    assert _fresh_python(code) == "[]"


def test_plugins_are_read_from_the_entry_point_group(monkeypatch, capsys) -> None:
    from importlib.metadata import EntryPoint

    import quantvggt.cli as cli

    eps = [
        EntryPoint("hello", "tests.test_cli:_HELLO", cli.ENTRY_POINT_GROUP),
        EntryPoint("broken", "tests.no_such_module:thing", cli.ENTRY_POINT_GROUP),
        EntryPoint("clash", "tests.test_cli:_CLASH", cli.ENTRY_POINT_GROUP),
    ]
    monkeypatch.setattr(cli, "entry_points", lambda group: [e for e in eps if e.group == group])
    assert [c.name for c in cli.plugin_commands(list(cli.COMMANDS))] == ["hello"]  # broken and clash left out
    assert cli.main(["hello", "--who", "you"]) == 0
    assert capsys.readouterr().out == "hello you\n"


def _hello(args) -> int:
    print(f"hello {args.who}")
    return 0


_HELLO = Command("hello", "say hello", lambda p: p.add_argument("--who", default="world"), _hello)
_CLASH = Command("synth", "not the real synth", lambda p: None, _hello)


def test_top_level_help_imports_no_command_module() -> None:
    # `quantvggt --help` must stay fast: no torch, no command module until a command is chosen
    code = (
        "import sys, contextlib, io; import quantvggt.cli as c\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    c.main(['--help'])\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'prefect', 'ray')"
        " or m in ('quantvggt.predict', 'quantvggt.reconstruct')))"
    )
    assert _fresh_python(code) == "[]"


def test_chosen_command_gets_its_options() -> None:
    from quantvggt.cli import build_parser

    args = build_parser(only=["synth"]).parse_args(["synth", "out", "--scenes", "2"])
    assert args.scenes == 2
    with pytest.raises(SystemExit):  # predict's options were not added, so its option is unknown
        build_parser(only=["synth"]).parse_args(["predict", "x.png", "--model", "m"])


def test_compile_flag_compiles_the_model_it_runs(monkeypatch, capsys) -> None:
    # the compiled forward itself is tested in tests/model/test_compile.py; here: the flag reaches the model
    from quantvggt import cli
    from quantvggt.cli import ASSETS
    from quantvggt.model import VGGT

    compiled: list[VGGT] = []

    def fake_compile(self: VGGT, *a: object, **k: object) -> VGGT:
        compiled.append(self)
        return self

    monkeypatch.setattr(VGGT, "compile_", fake_compile)
    imgs = [str(p) for p in sorted((ASSETS / "samples").glob("*.png"))]
    assert cli.main(["predict", *imgs, "--model", "demo-random"]) == 0
    assert compiled == []
    assert cli.main(["predict", *imgs, "--model", "demo-random", "--compile"]) == 0
    assert len(compiled) == 1 and "frame_02.png" in capsys.readouterr().out
