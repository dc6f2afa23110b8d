"""Prefect flows: thin wrappers over the quantvggt library (quantize once, reconstruct in batches on Ray)."""
