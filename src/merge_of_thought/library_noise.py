"""Library notices a MoT user can do nothing about, filtered narrowly where they arise (never muted globally).

* bitsandbytes logs "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'" when
  it is imported (through PEFT) on a CPU with AVX512-BF16, so on every ``mot`` command that imports PEFT. The
  kernel it means is an optional Hub download for 4-bit single-token inference on the CPU; without it bitsandbytes
  uses its own C++ kernel, which is what MoT's CPU runs use. Only that one record of that one logger is dropped.
* With ``kernels`` installed (transformers 5 depends on it) and the Hub offline (``HF_HUB_OFFLINE=1``), that same
  attempt first logs "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' ..." from
  kernels: that record of that repository alone is dropped too.
* PEFT warns "Adapter ... was active which is now deleted" when MoT deletes a branch adapter it has just read out
  (three times a round from round 2); MoT activates what it needs next itself. :func:`peft_adapter_deleted` hides
  it around MoT's own deletions.
* TRL re-truncates and re-filters a data set it tokenized before, with two progress bars each time: every branch
  after a teacher's first and every eval-loss pass would print them. :func:`datasets_progress_bars` turns the
  data sets' bars off around those trainers only (the first tokenization of each teacher keeps its bars).
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
KERNELS_HUB_LOGGER = "kernels._internals.hf_hub"
KERNELS_TRUST_NOTICE = "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'"


class _DropMessage(logging.Filter):
    """Drops the records of one logger whose message starts with ``prefix``; every other record passes."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def install() -> None:
    """Attach the filters (once) before bitsandbytes is imported: its notices are logged at import."""
    for name, prefix in ((BNB_CPU_LOGGER, BNB_KERNELS_NOTICE), (KERNELS_HUB_LOGGER, KERNELS_TRUST_NOTICE)):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) for f in logger.filters):
            logger.addFilter(_DropMessage(prefix))


@contextlib.contextmanager
def peft_adapter_deleted() -> Iterator[None]:
    """Hide PEFT's "Adapter ... was active which is now deleted" UserWarning for this block only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Adapter .* was active which is now deleted", category=UserWarning)
        yield


@contextlib.contextmanager
def peft_checkpointing_alias() -> Iterator[None]:
    """Hide transformers' FutureWarning for ``is_gradient_checkpointing``, which PEFT reads, for this block only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


@contextlib.contextmanager
def datasets_progress_bars(enabled: bool) -> Iterator[None]:
    """The ``datasets`` progress bars as they are (``enabled``) or off for this block, restored afterwards."""
    import datasets

    turn_off = not enabled and not datasets.are_progress_bars_disabled()
    if turn_off:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if turn_off:
            datasets.enable_progress_bars()
