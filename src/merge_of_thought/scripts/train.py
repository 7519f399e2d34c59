"""``mot train``: Merge-of-Thought from a TRL-style YAML config.

The YAML takes the keys of TRL's ``ScriptArguments``, ``ModelConfig`` (model_name_or_path, load_in_4bit, lora_r,
lora_alpha, lora_target_modules, ...) and of :class:`~merge_of_thought.MoTConfig` (every SFTConfig key plus
num_rounds, teacher_weights, ...), and a ``teachers:`` list shaped like TRL's ``datasets:`` entries with a teacher
name and an optional weight. Each teacher is its own branch: the data sets are never concatenated, which is why
TRL's ``datasets:`` and ``dataset_name`` are refused with a pointer to ``teachers:``. Flags override the YAML::

    mot train --config examples/configs/demo_tiny.yaml --learning_rate 1e-3

After a crash, Ctrl-C or SIGTERM, ``mot train --config ... --resume`` continues the run in ``output_dir`` after
its last completed branch (``--resume_from_checkpoint true`` does the same). Checks that need no model (the
config's keys, the teachers' data, the output folder, the chat template) run before the model is loaded.
"""

from __future__ import annotations

import argparse
import difflib
import shlex
import textwrap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from trl import ModelConfig, ScriptArguments, SFTConfig, TrlParser, get_peft_config, get_quantization_config
from trl.scripts.utils import DatasetConfig

from ..checkpointing import RunFolder, resume_target
from ..sources import EvalSetConfig, TeacherConfig, load_eval_set, load_teachers, teacher_name
from ..hub import is_local_path
from ..mot_config import MoTConfig, has_accelerator, steps_not_epochs
from ..reporting import rounds_table
from .console import VERBOSE_FLAG, run_command


@dataclass
class MoTScriptArguments(ScriptArguments):
    """TRL's script arguments, with the teachers (one branch each) and an optional held-out set for per-round
    evaluation in place of the one training data set."""

    teachers: list[Any] = field(
        default_factory=list, metadata={"help": "Teacher data sets (YAML list of path/name/data_files/split/...)."}
    )
    eval_dataset: dict | None = field(
        default=None,
        metadata={"help": "Held-out problems for per-round evaluation: a data set spec (path, split, ...) with "
                  "prompt_column and answer_column when its columns are not 'prompt' and 'answer'."},
    )
    datasets: list[Any] | None = field(
        default=None, metadata={"help": "Not used by MoT (TRL's data mixture): list the data sets under teachers:."}
    )
    baseline: str | None = field(
        default=None,
        metadata={"help": "Train an equal-compute baseline instead of MoT: 'mtd' (the union of the teachers) or "
                  "'std' (one teacher, --baseline_teacher). Same student, LoRA and schedule.",
                  "choices": ["mtd", "std"]},
    )
    baseline_teacher: str | None = field(default=None, metadata={"help": "With --baseline std: the teacher."})
    baseline_steps: str | None = field(
        default=None,
        metadata={"help": "'mot': MoT's total steps (num_rounds x teachers x max_steps; MTD's default), 'path': one "
                  "branch path (num_rounds x max_steps; STD's default), 'parallel' (MTD): one branch path of steps "
                  "with a teachers-fold batch, the data-parallel control.", "choices": ["mot", "path", "parallel"]},
    )
    resume: bool = field(
        default=False,
        metadata={"help": "Continue the run in output_dir after its last completed branch (same configuration)."},
    )
    dry_run: bool = field(
        default=False,
        metadata={"help": "Load the data, run every check and print the trace-length report, then stop before the "
                  "model loads (to choose max_length)."},
    )

    def __post_init__(self):
        if self.datasets or self.dataset_name:
            given = "datasets:" if self.datasets else f"dataset_name: {self.dataset_name}"
            raise ValueError(
                f"mot train got {given!r}, TRL's single training set. MoT trains one branch per teacher and never "
                "concatenates their data: list each teacher's data set under 'teachers:' instead, e.g.\n"
                "teachers:\n  - teacher: r1\n    path: my-org/traces-r1\n    split: train"
            )
        self.teachers = [as_teacher_config(entry, i) for i, entry in enumerate(self.teachers)]
        for teacher in self.teachers:
            teacher.teacher = teacher_name(teacher)
        names = [t.teacher for t in self.teachers]
        if len(set(names)) != len(names):
            raise ValueError(f"teacher names must be unique, got {names}: set 'teacher:' in each entry.")


def as_eval_config(entry: Any) -> EvalSetConfig:
    """The ``eval_dataset:`` entry as an EvalSetConfig; a wrong key is named with the valid keys."""
    valid = [f.name for f in fields(EvalSetConfig) if f.init]
    unknown = [key for key in entry if key not in valid]
    if unknown:
        named = ", ".join(f"{key!r}{did_you_mean(key, valid)}" for key in unknown)
        raise ValueError(f"eval_dataset: unknown key {named}. It takes: {', '.join(valid)}.")
    return EvalSetConfig(**entry)


def did_you_mean(key: str, known: Iterable[str]) -> str:
    """`` (did you mean 'num_rounds'?)`` for a close known key, else nothing. MoT's and LoRA's own keys come first:
    ``lora_rank`` means ``lora_r``, not transformers' ``local_rank``."""
    known = list(known)
    preferred = [k for k in known if k.startswith("lora_") or k in MOT_KEYS]
    match = difflib.get_close_matches(key, preferred, n=1, cutoff=0.7) or difflib.get_close_matches(
        key, known, n=1, cutoff=0.7
    )
    return f" (did you mean {match[0]!r}?)" if match else ""


def as_teacher_config(entry: Any, index: int) -> TeacherConfig:
    """One ``teachers:`` entry as a TeacherConfig; a wrong key is named with the teacher and the valid keys."""
    if isinstance(entry, TeacherConfig):
        return entry
    valid = [f.name for f in fields(TeacherConfig) if f.init]
    if not isinstance(entry, Mapping):
        raise TypeError(f"teachers[{index}] must be a mapping with the keys {valid}, got {entry!r}.")
    label = f"teachers[{index}]" + (f" (teacher {entry['teacher']!r})" if entry.get("teacher") else "")
    unknown = [key for key in entry if key not in valid]
    if unknown:
        named = ", ".join(f"{key!r}{did_you_mean(key, valid)}" for key in unknown)
        raise ValueError(f"{label}: unknown key {named}. A teacher entry takes: {', '.join(valid)}.")
    if "path" not in entry:
        raise ValueError(
            f"{label}: 'path' is required: a Hub data set id, a local folder, or a loader such as 'json' with "
            "data_files."
        )
    if entry.get("split_by") and entry.get("weight") is not None:
        raise ValueError(
            f"{label}: 'weight' with 'split_by' would give every teacher it makes the same weight; name them in "
            "teacher_weights: {{name: weight, ...}} instead (the names are the values of the split_by column)."
        )
    return TeacherConfig(**entry)


SFT_CONFIG_DOCS = "https://huggingface.co/docs/trl/sft_trainer#trl.SFTConfig"
RUN_KEYS = ("teachers", "eval_dataset", "resume", "dry_run", "baseline", "baseline_teacher", "baseline_steps")


MOT_KEYS = frozenset(f.name for f in fields(MoTConfig) if f.name not in {f.name for f in fields(SFTConfig)})


class MoTParser(TrlParser):
    """TRL's parser, with unknown keys (in the YAML or on the command line) named before anything is built, each
    with the closest valid key, and a ``--help`` that leads with MoT's own settings (``--help_all``: every option)."""

    full_help = False

    def format_help(self) -> str:
        return super().format_help() if self.full_help else self.short_help()

    def short_help(self) -> str:
        """The run's keys and MoT's settings, grouped as in docs/configuration.md, then where SFT's are documented."""
        from ..mot_config import documented_settings, mot_settings

        actions = {action.dest: action for action in self._actions}
        summary = (__doc__ or "").strip().split("\n\n")[0].replace("\n", " ").replace("``", "`")
        lines = [f"usage: {self.prog} --config cfg.yaml [--KEY VALUE ...]", "", summary, "", "The run:",
                 _option("config FILE", "The YAML: keys of TRL's ScriptArguments, ModelConfig, SFTConfig and MoT's "
                         "(flags override it).")]  # fmt: skip
        lines += [_option(key, actions[key].help) for key in RUN_KEYS]
        lines += [_option(VERBOSE_FLAG.removeprefix("--"), "On an error, print the full traceback as well.")]
        mine, group = set(mot_settings()), None
        defaults = {f.name: f.default for f in fields(MoTConfig)}
        for heading, name, kind, _, _ in documented_settings():
            if name in mine and name in actions:
                if heading != group:
                    group = heading
                    lines += ["", f"{heading.replace('``', '`')}:"]
                lines.append(_option(f"{name} {kind.upper().replace(' ', '')}", f"{actions[name].help} "
                                     f"(default: {defaults[name]})"))  # fmt: skip
        lines += ["", textwrap.fill(
            "Every MoT setting, with when to change it: docs/configuration.md. SFT and model settings: every key of "
            "TRL's SFTConfig (learning_rate, max_length, per_device_train_batch_size, bf16, ...) and ModelConfig "
            "(model_name_or_path, load_in_4bit, lora_r, ...) keeps its meaning inside each branch; see "
            f"{SFT_CONFIG_DOCS}. `{self.prog} --help_all` lists every option.", width=120)]
        return "\n".join(lines) + "\n"

    def set_defaults_with_config(self, **kwargs) -> list[str]:
        known = {action.dest for action in self._actions}
        unknown = [key for key in kwargs if key not in known]
        if unknown:
            raise self._unknown(unknown, known, "in the config file")
        if "num_train_epochs" in kwargs:  # even TRL's default value: the user meant epochs, which MoT does not count
            raise steps_not_epochs(f"num_train_epochs: {kwargs['num_train_epochs']} in the config file")
        return super().set_defaults_with_config(**kwargs)

    def parse_args_into_dataclasses(self, args=None, return_remaining_strings=False, **kwargs):
        if not return_remaining_strings:
            _, remaining = self.parse_known_args(args=args)
            flags = [arg.split("=", 1)[0].removeprefix("--") for arg in remaining if arg.startswith("--")]
            if any(a.split("=", 1)[0] == "--num_train_epochs" for a in args or []):
                raise steps_not_epochs("--num_train_epochs")
            if remaining:
                known = {o.removeprefix("--") for a in self._actions for o in a.option_strings if o.startswith("--")}
                raise self._unknown(flags or remaining, known, "on the command line")
        return super().parse_args_into_dataclasses(args, return_remaining_strings, **kwargs)

    @staticmethod
    def _unknown(keys: list[str], known: Iterable[str], where: str) -> ValueError:
        named = ", ".join(f"{key!r}{did_you_mean(key, known)}" for key in keys)
        return ValueError(
            f"unknown key{'s' if len(keys) > 1 else ''} {where}: {named}. mot train takes the keys of TRL's "
            "ScriptArguments, ModelConfig and SFTConfig and MoT's own (`mot train --help` lists them)."
        )


def hub_dataset_id(spec: DatasetConfig) -> str | None:
    """The Hub data set id of a teacher spec (for the model card), or None for local files and folders."""
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    if spec.path in _PACKAGED_DATASETS_MODULES or is_local_path(spec.path):
        return None
    return spec.path


def _option(name: str, text: str | None) -> str:
    """One option of the short help: its flag, then its text wrapped under it."""
    body = textwrap.fill(text or "", width=116, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return f"  --{name}\n{body}"


class _FullHelp(argparse.Action):
    """``--help_all``: TRL's full help, every SFTConfig and ModelConfig option included."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.full_help = True
        parser.print_help()
        parser.exit()


def teacher_source(spec: DatasetConfig, name: str | None = None) -> str:
    """A teacher's data in words, for mot_run.json and the card: ``org/traces`` or ``json: a.jsonl, b.jsonl``, with
    the rows it takes (``where``, or the ``split_by`` value that named teacher ``name``) and its columns."""
    files = spec.data_files
    if isinstance(files, Mapping):
        files = [f for value in files.values() for f in ([value] if isinstance(value, str) else value)]
    named = ", ".join([files] if isinstance(files, str) else files or [])
    where = f" (where {spec.where})" if getattr(spec, "where", None) else ""
    if getattr(spec, "split_by", None):
        where += f" ({spec.split_by}: {name})"
    columns = [getattr(spec, key, None) for key in ("prompt_column", "reasoning_column", "completion_column")]
    if any(columns):
        where += " (columns " + " + ".join(c for c in columns if c) + ")"
    return (f"{spec.path}: {named}" if named else spec.path) + where


def make_parser(prog: str | None = "mot train") -> TrlParser:
    epilog = f"{VERBOSE_FLAG}: on an error, print the full traceback as well as the one-line message."
    parser = MoTParser((MoTScriptArguments, MoTConfig, ModelConfig), prog=prog, epilog=epilog)
    parser.add_argument("--help_all", action=_FullHelp, nargs=0, default=argparse.SUPPRESS,
                        help="Show every option (TRL's SFTConfig and ModelConfig included) and exit.")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(train, argv, on_interrupt=resume_hint)


def resume_hint(argv: list[str]) -> str:
    """What Ctrl-C or SIGTERM prints: the command that continues the run."""
    command = ["mot", "train", *argv, *([] if "--resume" in argv else ["--resume"])]
    return f"Completed branches are saved; `{shlex.join(command)}` continues from the last completed branch."


def train(argv: list[str]) -> int:
    from ..mot_trainer import DEFAULT_LORA, MoTTrainer
    from peft import LoraConfig

    if "--dry_run" in argv and not has_accelerator():  # it trains nothing: a GPU recipe's bf16 needs no GPU here
        argv = [*argv, "--bf16", "false", "--fp16", "false"]
    script_args, training_args, model_args = make_parser().parse_args_and_config(args=argv)
    if not model_args.model_name_or_path:
        raise ValueError("model_name_or_path is required (in the YAML or as --model_name_or_path).")
    if not script_args.teachers:
        raise ValueError("the config names no teachers (a 'teachers:' list of data set specs).")
    if script_args.resume and not resume_target(training_args.resume_from_checkpoint):
        training_args.resume_from_checkpoint = "true"  # MoTTrainer checks the run on disk before loading the model
    if not resume_target(training_args.resume_from_checkpoint) and not training_args.overwrite_output_dir:
        RunFolder(training_args.output_dir).check_new_run()  # before the data sets and the model are loaded
    training_args.model_init_kwargs = dict(
        revision=model_args.model_revision,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    )
    spec_of: dict[str, TeacherConfig] = {}
    teachers = load_teachers(script_args.teachers, spec_of)
    weights = {t.teacher: t.weight for t in script_args.teachers if t.weight is not None}
    if weights and training_args.teacher_weights is None:
        training_args.teacher_weights = weights
    if script_args.baseline:  # one branch, one round: MTD or STD at MoT's compute or one branch path
        from ..baselines import baseline_run

        teachers, training_args = baseline_run(script_args.baseline, teachers, training_args,
                                               script_args.baseline_teacher, script_args.baseline_steps)  # fmt: skip
    model_args.use_peft = True  # MoT branches are LoRA adapters
    if isinstance(model_args.lora_target_modules, str) and model_args.lora_target_modules != "all-linear":
        # a one-item YAML list or flag arrives as a bare string, which PEFT would read as a regex on full names
        model_args.lora_target_modules = [model_args.lora_target_modules]
    peft_config = get_peft_config(model_args) or LoraConfig(**DEFAULT_LORA)
    eval_dataset = load_eval_set(as_eval_config(script_args.eval_dataset)) if script_args.eval_dataset else None
    if script_args.dry_run:
        return dry_run(model_args.model_name_or_path, teachers, training_args, eval_dataset)
    trainer = MoTTrainer(
        model_args.model_name_or_path,
        args=training_args,
        teachers=teachers,
        peft_config=peft_config,
        quantization_config=get_quantization_config(model_args),
        eval_dataset=eval_dataset,
    )
    trainer.teacher_datasets = {name: hub_dataset_id(t) for name, t in spec_of.items() if hub_dataset_id(t)}
    trainer.teacher_sources = {name: teacher_source(t, name) for name, t in spec_of.items()}
    trainer.train()  # resumes when args.resume_from_checkpoint says so (--resume sets it)
    trainer.save_model(training_args.output_dir)
    what = f"The {script_args.baseline.upper()} baseline" if script_args.baseline else "MoT"
    trainer.accelerator.print(f"\n{rounds_table(trainer.metrics.read())}\n")
    trainer.accelerator.print(f"{what} finished: the student (a PEFT LoRA adapter) is in {training_args.output_dir}")
    trainer.end()
    return 0


def dry_run(model_name_or_path: str, teachers: dict, args: MoTConfig, eval_dataset: Any) -> int:
    """``--dry_run``: the checks a run makes before its model loads, and the length report, with no model."""
    from ..hub import load_tokenizer
    from ..mot_trainer import check_data, prepare_data

    check_data(args, teachers, eval_dataset)  # what MoTTrainer checks first, with the same functions
    tokenizer = load_tokenizer(model_name_or_path, args.trust_remote_code)
    prepared, _ = prepare_data(args, teachers, tokenizer)  # logs the length report, refuses a large cut
    rows = ", ".join(f"{name} ({len(dataset)} rows)" for name, dataset in prepared.items())
    held_out = f"; held-out problems: {len(eval_dataset)}" if eval_dataset is not None else ""
    print(f"Dry run: the data passed every check. Teachers: {rows}{held_out}. {args.num_rounds} rounds x "
          f"{len(prepared)} teachers x {args.max_steps} steps = {args.num_rounds * len(prepared) * args.max_steps} "
          "SFT steps; no model was loaded.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
