"""The bottom floor: low-bit math shared by quantization algorithms (``quant/``) and device kernels (``kernels/``).

Symmetric quantizers and int4 packing (:mod:`.quantizer`), Hadamard plans and transforms (:mod:`.hadamard`),
and the kernel registry (:mod:`.registry`) that ``kernels/`` fills and ``quant/`` reads. Nothing here imports
from ``quant/`` or ``kernels/``.
"""
