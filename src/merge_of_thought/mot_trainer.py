"""MoTTrainer: Merge-of-Thought distillation with TRL's SFTTrainer branches and an exact low-rank merge.

The algorithm (Shen et al., arXiv 2509.08814), as :meth:`MoTTrainer.train` runs it::

    for round t = 1..T:
        for each teacher k of this process:      # all of them in one process; k % N == rank with N processes
            attach a fresh LoRA adapter (B = 0)  # the branch starts at the student
            SFTTrainer(...).train()              # teacher k's traces, max_steps, fresh optimizer and schedule
            dW_k = B_k @ A_k * scaling           # read in fp32, saved in PEFT format
        gather every branch's factors            # distributed.py; a no-op in one process
        D = D + sum_k w_k dW_k                   # exact, as low-rank factors (merging.py)
        student = base + D                       # D is a frozen fp32 adapter; the base is never re-quantized
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel
from tqdm.auto import tqdm
from transformers import AutoTokenizer, BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers import TrainerCallback, TrainingArguments
from trl import SFTConfig, SFTTrainer
from trl.trainer.utils import create_model_from_path

from . import adapters, distributed
from .checkpointing import RunFolder
from .data import normalized_weights, validate_teachers
from .distributed import BranchResult
from .merging import LowRankDelta, merge_round, summarize
from .metrics import MetricsLog
from .mot_config import MoTConfig

logger = logging.getLogger(__name__)

DEFAULT_LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


class MoTTrainer:
    """Merge-of-Thought distillation of a student from several teachers' reasoning traces.

    Takes the arguments of TRL's :class:`~trl.SFTTrainer`, with ``teachers`` (teacher name -> data set, in any
    format SFTTrainer reads) in place of ``train_dataset``. ``trainer.train()`` runs all rounds; afterwards
    ``trainer.model`` is the student (the base model with the merged delta as a frozen adapter).

    Args:
        model: a Hub id, a local folder, or a loaded causal LM (not a PeftModel: MoT attaches its own adapters).
        args: a :class:`MoTConfig`; an SFTConfig or TrainingArguments is converted.
        teachers: ``{teacher name: datasets.Dataset}``, each with a 'messages', 'prompt'/'completion' or text column.
        processing_class: the tokenizer; loaded from ``model`` when omitted.
        peft_config: the LoRA settings of every branch. Defaults to r=16, alpha=32 on all linear layers.
        quantization_config: used when ``model`` is loaded from an id or folder (e.g. 4-bit nf4 for QLoRA).
        eval_dataset: held-out data; its loss is measured on the merged student after every round.
        callbacks: transformers callbacks, handed to every branch's SFTTrainer.
    """

    def __init__(
        self,
        model: str | PreTrainedModel,
        args: MoTConfig | SFTConfig | TrainingArguments | None = None,
        teachers: Mapping[str, Dataset] | None = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        peft_config: LoraConfig | None = None,
        quantization_config: BitsAndBytesConfig | None = None,
        eval_dataset: Dataset | None = None,
        data_collator: Callable | None = None,
        callbacks: list[TrainerCallback] | None = None,
        formatting_func: Callable[[dict], str] | None = None,
        optimizer_cls_and_kwargs: tuple[type[torch.optim.Optimizer], dict[str, Any]] | None = None,
    ):
        self.args = _as_mot_config(args, model)
        self.dist = distributed.process_group(self.args.ddp_timeout)
        # Every check on the user's input comes before the model is loaded and before any step is trained.
        validate_teachers(teachers, self.args.dataset_text_field, formatting_func, self.args.allow_single_teacher)
        self.teacher_names = list(teachers)
        self.teacher_weights = normalized_weights(self.teacher_names, self.args.teacher_weights)
        self.teacher_datasets: dict[str, str] = {}  # teacher -> Hub data set id, for mot_run.json and model cards
        if self.dist.world_size > len(self.teacher_names):
            raise ValueError(
                f"{self.dist.world_size} processes for {len(self.teacher_names)} teachers: each process trains whole "
                "branches, so launch at most one process per teacher."
            )
        self.peft_config = adapters.validate_lora_config(peft_config or LoraConfig(**DEFAULT_LORA))
        if isinstance(model, PeftModel):
            raise TypeError(
                "MoTTrainer was given a PeftModel. Pass the base model and the LoRA settings as peft_config: MoT "
                "attaches a fresh adapter per branch and keeps the merged rounds in one of its own."
            )
        self.base_model_id = model if isinstance(model, str) else getattr(model.config, "_name_or_path", None)
        if isinstance(model, str):
            init_kwargs = dict(self.args.model_init_kwargs or {})
            if quantization_config is not None:
                init_kwargs["quantization_config"] = quantization_config
            init_kwargs.setdefault("trust_remote_code", self.args.trust_remote_code)
            if distributed.model_device_map() is not None:  # under a launcher: this process's GPU only
                init_kwargs.setdefault("device_map", distributed.model_device_map())
            model = create_model_from_path(model, **init_kwargs)
        adapters.check_targets(model, self.peft_config)
        if processing_class is None:
            processing_class = AutoTokenizer.from_pretrained(
                self.base_model_id, trust_remote_code=self.args.trust_remote_code
            )

        self.model: PreTrainedModel | PeftModel = model
        self.processing_class = processing_class
        self.datasets: dict[str, Dataset] = dict(teachers)  # replaced by the tokenized copy on first use
        self.eval_dataset = eval_dataset
        self.data_collator = data_collator
        self.callbacks = list(callbacks or [])
        self.formatting_func = formatting_func
        self.optimizer_cls_and_kwargs = optimizer_cls_and_kwargs
        self.merged: dict[str, LowRankDelta] | None = None
        self.run = RunFolder(self.args.output_dir)
        self.metrics = MetricsLog(self.run.metrics_path, enabled=self.dist.is_main)

    # ------------------------------------------------------------------ the algorithm
    def train(self) -> list[dict[str, Any]]:
        """Run every round; return the per-round records that also go to ``metrics.jsonl``."""
        args, rounds = self.args, []
        self._write_run_info()
        my_branches = self.dist.my_branches(len(self.teacher_names))
        progress = tqdm(  # process 0's branches: the others train theirs at the same time
            total=args.num_rounds * len(my_branches),
            desc="MoT branches",
            disable=args.disable_tqdm or not self.dist.is_main,
        )
        for round_idx in range(1, args.num_rounds + 1):
            mine = {}
            for k in my_branches:
                progress.set_postfix(round=round_idx, teacher=self.teacher_names[k])
                mine[k] = self._train_branch(round_idx, k, self.teacher_names[k])
                progress.update()
            branches = self.dist.gather_branches(mine, len(self.teacher_names))
            self._save_branches(round_idx, branches)
            start = time.perf_counter()
            self.merged, reports = merge_round(
                self.merged,
                [b.adapter.deltas() for b in branches],
                self.teacher_weights,
                args.merge_max_rank,
                args.merge_tolerance,
            )
            adapters.install_merged(self.model, self.merged, self.base_model_id)  # student += sum_k w_k dW_k
            merge_seconds = time.perf_counter() - start
            self._save_round(round_idx, reports)
            record = {"type": "round", "round": round_idx, "merge_seconds": merge_seconds, **summarize(reports)}
            record.update(self.dist.on_main(self.evaluate))
            self.metrics.write(record)
            rounds.append(record)
        progress.close()
        self.dist.barrier()  # the run folder is complete when train() returns on any process
        return rounds

    # ------------------------------------------------------------------ one branch
    def _train_branch(self, round_idx: int, k: int, teacher: str) -> BranchResult:
        """Train a fresh LoRA branch on one teacher from the current student; return its adapter and metrics."""
        name = f"mot_branch_{k}"
        self.model = adapters.add_branch_adapter(
            self.model, name, self.peft_config, seed=self._branch_seed(round_idx, k)
        )
        trainer = self._sft_trainer(
            train_dataset=self.datasets[teacher],
            output_dir=str(self.run.branch_dir(round_idx, teacher)),
            seed=self._branch_seed(round_idx, k),
            run_name=f"round{round_idx}/{teacher}",
        )
        self.datasets[teacher] = trainer.train_dataset  # tokenized once, reused every later round
        start = time.perf_counter()
        output = trainer.train()
        adapter = adapters.detach_adapter(self.model, name)
        adapters.remove_adapter(self.model, name)
        losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        return BranchResult(
            adapter,
            {
                "type": "branch",
                "round": round_idx,
                "teacher": teacher,
                "steps": output.global_step,
                "train_loss": output.training_loss,
                "last_loss": losses[-1] if losses else None,
                "seconds": time.perf_counter() - start,
            },
        )

    def _save_branches(self, round_idx: int, branches: list[BranchResult]) -> None:
        """Process 0 writes every branch's adapter and metrics line, whichever process trained it."""
        if not self.dist.is_main:
            return
        for branch in branches:
            if self.args.save_branch_adapters:
                folder = self.run.branch_dir(round_idx, branch.record["teacher"])
                branch.adapter.save(folder, self.base_model_id)
            self.metrics.write(branch.record)

    def _branch_seed(self, round_idx: int, k: int) -> int:
        """Deterministic and distinct per branch, so each round sees a new data order and a new LoRA init."""
        return self.args.seed + 1000 * round_idx + k

    def _sft_trainer(self, train_dataset: Dataset, eval_dataset: Dataset | None = None, **overrides) -> SFTTrainer:
        """An SFTTrainer on the shared model with the user's SFT settings; MoT writes its own checkpoints."""
        fields = {f.name: getattr(self.args, f.name) for f in dataclasses.fields(SFTConfig) if f.init}
        fields.update(save_strategy="no", push_to_hub=False, eval_strategy="no", load_best_model_at_end=False)
        fields.update(overrides)
        trainer = SFTTrainer(
            model=self.model,
            args=distributed.pin_device(SFTConfig(**fields)),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=self.processing_class,
            data_collator=self.data_collator,
            callbacks=self.callbacks,
            formatting_func=self.formatting_func,
            optimizer_cls_and_kwargs=self.optimizer_cls_and_kwargs,
        )
        if not (trainer.args.bf16 or trainer.args.fp16):
            # TRL stores QLoRA adapters in bf16; without mixed precision that only loses update bits (and speed
            # on CPUs), so branches keep fp32 adapters.
            for param in self.model.parameters():
                if param.requires_grad and param.dtype != torch.float32:
                    param.data = param.data.float()
        return trainer

    # ------------------------------------------------------------------ evaluation and records
    def evaluate(self) -> dict[str, float]:
        """Eval loss of the current student on ``eval_dataset`` (empty when there is none)."""
        if self.eval_dataset is None or not isinstance(self.model, PeftModel):
            return {}
        trainer = self._sft_trainer(
            train_dataset=self.datasets[self.teacher_names[0]],
            eval_dataset=self.eval_dataset,
            output_dir=str(self.run.root / "eval"),
            report_to=[],
        )
        self.eval_dataset = trainer.eval_dataset  # tokenized once
        return {"eval_loss": trainer.evaluate()["eval_loss"]}

    def _save_round(self, round_idx: int, reports) -> None:
        if not self.dist.is_main:
            return
        adapters.save_merged(self.merged, self.run.merged_dir(round_idx), self.base_model_id)
        self.run.write_round(round_idx, self.teacher_names, self.teacher_weights, reports, self.merged)

    def _write_run_info(self) -> None:
        if not self.dist.is_main:
            return
        self.run.write_run(
            {
                "base_model": self.base_model_id,
                "teachers": self.teacher_names,
                "teacher_weights": self.teacher_weights,
                "teacher_datasets": self.teacher_datasets,
                "num_rounds": self.args.num_rounds,
                "steps_per_branch": self.args.max_steps,
                "lora": self.peft_config.to_dict(),
                "seed": self.args.seed,
            }
        )

    # ------------------------------------------------------------------ export and sharing (export.py, hub.py)
    def save_adapter(self, path: str | os.PathLike, rank: int | None = None, base_model_id: str | None = None) -> dict:
        """Write the student as ONE PEFT LoRA adapter on the original base: exact, or SVD-truncated to ``rank``.

        Returns the per-layer and total relative error of the truncation (zero when exact). ``base_model_id`` is
        the Hub id to record when the run loaded the base from a local folder. See :mod:`merge_of_thought.export`.
        """
        return self._export(adapter_dir=path, rank=rank, base_model_id=base_model_id)["adapter"]

    def save_merged(
        self,
        path: str | os.PathLike,
        dtype: str | torch.dtype | None = None,
        max_shard_size: str | int = "5GB",
        base_model_id: str | None = None,
    ) -> dict:
        """Write base + delta as a full model (folded in fp32 into the original, unquantized base, cast once)."""
        return self._export(merged_dir=path, dtype=dtype, max_shard_size=max_shard_size, base_model_id=base_model_id)[
            "merged"
        ]

    def push_to_hub(
        self,
        repo_id: str | None = None,
        merged: bool = False,
        private: bool | None = None,
        revision: str | None = None,
        token: str | None = None,
        commit_message: str = "End of MoT training",
        **export_kwargs: Any,
    ):
        """Export the adapter (or the merged model) to ``output_dir/hub-<kind>`` and upload it with its card.

        Defaults follow TRL: ``args.hub_model_id`` (else the output folder's name), ``args.hub_private_repo``,
        ``args.hub_revision`` and ``args.hub_token``. ``export_kwargs`` go to :meth:`save_adapter`/:meth:`save_merged`.
        """
        from .hub import push_folder

        repo_id = repo_id or self.args.hub_model_id or os.path.basename(os.path.abspath(self.args.output_dir))
        folder = os.path.join(self.args.output_dir, "hub-merged" if merged else "hub-adapter")
        self._export(repo_id=repo_id, **{"merged_dir" if merged else "adapter_dir": folder}, **export_kwargs)
        return push_folder(
            folder,
            repo_id,
            private=self.args.hub_private_repo if private is None else private,
            revision=revision or self.args.hub_revision,
            token=token or self.args.hub_token,
            commit_message=commit_message,
        )

    def _export(self, **kwargs) -> dict:
        from .export import FinishedRun, export_run

        if self.merged is None:
            raise ValueError("Nothing to export yet: the student is the base model until train() merges a round.")
        run = FinishedRun(self.args.output_dir)
        kwargs.setdefault("trust_remote_code", self.args.trust_remote_code)
        return export_run(run, deltas=self.merged, tokenizer=self.processing_class, **kwargs)


def _as_mot_config(args: MoTConfig | TrainingArguments | None, model: str | PreTrainedModel) -> MoTConfig:
    if args is None:
        name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
        return MoTConfig(output_dir=f"{str(name).rstrip('/').split('/')[-1] or 'model'}-MoT")
    if isinstance(args, MoTConfig):
        return args
    if isinstance(args, TrainingArguments):
        known = {f.name for f in dataclasses.fields(MoTConfig) if f.init}
        values = {k: v for k, v in args.to_dict().items() if k in known}
        values["hub_token"] = args.hub_token
        return MoTConfig(**values)
    raise TypeError(f"args must be a MoTConfig, got {type(args).__name__}.")
