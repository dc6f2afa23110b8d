"""Command-line interface: ``quantvggt <command>``.

Each command's options and runner live beside the code it drives (``configure(parser)`` and ``run(args) -> int``
in the module named in :data:`COMMANDS`); that module is imported only when its command runs or shows its own
help, so ``quantvggt --help`` never imports torch. Other packages add commands through the
``quantvggt.commands`` entry-point group: each entry point names an object with ``name``, ``help``,
``configure`` and ``run`` (the orchestration commands demo, submit, serve and status come this way, so this
package never imports Prefect or Ray).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

log = logging.getLogger(__name__)
ASSETS = Path(__file__).resolve().parent / "assets"
ENTRY_POINT_GROUP = "quantvggt.commands"

# command name -> (module holding configure(parser) and run(args), one-line help); the order is --help's order
COMMANDS: dict[str, tuple[str, str]] = {
    "predict": ("quantvggt.commands.predict", "run a VGGT model on images and print cameras and depth statistics"),
    "quantize": ("quantvggt.commands.quantize", "calibrate + quantize a model and write a quantized checkpoint"),
    "select-calibration": (
        "quantvggt.commands.select_calibration",
        "choose a calibration set with Noise-Filtered Diverse Sampling",
    ),
    "evaluate": (
        "quantvggt.commands.evaluate",
        "Table 1: float vs quantized recipes on synthetic scenes with ground truth",
    ),
    "train": ("quantvggt.train.cli", "train the small synthetic-scene VGGT (resumable)"),
    "reconstruct": ("quantvggt.commands.reconstruct", "reconstruct scene folders into COLMAP sparse models"),
    "synth": ("quantvggt.commands.synth", "render synthetic scenes with ground truth"),
}


@dataclass(frozen=True)
class Command:
    """One subcommand: its name, one-line help, how to add its options, and how to run it (returns the exit code)."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _lazy(name: str, module: str, help: str) -> Command:
    """A command whose module (and so torch) is imported on first use of ``configure`` or ``run``."""

    def configure(parser: argparse.ArgumentParser) -> None:
        importlib.import_module(module).configure(parser)

    def run(args: argparse.Namespace) -> int:
        return importlib.import_module(module).run(args)

    return Command(name, help, configure, run)


def builtin_commands() -> list[Command]:
    """The library's own commands, from :data:`COMMANDS`."""
    return [_lazy(name, module, help) for name, (module, help) in COMMANDS.items()]


def plugin_commands(taken: Sequence[str] = ()) -> list[Command]:
    """Commands registered by installed packages under the ``quantvggt.commands`` entry-point group.

    A plugin that fails to load, lacks a part, or reuses a taken name is left out with a warning, so one broken
    package never takes the library's own commands down with it.
    """
    out: list[Command] = []
    names = set(taken)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as e:
            log.warning("command %r (%s) not available: %s: %s", ep.name, ep.value, type(e).__name__, e)
            continue
        missing = [a for a in ("name", "help", "configure", "run") if not hasattr(obj, a)]
        if missing:
            log.warning("command %r (%s) left out: it has no %s", ep.name, ep.value, ", ".join(missing))
        elif obj.name in names:
            log.warning("command %r (%s) left out: the name %r is taken", ep.name, ep.value, obj.name)
        else:
            names.add(obj.name)
            out.append(Command(obj.name, obj.help, obj.configure, obj.run))
    return out


def build_parser(
    commands: Sequence[Command] | None = None, only: Sequence[str] | None = None
) -> argparse.ArgumentParser:
    """The argument parser: one subparser per command (built-in, then plugins unless ``commands`` is given).

    ``only`` names the commands whose options are added (default all); the rest show their one-line help only.
    """
    if commands is None:
        builtin = builtin_commands()
        commands = builtin + plugin_commands([c.name for c in builtin])
    p = argparse.ArgumentParser(prog="quantvggt", description="Command-line interface: ``quantvggt <command>``.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    for c in commands:
        s = sub.add_parser(c.name, help=c.help, description=c.help)
        if only is None or c.name in only:
            c.configure(s)
        s.set_defaults(_run=c.run)
    return p


def _is_user_error(e: BaseException) -> bool:
    # bad inputs and unreachable storage are the user's to fix; anything else is a bug and keeps its traceback
    return isinstance(e, (ValueError, RuntimeError, OSError)) or type(e).__module__.startswith(("botocore.", "boto3."))


def _one_line(e: BaseException) -> str:
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return text or type(e).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, configure logging, run the command; a user error is one line on stderr and exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # the first positional word is the command (the top level has flags only): configure just that one
    chosen = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(only=[chosen] if chosen else []).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:
        for noisy in ("httpx", "werkzeug", "matplotlib", "botocore", "urllib3"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args._run(args) or 0)
    except Exception as e:
        if not _is_user_error(e):
            raise
        if args.verbose:
            traceback.print_exc()
        print(f"quantvggt {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
