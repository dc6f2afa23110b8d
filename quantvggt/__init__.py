"""quantvggt: 4-bit VGGT and batch 3D reconstruction."""

__version__ = "0.1.0"

# The package root wires the floors together: device kernels register into lowbit.registry, which quant/ reads.
from quantvggt import kernels as _kernels  # noqa: F401  (imported for its registrations)
