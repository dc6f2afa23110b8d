"""quantvggt: 4-bit VGGT and batch 3D reconstruction."""

__version__ = "0.1.0"
