"""Ray actors that run (quantized) VGGT over scenes; thin wrappers over :mod:`quantvggt.reconstruct`."""
