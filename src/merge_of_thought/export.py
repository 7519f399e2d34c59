"""Hub-ready exports of a MoT student: one LoRA adapter on the original base model, or the merged full model.

After round 1 the student is no longer the base model, so a branch adapter means nothing on its own. What is worth
sharing is the cumulative delta ``D`` of every merged round, which the run holds as fp32 low-rank factors:

* :func:`save_adapter` writes ``D`` as ONE plain PEFT LoRA adapter for the original base model. Exact by default
  (the factors as they are, total rank); with a rank budget it is truncated through an SVD computed from the factors
  (:func:`~merge_of_thought.merging.recompress`) and the Frobenius error is reported per layer and in total.
* :func:`save_merged` folds ``W + D`` in fp32 into the ORIGINAL base weights, reloaded from the base model id (not
  the possibly 4-bit copy the student trained on, so no quantization error is baked in), casts once to the target
  dtype and writes sharded safetensors with the tokenizer and generation config.

With an unquantized student, base + adapter reproduces the student's logits to fp32 round-off. With a 4-bit or
8-bit student, both exports apply ``D`` to the unquantized base; they reproduce the student up to the base's own
quantization error, which the student carried and the export does not.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from . import adapters, hub
from .checkpointing import RUN_FILE, RunFolder, umask_mode, write_json_atomic
from .merging import LowRankDelta, MergeReport, recompress, summarize
from .hub import hub_id, is_local_path
from .metrics import MetricsLog

EXPORT_REPORT = "mot_export.json"
DeltaLike = LowRankDelta | torch.Tensor  # low-rank factors, or a dense delta from TIES/DARE merges

def compress(
    deltas: Mapping[str, LowRankDelta], rank: int | None = None
) -> tuple[dict[str, LowRankDelta], dict[str, MergeReport]]:
    """The deltas as they are (``rank=None``: exact), or SVD-truncated to ``rank`` with the error of every layer.

    A report's ``delta_norm`` is the norm of the whole delta, so ``relative_error`` is ``|D - D_r|_F / |D|_F``.
    """
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be at least 1 or None (exact), got {rank}.")
    out, reports = {}, {}
    for name, delta in deltas.items():
        kept, dropped = (delta, 0.0) if rank is None else recompress(delta, max_rank=rank)
        out[name] = kept
        reports[name] = MergeReport(delta.rank, kept.rank, dropped, delta.frobenius_norm())
    return out, reports


def error_summary(reports: Mapping[str, MergeReport]) -> dict[str, Any]:
    """Per-layer ranks and relative errors, the worst layer and the total (``|D - D_r|_F / |D|_F`` over all)."""
    totals = summarize(reports)
    return {
        "rank": totals["merge_rank"],
        "relative_error_max": totals["merge_rel_error_max"],
        "relative_error_total": totals["merge_rel_error_total"],
        "layers": {
            name: {"rank_before": r.rank_before, "rank_after": r.rank_after, "relative_error": r.relative_error}
            for name, r in reports.items()
        },
    }


def save_adapter(
    deltas: Mapping[str, LowRankDelta],
    folder: str | os.PathLike,
    base_model: str | None,
    rank: int | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``deltas`` as one PEFT LoRA adapter for ``base_model`` (exact, or truncated to ``rank``).

    Loads with PEFT alone: ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)``.
    Returns the ranks and relative errors (per layer and total), also written to ``mot_export.json`` with
    ``extra`` (what the export came from).
    """
    kept, reports = compress(deltas, rank)
    return write_adapter(kept, reports, folder, base_model, {"requested_rank": rank, **(extra or {})})


def write_adapter(
    deltas: Mapping[str, LowRankDelta],
    reports: Mapping[str, MergeReport],
    folder: str | os.PathLike,
    base_model: str | None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write low-rank deltas as a PEFT LoRA adapter (scaling 1) and ``mot_export.json`` with their error report."""
    folder = Path(folder)
    adapters.save_merged(deltas, folder, hub_id(base_model))
    umask_mode(folder)
    record = {"kind": "adapter", **error_summary(reports), **(extra or {})}
    write_json_atomic(folder / EXPORT_REPORT, record)
    return record


def load_base(
    base_model: str, trust_remote_code: bool = False, revision: str | None = None, token: str | bool | None = None
) -> PreTrainedModel:
    """The original base model in its checkpoint dtype on the CPU: unquantized, whatever the student trained on."""
    return AutoModelForCausalLM.from_pretrained(
        base_model, dtype="auto", trust_remote_code=trust_remote_code, revision=revision, token=token
    )


def fold_into(model: PreTrainedModel, deltas: Mapping[str, DeltaLike], dtype: torch.dtype) -> PreTrainedModel:
    """``W <- cast(W + D)`` for every delta, summed in fp32 and cast to ``dtype`` once; the other weights are cast.

    Raises if a layer is missing, has another shape, or shares its weight with another module (tied embeddings),
    since folding there would silently change a second layer.
    """
    shared = {id(model.get_input_embeddings().weight)}
    with torch.no_grad():
        for name, delta in deltas.items():
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"the base model {type(model).__name__} has no module {name!r}") from None
            weight = module.weight
            dense = delta.dense() if isinstance(delta, LowRankDelta) else delta
            if tuple(weight.shape) != tuple(dense.shape):
                raise ValueError(f"{name}: the base weight is {tuple(weight.shape)}, the delta {tuple(dense.shape)}")
            if id(weight) in shared:
                raise ValueError(f"{name}: its weight is tied to the input embeddings; folding would change both")
            module.weight = torch.nn.Parameter((weight.float() + dense.float()).to(dtype), requires_grad=False)
    return model.to(dtype)


def save_merged(
    deltas: Mapping[str, DeltaLike],
    folder: str | os.PathLike,
    base_model: str,
    dtype: str | torch.dtype | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_shard_size: str | int = "5GB",
    trust_remote_code: bool = False,
    extra: Mapping[str, Any] | None = None,
) -> PreTrainedModel:
    """Fold ``deltas`` into the original ``base_model`` and save a full model that loads with AutoModelForCausalLM.

    ``dtype`` defaults to the base checkpoint's dtype; the tokenizer is ``tokenizer`` or the base model's.
    """
    folder = Path(folder)
    model = load_base(base_model, trust_remote_code=trust_remote_code)
    target = _as_dtype(dtype) if dtype is not None else model.dtype
    fold_into(model, deltas, target)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(base_model, trust_remote_code=trust_remote_code)
    tokenizer.save_pretrained(folder)
    umask_mode(folder)
    record = {"kind": "merged", "dtype": str(target).removeprefix("torch."), "layers_folded": len(deltas)}
    write_json_atomic(folder / EXPORT_REPORT, {**record, **(extra or {})})
    return model


def _as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    value = getattr(torch, aliases.get(dtype, dtype), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16.")
    return value


class FinishedRun:
    """A MoT run read back from its folder: the base model, settings, metrics and a round's merged delta."""

    def __init__(self, output_dir: str | os.PathLike, round_idx: int | None = None):
        self.folder = RunFolder(output_dir)
        if not (self.folder.root / RUN_FILE).exists():
            raise FileNotFoundError(f"{output_dir} is not a MoT run folder (no mot_run.json).")
        self.info = self.folder.read_run()
        completed = self.folder.completed_rounds()
        if not completed:
            raise ValueError(f"{output_dir} has no completed round to export.")
        if round_idx is not None and round_idx not in completed:
            raise ValueError(f"round {round_idx} is not complete in {output_dir}; completed rounds: {completed}.")
        self.round = round_idx or completed[-1]
        self.metrics = [m for m in MetricsLog(self.folder.metrics_path).read() if m.get("round", 0) <= self.round]

    @property
    def base_model(self) -> str:
        return self.info["base_model"]

    def deltas(self) -> dict[str, LowRankDelta]:
        return adapters.load_delta(self.folder.merged_dir(self.round))

    def weights_source(self, base_model_id: str | None) -> str:
        """Where to read the base weights: the run's own base, unless it was a local folder that is gone."""
        base = self.base_model
        if base_model_id and is_local_path(base) and not os.path.isdir(base):
            return base_model_id
        return base


def export_run(
    run: FinishedRun,
    adapter_dir: str | os.PathLike | None = None,
    merged_dir: str | os.PathLike | None = None,
    rank: int | None = None,
    dtype: str | torch.dtype | None = None,
    base_model_id: str | None = None,
    deltas: Mapping[str, LowRankDelta] | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_shard_size: str | int = "5GB",
    trust_remote_code: bool = False,
    repo_id: str | None = None,
) -> dict[str, Any]:
    """Export a run's student as an adapter and/or a merged model, each folder with its model card.

    ``deltas`` defaults to the run's last merged round on disk (a live trainer passes its own). ``base_model_id``
    is the Hub id to record when the run started from a local copy of the base. Returns each export's summary.
    """
    deltas = run.deltas() if deltas is None else deltas
    recorded = hub_id(base_model_id or run.base_model)
    source = {"run": str(run.folder.root), "round": run.round}
    results = {}
    if adapter_dir is not None:
        results["adapter"] = save_adapter(deltas, adapter_dir, recorded, rank, extra=source)
        _write_run_card("adapter", Path(adapter_dir), run, results["adapter"], recorded, repo_id)
    if merged_dir is not None:
        model = save_merged(
            deltas,
            merged_dir,
            run.weights_source(base_model_id),
            dtype,
            tokenizer,
            max_shard_size,
            trust_remote_code,
            extra=source,
        )
        results["merged"] = {"dtype": str(model.dtype).removeprefix("torch."), "layers_folded": len(deltas)}
        _write_run_card("merged", Path(merged_dir), run, results["merged"], recorded, repo_id)
    return results


def _write_run_card(kind, folder: Path, run: FinishedRun, summary, base_model, repo_id) -> None:
    card = hub.run_card(kind, folder, run.info, run.metrics, run.round, summary, base_model, repo_id)
    card.save(folder / "README.md")
