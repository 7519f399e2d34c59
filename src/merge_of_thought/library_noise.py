"""Library notices a MoT user can do nothing about, filtered narrowly where they arise (never muted globally).

* bitsandbytes logs "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'" when
  it is imported (through PEFT) on a CPU with AVX512-BF16, so on every ``mot`` command that imports PEFT. The
  kernel it means is an optional Hub download for 4-bit single-token inference on the CPU; without it bitsandbytes
  uses its own C++ kernel, which is what MoT's CPU runs use. Only that one record of that one logger is dropped.
* transformers 5 renamed ``is_gradient_checkpointing`` to ``is_activation_checkpointing`` and warns on the old
  name, which PEFT's ``get_peft_model`` still reads: :func:`peft_checkpointing_alias` hides exactly that warning
  around MoT's own call.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_KERNELS_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropMessage(logging.Filter):
    """Drops the records of one logger whose message starts with ``prefix``; every other record passes."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def install() -> None:
    """Attach the bitsandbytes filter (once) before bitsandbytes is imported: the notice is logged at import."""
    logger = logging.getLogger(BNB_CPU_LOGGER)
    if not any(isinstance(f, _DropMessage) for f in logger.filters):
        logger.addFilter(_DropMessage(BNB_KERNELS_NOTICE))


@contextlib.contextmanager
def peft_checkpointing_alias() -> Iterator[None]:
    """Hide transformers' FutureWarning for ``is_gradient_checkpointing``, which PEFT reads, for this block only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield
