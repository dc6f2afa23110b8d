"""The CLI floor: each ``quantvggt <command>``'s options (``configure(parser)``) and runner (``run(args) -> int``).

The library below never parses arguments or prints; these modules do both, and call it. :mod:`quantvggt.cli` imports
a command's module only when that command runs or shows its help.
"""
