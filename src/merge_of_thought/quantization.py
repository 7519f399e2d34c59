"""Guards for bitsandbytes-quantized students: keep every 4-bit layer in the layout that training and merging read.

bitsandbytes (0.49-0.50 at least) has a CPU inference fast path: on a CPU with AVX512-BF16, ``Linear4bit.forward``
in eval mode with an input that does not require grad repacks the layer's weight *in place* into a CPU layout
(``functional._convert_weight_packed_for_cpu``; ``quant_state.packing_format_for_cpu = True``, scales cast to bf16
and transposed), and nothing converts it back when training resumes. Afterwards the training forward takes the
inference kernel, which passes no gradient to its input, and ``dequantize_4bit`` reads a wrong weight. Any evaluation
(``generate()``, ``Trainer.evaluate()``) therefore breaks every branch trained after it and the merge checks. The
upstream inverse (``_convert_weight_packed_for_cpu_inverse``) restores the packed codes but not the scales of a
layer without double quantization; bitsandbytes issue #2078 is the sibling bug (``Params4bit.to()`` skips it).

:func:`keep_4bit_layout` turns that fast path off on each layer (bitsandbytes' own per-layer switch,
``support_avx512bf16_for_cpu``) and unpacks any weight already packed. The model keeps working for inference
everywhere, through the standard 4-bit kernel. On a CPU without AVX512-BF16 the fast path never runs.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

_CPU_FAST_PATH = "support_avx512bf16_for_cpu"  # bitsandbytes' per-layer flag, read in Linear4bit.forward
_PACKED = "packing_format_for_cpu"  # set on a QuantState once its weight is in the CPU layout


def _linear4bit_class() -> type | None:
    try:
        import bitsandbytes as bnb
    except ImportError:  # no bitsandbytes, so no 4-bit layer
        return None
    return bnb.nn.Linear4bit


def is_packed(weight: torch.nn.Parameter) -> bool:
    """Whether a ``Params4bit`` weight is in bitsandbytes' CPU inference layout."""
    return bool(getattr(getattr(weight, "quant_state", None), _PACKED, False))


def unpack_weight(weight: torch.nn.Parameter) -> None:
    """Bring a packed ``Params4bit`` back to the standard layout, in place.

    The codes come back bit for bit through bitsandbytes' inverse. The scales are restored here: the packing kept
    them only in bf16 (transposed), so a packed layer's scales carry bf16 rounding (relative 2^-9) from then on.
    """
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    state = weight.quant_state
    packed_scales = state.absmax  # (in / blocksize, out) in bf16
    weight.data, state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
    state.absmax = packed_scales.T.reshape(-1).float().contiguous()  # the order dequantize_4bit reads
    state.nested, state.offset, state.state2 = False, None, None  # plain fp32 scales: no second quantization
    weight.quant_state = state


def keep_4bit_layout(model: torch.nn.Module) -> int:
    """Keep every bitsandbytes ``Linear4bit`` of ``model`` in the standard layout; return how many were unpacked.

    Idempotent and cheap (one pass over the modules): MoT calls it on every model it trains, evaluates or merges.
    """
    linear4bit = _linear4bit_class()
    if linear4bit is None:
        return 0
    unpacked = 0
    for module in model.modules():
        if not isinstance(module, linear4bit):
            continue
        setattr(module, _CPU_FAST_PATH, False)
        if is_packed(module.weight):
            unpack_weight(module.weight)
            module.quant_state = module.weight.quant_state
            unpacked += 1
    if unpacked:
        logger.warning(
            "%d 4-bit layers had been repacked by bitsandbytes' CPU inference path (an eval-mode forward on a CPU "
            "with AVX512-BF16), which breaks training; they are back in the standard layout, with their scales "
            "rounded to bf16 by that repack. Load the model afresh for bit-exact 4-bit weights.",
            unpacked,
        )
    return unpacked


def cpu_repacks_4bit() -> bool:
    """Whether bitsandbytes would repack 4-bit weights on this CPU (it has AVX512-BF16) without this guard."""
    try:
        from bitsandbytes.functional import has_avx512bf16
    except ImportError:
        return False
    return bool(has_avx512bf16())
