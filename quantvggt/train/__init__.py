"""Training a small VGGT on synthetic scenes (the shipped ``vggt-tiny-synthetic`` model)."""
