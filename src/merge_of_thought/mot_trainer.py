"""MoTTrainer: Merge-of-Thought distillation with TRL's SFTTrainer branches and an exact low-rank merge.

The algorithm (Shen et al., arXiv 2509.08814), as :meth:`MoTTrainer.train` runs it::

    for round t = 1..T:
        for each teacher k of this process:      # all of them in one process; k % N == rank with N processes
            attach a fresh LoRA adapter (B = 0)  # the branch starts at the student
            SFTTrainer(...).train()              # teacher k's traces, max_steps, fresh optimizer and schedule
            dW_k = B_k @ A_k * scaling           # read in fp32, saved in PEFT format
        gather every branch's factors            # distributed.py; a no-op in one process
        w = teacher_weights, or scores           # normalised branch eval accuracies (teacher_weighting, weighting.py)
        D = D + s * sum_k w_k dW_k               # exact, as low-rank factors (merging.py); s = merge_step_size = 1
        student = base + D                       # D: a frozen fp32 adapter, or in fp32 weights (frozen.py)

Every branch adapter and every merged round is checkpointed atomically in ``output_dir`` (checkpointing.py), so
``train(resume_from_checkpoint=True)`` continues after the last completed branch with the same result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from datasets import Dataset
from peft import LoraConfig, PeftModel
from tqdm.auto import tqdm
from transformers import BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers import TrainerCallback, TrainingArguments
from trl import SFTConfig, SFTTrainer
from trl.trainer.utils import create_model_from_path

from . import adapters, branches, collection, devices, distributed, frozen, library_noise, quantization, weighting
from .branches import BranchState, CarryOptimizerState
from .callbacks import MoTCallback, MoTCallbackHandler, split_callbacks
from .checkpointing import BRANCH_RECORD, ResumePoint, RunFolder, atomic_dir, plural, reading, resume_target
from .checkpointing import umask_mode, write_json_atomic
from .data import LengthStats, check_chat_format, normalized_weights, prepare_teachers, validate_teachers
from .distributed import BranchResult
from . import evaluation
from .hub import check_model_source, load_tokenizer
from .guards import BranchDivergedError, DivergenceGuard, checkpoint_bytes
from .merging import LowRankDelta, kept_norm, merge_round, summarize
from .metrics import MetricsLog
from .mot_config import MoTConfig
from .reporting import RoundReporter, logging_root, route_branch_logs

logger = logging.getLogger(__name__)

DEFAULT_LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def check_data(
    args: MoTConfig,
    teachers: Mapping[str, Dataset] | None,
    eval_dataset: Dataset | None = None,
    formatting_func: Callable[[dict], str] | None = None,
) -> dict[str, float]:
    """The checks on a run's data that need neither the tokenizer nor the model: MoTTrainer makes them first and
    ``mot train --dry_run`` makes the same ones. Returns each teacher's merge weight."""
    validate_teachers(teachers, args.dataset_text_field, formatting_func, args.allow_single_teacher)
    weights = normalized_weights(list(teachers), args.teacher_weights)
    if args.teacher_weighting != "fixed" and (eval_dataset is None or args.teacher_weights):
        raise ValueError(
            f"teacher_weighting={args.teacher_weighting!r} weighs each round's branches by their score on "
            "eval_dataset: pass an eval_dataset (held-out problems with answers) and no teacher weights."
        )
    if eval_dataset is not None and args.eval_accuracy_samples:  # a row without an answer fails here
        evaluation.check_eval_dataset(eval_dataset, args.eval_accuracy_samples, args.answer_pattern, args.answer_match)
    return weights


def prepare_data(
    args: MoTConfig,
    teachers: Mapping[str, Dataset],
    tokenizer: PreTrainedTokenizerBase,
    formatting_func: Callable[[dict], str] | None = None,
) -> tuple[dict[str, Dataset], list[LengthStats]]:
    """The checks that need the student's tokenizer: its chat format, every row, the reasoning rendered as its chat
    template expects, the lengths reported against ``max_length``. Returns the teachers as SFT will see them and
    their length statistics."""
    check_chat_format(teachers, tokenizer, args.assistant_only_loss, args.chat_template_path, formatting_func)
    return prepare_teachers(teachers, tokenizer, args, formatting_func)


class MoTTrainer:
    """Merge-of-Thought distillation of a student from several teachers' reasoning traces.

    Takes the arguments of TRL's :class:`~trl.SFTTrainer`, with ``teachers`` (teacher name -> data set, in any
    format SFTTrainer reads) in place of ``train_dataset``. ``trainer.train()`` runs all rounds; afterwards
    ``trainer.model`` is the student: the base model with the merged delta in a frozen fp32 adapter, or for an fp32
    student, added into its weights (``args.frozen_delta``; frozen.py).

    Args:
        model: a Hub id, a local folder, or a loaded causal LM (not a PeftModel: MoT attaches its own adapters).
        args: a :class:`MoTConfig`; an SFTConfig or TrainingArguments is converted.
        teachers: ``{teacher name: datasets.Dataset}``, each with a 'messages', 'prompt'/'completion' or text column.
        processing_class: the tokenizer; loaded from ``model`` when omitted.
        peft_config: the LoRA settings of every branch. Defaults to r=16, alpha=32 on all linear layers.
        quantization_config: used when ``model`` is loaded from an id or folder (e.g. 4-bit nf4 for QLoRA).
        eval_dataset: held-out data; its loss is measured on the starting student and after every round (on the
            rows SFT can score), and with ``args.eval_accuracy_samples`` its pass@1, written with its generations to
            ``round-XXX/eval.jsonl`` (columns: 'prompt' or 'messages', and 'answer' or 'completion'; see
            :func:`~merge_of_thought.evaluation.prompts_and_answers`).
        callbacks: transformers ``TrainerCallback`` objects go to every branch's SFTTrainer; ``MoTCallback``
            objects get the MoT events (round and branch begin/end, after merge, evaluate; see callbacks.py).
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
        callbacks: list[TrainerCallback | MoTCallback] | None = None,
        formatting_func: Callable[[dict], str] | None = None,
        optimizer_cls_and_kwargs: tuple[type[torch.optim.Optimizer], dict[str, Any]] | None = None,
    ):
        self.args = _as_mot_config(args, model)
        self.dist = distributed.process_group(self.args.ddp_timeout)
        # Every check on the user's input comes before the model is loaded and before any step is trained.
        self.teacher_weights = check_data(self.args, teachers, eval_dataset, formatting_func)
        self.teacher_names = list(teachers)
        self.teacher_datasets: dict[str, str] = {}  # teacher -> Hub data set id, for mot_run.json and model cards
        self.teacher_sources: dict[str, str] = {}  # teacher -> its files or folder in words (mot train sets both)
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
        frozen.check_unchanged(model)
        self.run = RunFolder(self.args.output_dir)
        self.run.check_writable(shared=self.dist.world_size > 1)
        self.base_model_id = model if isinstance(model, str) else getattr(model.config, "_name_or_path", None)
        self._teacher_rows = {name: len(dataset) for name, dataset in teachers.items()}
        self._eval_rows = len(eval_dataset) if eval_dataset is not None else 0
        self._lora_settings = self.peft_config.to_dict()  # as given: PEFT later expands "all-linear" in place
        self._quantization: dict[str, Any] | None = None  # of the loaded student, for mot_run.json and the cards
        self.metrics = MetricsLog(self.run.metrics_path, enabled=self.dist.is_main)
        self.frozen_delta: frozen.FrozenDelta | None = None  # where D_t lives; chosen once the model is loaded
        if resume_target(self.args.resume_from_checkpoint):  # a resume asked for in args: check the run now
            self._check_start(self.args.resume_from_checkpoint)
        if processing_class is None:  # before the model: its chat template is checked first
            # a missing folder or an unreachable Hub id is named in one line, before the model is loaded
            processing_class = load_tokenizer(self.base_model_id, self.args.trust_remote_code)
        teachers, self.length_stats = prepare_data(self.args, teachers, processing_class, formatting_func)
        if isinstance(model, str):
            init_kwargs = dict(self.args.model_init_kwargs or {})
            if quantization_config is not None:
                init_kwargs["quantization_config"] = quantization_config
            init_kwargs.setdefault("trust_remote_code", self.args.trust_remote_code)
            if distributed.model_device_map() is not None:  # under a launcher: this process's GPU only
                init_kwargs.setdefault("device_map", distributed.model_device_map())
            check_model_source(model)
            model = create_model_from_path(model, **init_kwargs)
        quantization.keep_4bit_layout(model)  # bitsandbytes' CPU repacking would break every branch after an eval
        targets = adapters.check_targets(model, self.peft_config)
        self._layer_dims = adapters.layer_dims(model, targets)
        # the merged delta's home while branches train: the fp32 weights themselves, or a frozen adapter
        self.frozen_delta = frozen.FrozenDelta(
            frozen.resolve(self.args.frozen_delta, model, targets),
            self.base_model_id,
            self.peft_config.task_type,
            adapter_dtype=torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else torch.float32,
        )
        self._quantization = adapters.quantization_summary(model)

        self.model: PreTrainedModel | PeftModel = model
        self.processing_class = processing_class
        self.datasets: dict[str, Dataset] = dict(teachers)  # replaced by the tokenized copy on first use
        self._prepared: set[str] = set()  # teachers whose data set in self.datasets an SFTTrainer has prepared
        self.eval_dataset = eval_dataset
        self._eval_tokenized: Dataset | None = None
        self._eval_loss_skipped = False  # the eval rows have no completion SFT can score (logged once)
        self.last_eval_records: list[dict[str, Any]] = []  # per-sample generations of the latest accuracy eval
        self.data_collator = data_collator
        self.callbacks, mot_callbacks = split_callbacks(callbacks)
        self.logging_dir = logging_root(self.args)
        reporter = RoundReporter(self.args, self.logging_dir / "mot", self.dist.is_main)
        self.fire = MoTCallbackHandler([reporter, *mot_callbacks])
        self.should_stop = False  # a MoTCallback may set it: the run ends after the current round
        self.formatting_func = formatting_func
        self.optimizer_cls_and_kwargs = optimizer_cls_and_kwargs
        self.merged: Mapping[str, LowRankDelta] | None = None
        self._resume = ResumePoint()
        self._restored: dict[str, dict[str, LowRankDelta] | None] = {}  # finished branches of a resumed round
        self._branch_records: dict[str, dict[str, Any]] = {}  # this round's branch records, for the merge weights
        self._branch_scores: dict[str, float] = {}  # the merged branches' eval accuracies, beside the merged student's
        # branch_state="persistent" (branches.py): this process's branches' factors and optimizer state, and every
        # branch's product P_k after its last round (what the next round's update is measured from)
        self._branch_states: dict[str, BranchState] = {}
        self._branch_products: dict[str, dict[str, LowRankDelta]] = {}
        # fresh branches add new directions every round: append them to D_t instead of re-factoring it (merging.py)
        self._appends = self.args.branch_state == "fresh" and self.args.merge_max_rank is None

    # ------------------------------------------------------------------ the algorithm
    def train(self, resume_from_checkpoint: bool | str | None = None) -> list[dict[str, Any]]:
        """Run every round; return the per-round records that also go to ``metrics.jsonl``.

        ``resume_from_checkpoint=True`` (or the run's folder) continues the run in ``output_dir`` after its last
        completed branch; unset, it defaults to ``args.resume_from_checkpoint``.
        """
        args = self.args
        rounds = self._start_run(resume_from_checkpoint)  # the records of rounds completed before a resume
        self.fire("on_train_begin", self)
        if self.eval_dataset is not None and not rounds:  # round 0: the starting student, every round's baseline
            self.metrics.write({"type": "round", "round": 0, **self.dist.on_main(lambda: self._evaluate_round(0))})
        my_branches = self.dist.my_branches(len(self.teacher_names))
        # The bar over rounds x branches (this process's) stays on the top line, above each branch's step bar.
        done_now = sum(self.teacher_names[k] in self._restored for k in my_branches)  # of the round resumed
        progress = tqdm(
            total=args.num_rounds * len(my_branches),
            initial=min(self._resume.rounds_done, args.num_rounds) * len(my_branches) + done_now,
            desc="MoT branches",
            disable=args.disable_tqdm or not self.dist.is_main,
            position=0,
            leave=True,
        )
        with collection.collect_new_objects_only():  # each branch's gc.collect() walks only new objects
            for round_idx in range(self._resume.rounds_done + 1, args.num_rounds + 1):
                self.fire("on_round_begin", self, round_idx=round_idx)
                branch_deltas, self._restored = self._restored, {}  # teacher -> delta (None: dropped) before a resume
                mine = {}
                for k in my_branches:
                    if self.teacher_names[k] in branch_deltas:  # finished before the resume
                        continue
                    progress.set_postfix(round=round_idx, teacher=self.teacher_names[k])
                    mine[k] = self._train_branch(round_idx, k, self.teacher_names[k])  # None: diverged and dropped
                    progress.update()
                branch_deltas.update(self._gather_branches(round_idx, mine))
                adapters.remove_adapter(self.model, adapters.BRANCH_ADAPTER)  # reused by the round's branches
                teachers, deltas, weights = self._merge_inputs(round_idx, branch_deltas)
                kept = kept_norm(deltas, weights)  # 1: the branch updates point one way
                start = time.perf_counter()
                scaled = [args.merge_step_size * w for w in weights]  # step size 1.0: the paper's weighted average
                with devices.merge_threads() as cores, reading(self.merged):  # also under torchrun; D_t kept open
                    self.merged, reports = merge_round(
                        self.merged, deltas, scaled, args.merge_max_rank, args.merge_tolerance, self._appends, cores
                    )
                self._save_round(round_idx, reports, teachers, weights)
                self.merged = self._kept_merged(round_idx, self.merged)  # in memory, or read from that checkpoint
                self.model = self.frozen_delta.install(self.model, self.merged)  # student = base + D_t
                del branch_deltas, mine, deltas  # in their checkpoints: not held through the next round's branches
                collection.release_freed_memory()  # once a round, not after every branch (collection.py)
                record = {"type": "round", "round": round_idx, "merge_seconds": time.perf_counter() - start,
                          **summarize(reports), "merge_kept_norm": kept, "merge_weights": dict(zip(teachers, weights))}
                self.fire("after_merge", self, round_idx=round_idx, metrics=record)
                record.update(self.dist.on_main(lambda: self._evaluate_round(round_idx)))
                self.metrics.write(record)
                rounds.append(record)
                self.fire("on_round_end", self, round_idx=round_idx, metrics=record)
                if self.should_stop:
                    break
        progress.close()
        self.dist.barrier()  # the run folder is complete when train() returns on any process
        self.fire("on_train_end", self, rounds=rounds)
        return rounds

    # ------------------------------------------------------------------ one branch
    def _train_branch(self, round_idx: int, k: int, teacher: str) -> BranchResult:
        """Train a fresh LoRA branch on one teacher from the current student; return its adapter and metrics."""
        name = adapters.BRANCH_ADAPTER  # re-initialised for each branch (add_branch_adapter)
        quantization.keep_4bit_layout(self.model)  # also after a user's own generate() on trainer.model
        init_seed = self._branch_seed(round_idx, 0 if self.args.shared_branch_init else k)
        start = self._branch_states.get(teacher) if self.args.branch_state == "persistent" else None
        if self.args.branch_state == "persistent" and self.merged is not None:  # train above D_t - P_k: at the student
            offset = branches.rebased_offset(self.merged, self._branch_products.get(teacher) if start else None)
            adapters.remove_adapter(self.model, name)  # a weights-home install needs the model without adapters
            self.model = self.frozen_delta.install(self.model, offset)
        self.model = adapters.add_branch_adapter(self.model, name, self.peft_config, seed=init_seed)
        if start is not None:
            branches.load_factors(self.model, name, start)
        folder = self.run.branch_dir(round_idx, teacher)
        self.fire("on_branch_begin", self, round_idx=round_idx, teacher=teacher)
        trainer = self._sft_trainer(
            train_dataset=self.datasets[teacher],
            prepared=teacher in self._prepared,
            output_dir=str(folder),
            seed=self._branch_seed(round_idx, k),
            run_name=f"round{round_idx}/{teacher}",
        )
        trainer.add_callback(DivergenceGuard(teacher, round_idx))
        trainer.add_callback(CarryOptimizerState(start.optimizer if start else None))
        self.datasets[teacher] = trainer.train_dataset  # tokenized once, reused every later round
        self._prepared.add(teacher)
        steps_before = ((round_idx - 1) * len(self.teacher_names) + k) * self.args.max_steps  # resume-proof
        route_branch_logs(trainer, self.logging_dir / f"round-{round_idx:03d}" / teacher, steps_before)
        start = time.perf_counter()
        try:
            output = trainer.train()
        except BranchDivergedError as error:
            adapters.remove_adapter(self.model, name)
            return self._diverged(error)
        adapter = adapters.detach_adapter(self.model, name)  # before the eval: its trainer recasts the branch
        scores = self._evaluate_branch(round_idx)
        adapters.silence_adapter(self.model, name)  # the student again, for callbacks; the next branch re-inits it
        if self.args.branch_state == "persistent":
            self._save_branch_state(round_idx, teacher, BranchState(adapter.state, branches.optimizer_state(
                trainer.optimizer)))
        losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        record = {
            "type": "branch",
            "round": round_idx,
            "teacher": teacher,
            "steps": output.global_step,
            "train_loss": output.training_loss,
            "last_loss": losses[-1] if losses else None,
            "seconds": time.perf_counter() - start,
            **scores,
        }
        branch = BranchResult(adapter, record)
        self._checkpoint_branch(round_idx, branch)
        self.fire("on_branch_end", self, round_idx=round_idx, teacher=teacher, metrics=record)
        return branch

    def _checkpoint_branch(self, round_idx: int, branch: BranchResult) -> None:
        """Process 0 writes a branch's adapter (complete once its weights file is in place), then its metrics line."""
        if not self.dist.is_main:
            return
        teacher = branch.record["teacher"]
        what = f"the adapter of teacher {teacher!r} in round {round_idx}"
        with atomic_dir(self.run.branch_dir(round_idx, teacher), what, last=adapters.ADAPTER_WEIGHTS) as tmp:
            write_json_atomic(tmp / BRANCH_RECORD, branch.record)  # its scores: a resumed round's merge weights
            branch.adapter.save(tmp, self.base_model_id)
        self.metrics.write(branch.record)

    def _gather_branches(
        self, round_idx: int, mine: Mapping[int, BranchResult | None]
    ) -> dict[str, dict[str, LowRankDelta] | None]:
        """Every process's branches of this round as deltas (None: dropped); process 0 checkpoints the others'."""
        gathered = self.dist.gather_branches(mine)
        for k, branch in gathered.items():
            if k not in mine and branch is not None:
                self._checkpoint_branch(round_idx, branch)
        self._branch_records.update({b.record["teacher"]: b.record for b in gathered.values() if b is not None})
        return {self.teacher_names[k]: None if b is None else b.adapter.deltas() for k, b in gathered.items()}

    def _branch_seed(self, round_idx: int, k: int) -> int:
        """Deterministic and distinct per branch, so each round sees a new data order and (unless
        ``shared_branch_init``) a new LoRA init."""
        return self.args.seed + 1000 * round_idx + k

    def _sft_trainer(
        self, train_dataset: Dataset, eval_dataset: Dataset | None = None, prepared: bool = False, **overrides
    ) -> SFTTrainer:
        """An SFTTrainer on the shared model with the user's SFT settings; MoT writes its own checkpoints.

        ``prepared``: the data sets are ones an earlier SFTTrainer of this run prepared with these settings. TRL would
        map them through truncation and its fully-masked filter again, which leaves such rows as they are but costs a
        pass over every row per branch; unless packing or shuffle_dataset (which would re-pack or re-shuffle), it
        is skipped.
        """
        fields = {f.name: getattr(self.args, f.name) for f in dataclasses.fields(SFTConfig) if f.init}
        fields.update(save_strategy="no", push_to_hub=False, eval_strategy="no", load_best_model_at_end=False)
        fields.update(model_init_kwargs=None)  # the model is loaded already: TRL would warn that it ignores them
        if prepared and not (self.args.packing or self.args.eval_packing or self.args.shuffle_dataset):
            fields.update(dataset_kwargs={**(self.args.dataset_kwargs or {}), "skip_prepare_dataset": True})
        fields.update(overrides)
        with distributed.device_setup_on_pinned_gpu():
            config = distributed.pin_device(SFTConfig(**fields))
        # data SFT has tokenized before (every branch after a teacher's first) only gets re-truncated: no bars for it
        first_use = any(d is not None and "input_ids" not in d.column_names for d in (train_dataset, eval_dataset))
        with library_noise.datasets_progress_bars(first_use):
            trainer = SFTTrainer(
                model=self.model,
                args=config,
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
    def evaluate(self, round_idx: int = 0, accuracy: bool = True) -> dict[str, float]:
        """The current student on ``eval_dataset`` (empty without one): eval loss on the rows SFT can score and,
        with ``accuracy`` and ``args.eval_accuracy_samples``, pass@1 over ``args.eval_num_samples`` samples per
        problem (seeded from ``args.seed + round_idx``) with the number of problems skipped; the per-sample
        records stay in ``last_eval_records``."""
        if self.eval_dataset is None:
            return {}
        metrics = {}
        with self._peft_student():
            loss = self._eval_loss()
            if loss is not None:
                metrics["eval_loss"] = loss
            if accuracy and self.args.eval_accuracy_samples:
                args = self.args
                prompts, answers = evaluation.prompts_and_answers(
                    self.eval_dataset, args.eval_accuracy_samples, args.answer_pattern
                )
                result = evaluation.generation_accuracy(
                    self.model, self.processing_class, prompts, answers,
                    batch_size=args.per_device_eval_batch_size, max_new_tokens=args.eval_max_new_tokens,
                    pattern=args.answer_pattern, answer_match=args.answer_match, num_samples=args.eval_num_samples,
                    temperature=args.eval_temperature, top_p=args.eval_top_p, seed=args.seed + round_idx,
                    disable_tqdm=args.disable_tqdm,
                )  # fmt: skip
                self.last_eval_records = result.records
                metrics.update(eval_accuracy=result.accuracy, eval_skipped=result.skipped)
        return metrics

    def _evaluate_branch(self, round_idx: int) -> dict[str, float]:
        """The branch just trained (its adapter still active above the student) on ``eval_dataset``, as far as
        ``args.eval_branches`` asks; the latest records stay the merged student's."""
        if self.args.eval_branches == "none":
            return {}
        records = self.last_eval_records
        metrics = self.evaluate(round_idx, accuracy=self.args.eval_branches == "all")
        self.last_eval_records = records
        return metrics

    def _evaluate_round(self, round_idx: int) -> dict[str, float]:
        """The merged student after ``round_idx`` (0: the starting student); its generations go to the round's
        ``eval.jsonl``."""
        self.last_eval_records = []
        metrics = self.evaluate(round_idx)
        if self.last_eval_records:
            evaluation.write_generations(self.run.round_dir(round_idx) / "eval.jsonl", self.last_eval_records)
        scored = sum(record["correct"] is not None for record in self.last_eval_records)
        warning = weighting.averaging_warning(round_idx, metrics.get("eval_accuracy"), self._branch_scores, scored)
        if warning:  # the merged student clearly below its best branch: the teachers do not average
            logger.warning("%s", warning)
            metrics["averaging_warning"] = warning
        if metrics:
            self.fire("on_evaluate", self, round_idx=round_idx, metrics=metrics)
        return metrics

    @contextlib.contextmanager
    def _peft_student(self):
        """Before round 1 the student is a plain model: a fresh branch adapter (B = 0) leaves its outputs unchanged
        and lets SFTTrainer evaluate a quantized base, which it refuses without an adapter."""
        if isinstance(self.model, PeftModel):
            yield
            return
        self.model = adapters.add_branch_adapter(self.model, "mot_eval", self.peft_config, seed=self.args.seed)
        try:
            yield
        finally:
            adapters.remove_adapter(self.model, "mot_eval")
            self.model = frozen.unwrap(self.model)  # the plain model again, as it was

    def _eval_loss(self) -> float | None:
        """The eval loss on the rows SFT can score (:func:`~merge_of_thought.evaluation.loss_rows`); ``None`` when
        there are none, such as a prompt + answer set, which is logged once."""
        if self._eval_loss_skipped:
            return None
        rows = self._eval_tokenized  # tokenized once; the raw rows stay for generation
        if rows is None:
            rows = evaluation.loss_rows(self.eval_dataset, self.args.dataset_text_field, self.formatting_func)
        if rows is None:
            logger.info("eval_dataset has no completion SFT can score (columns %s): no eval loss, accuracy only.",
                        self.eval_dataset.column_names)  # fmt: skip
            self._eval_loss_skipped = True
            return None
        trainer = self._sft_trainer(
            train_dataset=self.datasets[self.teacher_names[0]],
            eval_dataset=rows,
            prepared=self._eval_tokenized is not None and self.teacher_names[0] in self._prepared,
            output_dir=str(self.run.root),  # evaluate() writes nothing there; an eval/ folder would stay empty
            report_to=[],
            per_device_eval_batch_size=devices.eval_loss_batch_size(self.args),  # logits of at most a train batch
        )
        self._eval_tokenized = trainer.eval_dataset
        return trainer.evaluate()["eval_loss"]

    # ------------------------------------------------------------------ TRL-style script API
    @property
    def accelerator(self) -> distributed.MoTProcessGroup:
        """The MoT processes, for scripts written against TRL: ``trainer.accelerator.print(...)`` prints once,
        ``is_main_process`` and ``wait_for_everyone()`` work as on an Accelerator. Each branch has its own."""
        return self.dist

    def save_model(self, output_dir: str | None = None) -> None:
        """Write the student: the merged delta of all rounds as a PEFT LoRA adapter for the base model, plus the
        tokenizer, so ``PeftModel.from_pretrained(base, output_dir)`` loads it."""
        if self.merged is None:
            raise RuntimeError("save_model() needs a trained student: call train() first.")
        if not self.dist.is_main:
            return
        folder = Path(output_dir or self.args.output_dir)
        adapters.save_merged(self.merged, folder, self.base_model_id)
        self.processing_class.save_pretrained(folder)
        umask_mode(folder)

    def end(self) -> None:
        """Release the distributed process group at the very end of a script (as ``Trainer.end``)."""
        PartialState().destroy_process_group()

    def _save_round(self, round_idx: int, reports, teachers: list[str], weights: list[float]) -> None:
        """The merge checkpoint: ``merged/`` then ``round.json``, which marks the round complete."""
        if not self.dist.is_main:
            return
        with atomic_dir(self.run.merged_dir(round_idx), f"the merged adapter of round {round_idx}") as tmp:
            adapters.save_merged(self.merged, tmp, self.base_model_id)
        dropped = [t for t in self.teacher_names if t not in teachers]
        self.run.write_round(round_idx, teachers, weights, reports, self.merged, dropped)
        if not self.args.save_branch_adapters:  # they were checkpoints only; the logs beside them stay
            # a persistent branch starts its next round from its latest adapter: delete the round before's
            done = round_idx - 1 if self.args.branch_state == "persistent" else round_idx
            for teacher in teachers if done >= 1 else ():
                for file in (adapters.ADAPTER_WEIGHTS, adapters.ADAPTER_CONFIG):
                    (self.run.branch_dir(done, teacher) / file).unlink(missing_ok=True)

    def _kept_merged(
        self, round_idx: int, merged: Mapping[str, LowRankDelta] | None = None
    ) -> Mapping[str, LowRankDelta]:
        """The merged delta after ``round_idx`` as the run keeps it until the next merge (``merged``: just made).

        Unless the frozen adapter's fp32 factors are these very tensors, nothing needs them between merges (the
        student's fp32 weights hold the delta, or a bf16 adapter a copy), so process 0 reads them back from the
        round's checkpoint, a layer at a time, when the next merge, an install or an export asks: their rank grows
        by K*r a round (130 MB in fp32 at round 5 of K=4, r=16 on a 70M student), as much as a step's whole excess
        over plain SFT. Other processes keep theirs in memory (the run folder need not be shared).
        """
        if not self.frozen_delta.holds_the_fp32_factors and self.dist.is_main:
            return self.run.merged_view(round_idx)
        return merged if merged is not None else self.run.read_merged(round_idx)

    # ------------------------------------------------------------------ checkpoints, resume and divergence
    def _run_info(self) -> dict[str, Any]:
        """``mot_run.json``: what the run is; the fields in ``checkpointing.IDENTITY_FIELDS`` must match on resume."""
        lora = self._lora_settings
        shape = (
            "r", "lora_alpha", "target_modules", "use_rslora", "rank_pattern", "alpha_pattern", "layers_to_transform",
            "exclude_modules",
        )  # fmt: skip
        return {
            "kind": (self.args.baseline or {}).get("kind", "mot"),  # "mot", or the baseline it is (baselines.py)
            "baseline": self.args.baseline,
            "sft_steps": self.args.num_rounds * len(self.teacher_names) * self.args.max_steps,
            "base_model": self.base_model_id,
            "teachers": self.teacher_names,
            "teacher_rows": self._teacher_rows,
            "teacher_weights": self.teacher_weights,
            "teacher_datasets": self.teacher_datasets,
            "teacher_sources": self.teacher_sources,
            "evaluation": {"eval_rows": self._eval_rows, **{key: getattr(self.args, key) for key in (
                "eval_accuracy_samples", "eval_max_new_tokens", "eval_branches", "answer_pattern", "answer_match")}},
            "num_rounds": self.args.num_rounds,
            "steps_per_branch": self.args.max_steps,
            "lora": {key: lora.get(key) for key in shape},
            "lora_config": lora,
            "quantization": self._quantization,
            "merge_max_rank": self.args.merge_max_rank,
            "merge_step_size": self.args.merge_step_size,
            "shared_branch_init": self.args.shared_branch_init,
            "branch_state": self.args.branch_state,
            "teacher_weighting": self.args.teacher_weighting,
            "frozen_delta": self.frozen_delta.home if self.frozen_delta else self.args.frozen_delta,
            "seed": self.args.seed,
        }

    def _check_start(self, resume: bool | str | os.PathLike | None) -> bool:
        """Check the output folder for a resume or a new run, writing nothing; return whether a run is restored.

        Runs in ``__init__`` too, before the model is loaded, when ``args.resume_from_checkpoint`` asks to resume.
        """
        resume = resume_target(resume)
        if isinstance(resume, str):  # a folder: the run to continue, and where it goes on
            if not RunFolder(resume).has_run():
                raise ValueError(f"resume_from_checkpoint={resume!r}: no MoT run found in that folder.")
            if self.run.root != Path(resume):
                self.run = RunFolder(resume)
                self.metrics = MetricsLog(self.run.metrics_path, enabled=self.dist.is_main)
                # __init__ checked output_dir; this run goes on in another folder
                self.run.check_writable(shared=self.dist.world_size > 1)
        restore = bool(resume) and self.run.has_run()
        if restore:
            self.run.check_identity(self._run_info())
        elif resume:
            logger.info("No MoT run in %s to resume yet: starting a new one.", self.run.root)
        elif not self.args.overwrite_output_dir:
            self.run.check_new_run()
        return restore

    def _start_run(self, resume: bool | str | os.PathLike | None) -> list[dict[str, Any]]:
        """Check the output folder, then start a new run in it or restore the one it holds; return past rounds."""
        restore = self._check_start(self.args.resume_from_checkpoint if resume is None else resume)
        info, main_process = self._run_info(), self.dist.is_main
        self._resume = ResumePoint()
        self.dist.barrier()  # every process has read the folder before process 0 changes it
        if restore:
            self._restore(self.run.resume_point(self.teacher_names))
            if self._resume.rounds_done >= self.args.num_rounds:  # a finished run, read: left as it is
                self.dist.barrier()
                return [r for r in self.metrics.read() if r["type"] == "round" and r["round"] <= self.args.num_rounds]
        elif main_process:
            if self.run.has_run():
                why = "overwrite_output_dir=True" if self.args.overwrite_output_dir else "it completed no branch"
                logger.info("A new MoT run replaces the one in %s (%s).", self.run.root, why)
            self.run.clear()
        logger.info("%s", self._plan())
        if main_process:
            rank = max([self.peft_config.r, *(self.peft_config.rank_pattern or {}).values()])
            rounds_left = range(self._resume.rounds_done + 1, self.args.num_rounds + 1)
            sizes = checkpoint_bytes(
                self._layer_dims, rank, len(self.teacher_names), rounds_left, self.args.merge_max_rank
            )
            if sizes:
                self.run.check_free_space(sizes[0], sum(sizes))
            self.run.write_run(info)
        self.dist.barrier()  # the folder is ready (cleared or restored) on every process
        return [r for r in self.metrics.read() if r["type"] == "round" and r["round"] <= self._resume.rounds_done]

    def _restore(self, point: ResumePoint) -> None:
        """Rebuild the student after the completed rounds, and the finished branches of the next round, from disk."""
        if self.dist.is_main:
            self.run.remove_partial()
        if isinstance(self.model, PeftModel):  # this trainer failed before: drop the branch it left attached
            for name in [n for n in self.model.peft_config if n != adapters.MERGED_ADAPTER]:
                adapters.remove_adapter(self.model, name)
        self.merged = self._kept_merged(point.rounds_done) if point.rounds_done else None
        if self.merged is not None:
            self.model = self.frozen_delta.install(self.model, self.merged)
        next_round = point.rounds_done + 1
        self._restored = {t: self.run.read_branch(next_round, t) for t in point.branches_done}
        self._branch_records = {t: self.run.read_branch_record(next_round, t) for t in point.branches_done}
        self._restored.update({t: None for t in point.branches_dropped})
        if self.args.branch_state == "persistent":
            self._restore_branch_states(point.rounds_done, point.branches_done)
        self._resume = point
        logger.info("%s", self._resume_summary(point))
        if point.rounds_done < self.args.num_rounds:  # a resume that trains; reading a finished run writes nothing
            self.metrics.write({"type": "resume", **dataclasses.asdict(point)})

    def _plan(self) -> str:
        """The run's compute in one line, printed at every start and resume: rounds x teachers x steps, per step."""
        args, n = self.args, len(self.teacher_names)
        per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps
        left = (args.num_rounds - self._resume.rounds_done) * n * args.max_steps
        left -= len(self._restored) * args.max_steps  # finished branches of a resumed round
        return (
            f"plan: {args.num_rounds} rounds x {n} teachers x {args.max_steps} steps = "
            f"{args.num_rounds * n * args.max_steps} SFT steps ({left} to train); {per_step} sequences per step "
            f"(per_device_train_batch_size {args.per_device_train_batch_size} x gradient_accumulation_steps "
            f"{args.gradient_accumulation_steps}) of up to {args.max_length} tokens"
            + (" packed" if args.packing else "")
        )

    def _resume_summary(self, point: ResumePoint) -> str:
        """What a resume reused from disk and what is left to train, in words."""
        total, n = self.args.num_rounds, len(self.teacher_names)
        reused = [*point.branches_done, *(f"{t} (dropped)" for t in point.branches_dropped)]
        left = max(total - point.rounds_done, 0) * n - len(reused)
        text = f"Resuming the MoT run in {self.run.root}: reusing {point.rounds_done} of {total} rounds"
        if point.rounds_done < total:
            text += f" and {len(reused)} of {n} branches of round {point.rounds_done + 1}"
            text += f" ({', '.join(reused)})" if reused else ""
        return f"{text} from disk; {plural(max(left, 0), 'branch')} left to train."

    def _diverged(self, error: BranchDivergedError) -> None:
        """A branch's loss became NaN/inf: stop the run, or (on_branch_divergence='drop') record it left out."""
        if self.args.on_branch_divergence != "drop":
            raise error
        logger.warning("%s Dropping it from round %d's merge (on_branch_divergence='drop').", error, error.round)
        record = {"type": "dropped_branch", "round": error.round, "teacher": error.teacher, "step": error.step}
        record["reason"] = str(error)
        if self.dist.is_main:
            write_json_atomic(self.run.dropped_path(error.round, error.teacher), record)
        self.metrics.write(record)
        return None

    def _merge_inputs(
        self, round_idx: int, branch_deltas: Mapping[str, dict[str, LowRankDelta] | None]
    ) -> tuple[list[str], list[dict[str, LowRankDelta]], list[float]]:
        """The branches to merge in teacher order with their weights, renormalised if a diverged one was dropped."""
        kept = [
            (t, branch_deltas[t], w)
            for t, w in zip(self.teacher_names, self.teacher_weights)
            if branch_deltas[t] is not None
        ]
        if not kept or sum(w for _, _, w in kept) <= 0:
            raise RuntimeError(
                f"Every branch of round {round_idx} with a non-zero weight diverged and was dropped; nothing is left "
                "to merge. Lower the learning rate and resume with trainer.train(resume_from_checkpoint=True)."
            )
        teachers = [t for t, _, _ in kept]
        weights = weighting.round_weights(
            self.args.teacher_weighting, teachers, [w for _, _, w in kept], self._branch_records
        )  # renormalised over the kept branches when one was dropped
        self._branch_scores = {t: r["eval_accuracy"] for t, r in self._branch_records.items() if "eval_accuracy" in r}
        self._branch_records = {}
        deltas = [d for _, d, _ in kept]
        if self.args.branch_state == "persistent":  # a branch's products P_k^t; its update is P_k^t - P_k^{t-1}
            deltas = [branches.round_update(d, self._branch_products.get(t)) for t, d, _ in kept]
            self._branch_products.update({t: d for t, d, _ in kept})
        return teachers, deltas, weights

    def _save_branch_state(self, round_idx: int, teacher: str, state: BranchState) -> None:
        """Keep a persistent branch's factors and optimizer state for its next round; its optimizer state goes to
        ``round-t/optimizer-<teacher>/`` first, so a branch whose adapter is on disk has it too."""
        with atomic_dir(self.run.optimizer_dir(round_idx, teacher), f"the optimizer state of {teacher!r}") as tmp:
            torch.save(state.optimizer, tmp / branches.OPTIMIZER_FILE)
        self._branch_states[teacher] = state

    def _restore_branch_states(self, rounds_done: int, finished: list[str]) -> None:
        """Persistent branches after a resume: every branch's last product, and this process's factors and
        optimizer state, from the latest round folder that holds the branch."""
        mine = {self.teacher_names[k] for k in self.dist.my_branches(len(self.teacher_names))}
        for teacher in self.teacher_names:
            done = [r for r in range(1, rounds_done + 1) if self.run.branch_dir(r, teacher).joinpath(
                adapters.ADAPTER_WEIGHTS).exists()]  # fmt: skip
            if done:
                self._branch_products[teacher] = self.run.read_branch(done[-1], teacher)
            latest = rounds_done + 1 if teacher in finished else (done[-1] if done else None)
            if teacher in mine and latest is not None:
                self._branch_states[teacher] = BranchState.read(
                    self.run.branch_dir(latest, teacher), self.run.optimizer_dir(latest, teacher)
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
