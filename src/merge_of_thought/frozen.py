"""Where the student's merged delta lives while its branches train: a frozen fp32 adapter, or the fp32 weights.

During a branch, the merged delta ``D_t`` (for persistent branches, the branch's offset ``D_t - P_k``) is frozen.
``MoTConfig.frozen_delta`` chooses its home:

- ``"adapter"``: a frozen LoRA adapter beside the branch (:func:`adapters.install_merged`). Exact on any base
  (4-bit, 8-bit, bf16: never re-quantized). The branch's forward computes it in the same low-rank pass as the
  branch (fused.py), so a step pays for its rank, which grows by K*r a round with fresh branches, and little else.
  Its factors are fp32, or under bf16/fp16 mixed precision the autocast dtype the pass computes them in anyway.
- ``"weights"``: added into the base weights, which must be unquantized fp32 ``nn.Linear`` weights: no per-step
  cost at all. Each install adds the change since the last one (after an append merge, the round's own columns;
  else new minus old factors) as one fp32 product accumulated into the weights (``addmm_``, in true fp32 even where
  the user turned TF32 on: devices.py), so each round adds fp32 rounding of about 6e-8 of ``|W|`` (6e-5 of a delta
  of 1e-3 ``|W|``), far inside the merge's 1e-3 fidelity bound. bf16 and 4-bit weights cannot hold a delta that
  small (bf16 loses 78% of a 1e-3 delta).
- ``"auto"`` (the default): ``"weights"`` when every adapted layer is an fp32 ``nn.Linear``, else ``"adapter"``.

Either way the merged delta itself stays as exact low-rank factors (``MoTTrainer.merged``): checkpoints, exports and
``mot merge`` read those, never the weights. Where the home does not hold the fp32 factors themselves (the weights,
or a bf16/fp16 adapter), process 0 reads them from the round's checkpoint a layer at a time when asked
(``checkpointing.SavedDelta``) instead of keeping a second copy in memory.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from peft import PeftModel
from transformers import PreTrainedModel

from . import adapters, devices
from .checkpointing import SavedDelta, reading
from .merging import LowRankDelta, difference

FROZEN_DELTA = ("auto", "adapter", "weights")
HOLDS_DELTA = "_mot_weights_hold_merged_delta"  # set on a model whose fp32 weights a run changed


def weights_can_hold(model: PreTrainedModel, module_names: list[str]) -> bool:
    """Whether every adapted layer is a plain fp32 ``nn.Linear`` (not a bitsandbytes or bf16 layer)."""
    modules = [model.get_submodule(name) for name in module_names]
    return all(type(m) is torch.nn.Linear and m.weight.dtype == torch.float32 for m in modules)


def resolve(choice: str, model: PreTrainedModel, module_names: list[str]) -> str:
    """``"adapter"`` or ``"weights"`` for this model (``choice`` as MoTConfig validated it); a clear error when the
    weights cannot hold the delta."""
    fits = weights_can_hold(model, module_names)
    if choice == "weights" and not fits:
        kinds = sorted({f"{type(m).__name__} ({m.weight.dtype})" for m in map(model.get_submodule, module_names)})
        raise ValueError(
            f"frozen_delta='weights' needs fp32 nn.Linear layers to add the merged delta into, but the adapted "
            f"layers are {', '.join(kinds)}: quantized or bf16 weights would lose most of it. Use 'adapter' (or "
            "'auto')."
        )
    if choice == "auto":
        return "weights" if fits else "adapter"
    return choice


class FrozenDelta:
    """Installs the frozen delta in its home; ``install`` returns the model the branches train on next.

    ``adapter_dtype`` is what the adapter's factors are stored in: fp32, or under bf16/fp16 mixed precision the
    autocast dtype, the one the branch's pass casts them to at every step anyway (fused.py): the same arithmetic,
    without the per-step casts and at half the memory, while the exact fp32 factors stay in the round checkpoint.
    """

    def __init__(
        self,
        home: str,
        base_model_name_or_path: str | None,
        task_type: str | None,
        adapter_dtype: torch.dtype = torch.float32,
    ):
        self.home, self.adapter_dtype = home, adapter_dtype
        self.base_model_name_or_path, self.task_type = base_model_name_or_path, task_type
        self._in_weights: Mapping[str, LowRankDelta] = {}  # what the weights hold now, on top of the loaded base

    @property
    def holds_the_fp32_factors(self) -> bool:
        """Whether the installed delta shares the fp32 factors' memory (an fp32 adapter) rather than copies them."""
        return self.home == "adapter" and self.adapter_dtype == torch.float32

    def install(
        self, model: PreTrainedModel | PeftModel, delta: Mapping[str, LowRankDelta]
    ) -> PreTrainedModel | PeftModel:
        if self.home == "adapter":
            return adapters.install_merged(
                model, delta, self.base_model_name_or_path, self.task_type, dtype=self.adapter_dtype,
                rank_multiple=self._rank_multiple(model),
            )
        model = unwrap(model)
        if isinstance(delta, SavedDelta) and delta.same_as(self._in_weights):
            return model  # the weights hold it already (a resume in the same process): D - D would only add rounding
        with torch.no_grad(), devices.exact_fp32_matmul(), reading(delta, self._in_weights):  # TF32: ~1e-3 off
            for name in delta.keys() | self._in_weights.keys():
                weight = model.get_submodule(name).weight
                if name not in self._in_weights:
                    change = delta[name]
                elif name not in delta:
                    change = self._in_weights[name].scaled(-1.0)
                else:  # after an append merge, only the round's columns
                    change = difference(delta[name], self._in_weights[name])
                weight.addmm_(change.B.to(weight.device), change.A.to(weight.device))  # rounded once into W
        self._in_weights = delta  # a mapping: it may read each layer from a checkpoint when asked (SavedDelta)
        setattr(model, HOLDS_DELTA, True)
        return model


    def _rank_multiple(self, model: PreTrainedModel | PeftModel) -> int:
        """Pad the adapter's rank to a multiple of 8 (exact: zero rows and columns) where its factors are copies
        anyway (bf16/fp16, or on a GPU), so its products fill tensor cores; an fp32 adapter on the CPU shares the
        merged factors' memory as they are."""
        if self.adapter_dtype == torch.float32 and all(p.device.type == "cpu" for p in model.parameters()):
            return 1
        return devices.TENSOR_CORE_MULTIPLE


def check_unchanged(model: PreTrainedModel | str) -> None:
    """Refuse a model whose weights already hold a MoT run's delta: a new run would start from that student while
    its records and exports say it started from the base."""
    if getattr(model, HOLDS_DELTA, False):
        raise TypeError(
            "This model's weights already hold the merged delta of a MoT run (trainer.model after a run with "
            "frozen_delta='weights'). Load the base model again for a new run or a resume; to go on from that "
            "student, export it with save_merged() and load that."
        )


def unwrap(model: PreTrainedModel | PeftModel) -> PreTrainedModel:
    """The plain model under a PeftModel whose adapters were all removed (PEFT's ``unload``)."""
    if not isinstance(model, PeftModel):
        return model
    if model.peft_config:
        raise RuntimeError(f"adapters {sorted(model.peft_config)} are still attached; remove them first")
    return model.unload()

