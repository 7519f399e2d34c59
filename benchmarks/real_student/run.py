"""The paper's comparison on a real pretrained student: SmolLM2-135M-Instruct in nf4, MoT against STD and MTD.

    python benchmarks/real_student/run.py                  # CPU protocol: 4 teachers x 5 rounds x 10 steps, 3 seeds
    python benchmarks/real_student/run.py --seeds 0        # one seed (each run is cached: run more seeds later)
    python benchmarks/real_student/run.py --steps 50       # the paper's 50 steps per round (a GPU)
    python benchmarks/real_student/run.py --quick          # smoke test: 1 seed, 2 rounds x 1 step (batch 2)
    python benchmarks/real_student/run.py --regime formats --exploratory mot-val-weighted   # + a method added later
    python benchmarks/real_student/run.py --regime multiply --exploratory mtd-parallel   # the second task (products)
    python benchmarks/real_student/run.py --regime formats --methods mtd-parallel --across-machines  # pair across CPUs
    python benchmarks/real_student/run.py --regime multiply --rounds 10 --methods mot   # T=10 (baselines' steps follow)

The design (task, teachers, methods, settings, reporting rule) was written down before the first run:
benchmarks/real_student/README.md. Every method is a MoTTrainer run (the baselines through
merge_of_thought.baselines, the code path of ``mot train --baseline``), one job at a time, each cached as JSON in
``--work-dir`` (by default benchmarks/results/runs/, committed) so an interrupted benchmark resumes, in a later
session too. Writes benchmarks/results/real_student{,_quick,_formats}{,_exploratory}.{json,md,png} (the last when an
exploratory method, added after the design, is in the run).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import random
import re
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from hardware import keep_freed_memory  # noqa: E402
from task import FACT_QUESTIONS, GENERAL_PROMPTS, HELD_OUT, REGIMES, held_out_dataset, split, teacher_dataset  # noqa: E402

_spec = importlib.util.spec_from_file_location("quality_run", HERE.parent / "quality" / "run.py")
quality = importlib.util.module_from_spec(_spec)
sys.modules["quality_run"] = quality
_spec.loader.exec_module(quality)

RESULTS = HERE.parent / "results"
RUNS = RESULTS / "runs" / "real_student"  # committed: the machines' home folders do not outlive a session
PROBE = ("Probe score: minus the mean token NLL of the untrained student's own answers to 20 general questions; "
         "forgetting: its rise, end minus start (0 = nothing forgotten).")
FACTS = ("Second probe (runs from 2026-12-06 on): the share of the facts the untrained student stated (task.py's "
         "FACT_QUESTIONS, greedy) that a student still states; fact forgetting: its fall, start minus end.")


@dataclasses.dataclass(frozen=True)
class Setting(quality.Setting):
    """The quality benchmark's shared settings (rounds, steps, prompts, learning rate, batch, LoRA), with this
    student's values and its generation budgets."""

    steps_per_round: int = 10
    held_out: int = 100
    learning_rate: float = 5e-4
    batch_size: int = 8
    max_new_tokens: int = 64
    general_prompts: int = 20  # of task.GENERAL_PROMPTS, for forgetting
    general_tokens: int = 48  # the untrained student's answer length to them
    facts: int = 40  # of task.FACT_QUESTIONS: the second forgetting probe
    fact_tokens: int = 40
    validation: int = 50  # held-out problems after the scored ones: the grid's choice, mot-val-weighted's weights
    regime: str = "shared"  # task.REGIMES: "shared" (the first design), "formats", or "multiply" (the second task)
    bf16: bool = False  # nf4 compute and TRL's autocast in bf16 (issue 38's CPU study; fast with AVX512-BF16 only)

    @property
    def teachers(self) -> tuple[str, ...]:
        return REGIMES[self.regime]


# Fixed in each regime's design where it differs from Setting's (README.md): the products' verbose trace is longer.
REGIME_SETTINGS: dict[str, dict] = {"multiply": {"max_new_tokens": 96}}
QUICK = Setting(rounds=2, steps_per_round=1, train_prompts=8, batch_size=2, held_out=4, max_new_tokens=12,
                general_prompts=4, general_tokens=12, validation=4, facts=4, fact_tokens=8)

# MoT as the paper runs it, MoT with persistent branches, the restart-only control (one teacher, T x S with a fresh
# branch every round), MTD (the union; read at T*S and at K*T*S steps), STD per teacher of the regime.
# same-left (four branches of the left teacher) came with the formats regime's design; it is a control of both.
CONTROLS = ("restart-only", "same-left")


def default_methods(regime: str) -> list[str]:
    """Each regime's pre-registered methods, in the order a seed runs them (README.md)."""
    stds = [f"std-{t}" for t in REGIMES[regime]]
    if regime in ("shared", "multiply"):  # the second task's design is the shared regime's
        return ["mot", "mot-persistent", "restart-only", "mtd", *stds]
    return ["mot", "mtd", *stds, "mot-persistent", "same-left"]


METHODS = tuple(dict.fromkeys(["mot", "mot-persistent", *CONTROLS, "mtd",
                               *(f"std-{t}" for teachers in REGIMES.values() for t in teachers)]))  # fmt: skip
# Not in the pre-registered design, added after it (the MoT-wins issue); run only when named (--exploratory):
# DiLoCo's Nesterov outer step (benchmarks/quality/outer.py, its published lr 0.7 and momentum 0.9, not tuned here),
# and merge weights from the branches' validation scores (README.md, "Exploratory").
EXPLORATORY = {"mot-nesterov": quality.ABLATIONS["nesterov"], "mot-persistent-nesterov": quality.ABLATIONS["nesterov"],
               "mot-val-weighted": {}, "mtd-parallel": {},
               "mot-step1.5": {"config": {"merge_step_size": 1.5}}, "mot-step2": quality.ABLATIONS["step2"]}
# mtd-parallel (issue 39): the data-parallel control, MTD for T*S steps with a K-fold batch (baselines.py,
# steps="parallel"): MoT's compute in MoT's sequential steps, what K GPUs would run in MoT's wall time.
# mot-step1.5 / mot-step2 (issue 39, item 3): the averaged update extrapolated by merge_step_size.


@dataclasses.dataclass(frozen=True)
class Job:
    method: str
    seed: int

    @property
    def name(self) -> str:
        if self.method.startswith("std-"):
            return f"STD-{self.method[4:]}"
        return {"mot": "MoT", "mot-persistent": "MoT-persistent", "restart-only": "restart-only", "mtd": "MTD",
                "same-left": "same-left",
                "mot-nesterov": "MoT-nesterov", "mot-persistent-nesterov": "MoT-persistent-nesterov",
                "mot-val-weighted": "MoT-val-weighted", "mtd-parallel": "MTD-parallel",
                "mot-step1.5": "MoT-step1.5", "mot-step2": "MoT-step2"}[self.method]

    @property
    def file(self) -> str:
        """The name of its cached run in a cache folder."""
        return f"{self.name}-seed{self.seed}.json"


def load_student(folder: str, bf16: bool = False):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from merge_of_thought.quantization import keep_4bit_layout

    compute = torch.bfloat16 if bf16 else torch.float32
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=nf4)
    keep_4bit_layout(model)
    return model, AutoTokenizer.from_pretrained(folder)


@dataclasses.dataclass(frozen=True)
class Probes:
    """What forgetting is measured on (README.md): the untrained student's own greedy answers to the general prompts
    (their NLL) and the facts (question, answer pattern) it stated."""

    general_answers: list[str]
    facts: list[tuple[str, str]]


def facts_stated(model, tokenizer, facts: list[tuple[str, str]], setting: Setting) -> list[bool]:
    """Whether the model's greedy answer to each question matches its answer pattern (word boundaries, any case)."""
    from merge_of_thought.evaluation import generate_completions

    if not facts:
        return []
    prompts = [[{"role": "user", "content": question}] for question, _ in facts]
    answers = generate_completions(model, tokenizer, prompts, batch_size=len(prompts),
                                   max_new_tokens=setting.fact_tokens, disable_tqdm=True)  # fmt: skip
    return [re.search(rf"\b(?:{pattern})\b", answer, re.IGNORECASE) is not None
            for (_, pattern), answer in zip(facts, answers)]  # fmt: skip


def response_nll(model, tokenizer, prompts, responses) -> float:
    """Mean per-token NLL of ``responses`` to chat ``prompts``: how well the model still says what it said."""
    import torch

    was_training = model.training
    model.eval()
    total = count = 0.0
    with torch.no_grad():
        for prompt, response in zip(prompts, responses):
            head = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True)  # fmt: skip
            head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
            ids = tokenizer(head + response, add_special_tokens=False, return_tensors="pt")["input_ids"]
            labels = ids.clone()
            labels[:, : len(head_ids)] = -100
            n = int((labels != -100).sum())
            total += model(input_ids=ids, labels=labels).loss.item() * n
            count += n
    model.train(was_training)
    return total / max(count, 1)


def untrained_student(folder: str, work: Path, setting: Setting) -> tuple[Probes, dict]:
    """The forgetting probes (the untrained student's greedy answers to the general prompts; the facts it states)
    and its scores, every curve's step 0: computed once from one load of the student, cached in ``work``."""
    answers_path, start_path = work / "general_answers.json", work / "untrained.json"
    facts_path = work / "known_facts.json"
    if not (answers_path.exists() and start_path.exists() and facts_path.exists()):
        from merge_of_thought.evaluation import generate_completions

        model, tokenizer = load_student(folder, setting.bf16)
        if not answers_path.exists():
            prompts = [[{"role": "user", "content": p}] for p in GENERAL_PROMPTS[: setting.general_prompts]]
            answers = generate_completions(model, tokenizer, prompts, batch_size=len(prompts),
                                           max_new_tokens=setting.general_tokens, disable_tqdm=True)  # fmt: skip
            quality.write_json_atomic(answers_path, answers)
        if not facts_path.exists():  # added after general_answers.json: older caches get it on their next run
            asked = list(FACT_QUESTIONS[: setting.facts])
            known = [fact for fact, right in zip(asked, facts_stated(model, tokenizer, asked, setting)) if right]
            kept = facts_stated(model, tokenizer, known, setting)  # the start, on the batch every score asks
            quality.write_json_atomic(facts_path, {"known": known, "asked": len(asked),
                                                   "facts_kept": sum(kept) / max(len(known), 1)})  # fmt: skip
        probes = Probes(json.loads(answers_path.read_text()), [])
        if not start_path.exists():
            held = held_out_dataset(split(regime=setting.regime)[1][: setting.held_out])
            quality.write_json_atomic(start_path, score(model, tokenizer, held, probes, setting))
    facts = json.loads(facts_path.read_text())
    probes = Probes(json.loads(answers_path.read_text()), [tuple(fact) for fact in facts["known"]])
    return probes, {**json.loads(start_path.read_text()), "facts_kept": facts["facts_kept"]}


def setting_folders(here: Path) -> list[Path]:
    """The cache folders of ``here``'s setting: this machine's first, then the other machines' (by tag)."""
    setting = here.name.rsplit("-", 1)[0]  # a folder is "<setting>-<machine tag>"; tags have no "-"
    others = sorted(p for p in here.parent.glob(f"{setting}-*") if p != here and p.is_dir()
                    and re.fullmatch(rf"{re.escape(setting)}-[0-9a-f]{{8}}", p.name))  # fmt: skip
    return [here, *others]


def seed_folder(seed: int, methods: list[str], here: Path, training: bool) -> Path:
    """The cache folder all of a seed's runs come from. A seed's methods pair only when they ran on one machine, so
    the seed is the unit: this machine's folder (``here``), unless another machine's folder of the same setting holds
    every method of the seed, or, when only reporting, more of them. Seeds may come from different machines."""
    folders = setting_folders(here)

    def held(folder: Path) -> int:
        return sum((folder / Job(m, seed).file).exists() for m in methods)

    complete = [f for f in folders if held(f) == len(methods)]
    if complete or training:
        return complete[0] if complete else here
    return max(folders, key=held)  # the first of the fullest: this machine's on a tie


def run_file(job: Job, folder: Path, here: Path, across_machines: bool) -> Path:
    """Where ``job``'s run is cached: in its seed's ``folder``. With ``across_machines``, a run that folder lacks is
    read from any machine's folder of the setting that holds it, and trained here only where none does: a method
    added after a seed's runs were made pairs with them across CPUs (the report names every crossing run's machine;
    what crossing moves is measured, not assumed: benchmarks/real_student/README.md)."""
    if not across_machines or (folder / job.file).exists():
        return folder / job.file
    return next((f / job.file for f in setting_folders(here) if (f / job.file).exists()), here / job.file)


def crossed_runs(results: list[dict], base: dict[int, dict | None]) -> dict[str, dict | None]:
    """The runs made on another machine than their seed's base folder's, by "<name> seed <n>"."""
    return {f"{r['name']} seed {r['job']['seed']}": r["machine"] for r in results
            if r["machine"] != base[r["job"]["seed"]]}  # fmt: skip


def folder_machine(folder: Path) -> dict | None:
    """The machine a cache folder's runs came from (machine.json beside them; absent in folders before 2026-12-02)."""
    path = folder / "machine.json"
    return json.loads(path.read_text()) if path.exists() else None


def accuracy(model, tokenizer, problems, setting: Setting):
    """Greedy accuracy of the final answer after #### on ``problems`` (held_out_dataset rows), with its records."""
    from merge_of_thought.evaluation import generation_accuracy, prompts_and_answers

    prompts, answers = prompts_and_answers(problems, len(problems), None)
    return generation_accuracy(model, tokenizer, prompts, answers, batch_size=len(prompts),
                               max_new_tokens=setting.max_new_tokens, answer_match="numeric",
                               disable_tqdm=True)  # fmt: skip


def score(model, tokenizer, held, probes: Probes, setting: Setting, validation=None) -> dict:
    """Held-out accuracy (greedy, final answer after ####), the NLL of the student's own general answers, the
    share of the known facts it still states (when there are any) and, at a run's reported reads, the accuracy on
    the ``validation`` problems (what a learning rate is chosen by: never the held-out ones)."""
    result = accuracy(model, tokenizer, held, setting)
    references = probes.general_answers
    scores = {"accuracy": result.accuracy,
              "general_nll": response_nll(model, tokenizer, GENERAL_PROMPTS[: len(references)], references),
              "samples": [r["completion"] for r in result.records[:3]]}  # fmt: skip
    if probes.facts:
        scores["facts_kept"] = sum(facts_stated(model, tokenizer, probes.facts, setting)) / len(probes.facts)
    if validation is not None:
        scores["validation_accuracy"] = accuracy(model, tokenizer, validation, setting).accuracy
    return scores


def run_job(job: Job, setting: Setting, folder: str, probes: Probes, start_point: dict) -> dict:
    """Train one method for one seed; return its curve of scores (step 0 = the untrained student)."""
    from peft import LoraConfig
    from transformers import TrainerCallback

    from merge_of_thought import MoTCallback, MoTConfig, MoTTrainer
    from merge_of_thought.baselines import baseline_run
    from merge_of_thought.demo.run import quiet

    quiet()
    start = time.perf_counter()
    model, tokenizer = load_student(folder, setting.bf16)
    pool, held_problems = split(regime=setting.regime)
    prompts = random.Random(job.seed).sample(pool, setting.train_prompts)
    held = held_out_dataset(held_problems[: setting.held_out])
    data = {t: teacher_dataset(t, prompts, job.seed) for t in setting.teachers}
    curve = [{"steps": 0, **start_point}]
    run_dir = tempfile.TemporaryDirectory(prefix="mot-real-")
    weighted = job.method == "mot-val-weighted"  # each branch scored on the validation problems (never trained on)
    validation_problems = held_problems[setting.held_out :][: setting.validation]
    reads = held_out_dataset(validation_problems)  # scored at the reported reads: the learning-rate grid's choice
    validation = teacher_dataset("left", validation_problems, job.seed) if weighted else None
    scoring = dict(eval_accuracy_samples=setting.validation, eval_max_new_tokens=setting.max_new_tokens,
                   per_device_eval_batch_size=setting.validation, teacher_weighting="eval_accuracy",
                   answer_match="numeric") if weighted else {}  # fmt: skip
    args = MoTConfig(
        output_dir=run_dir.name, num_rounds=setting.rounds, max_steps=setting.steps_per_round,
        learning_rate=setting.learning_rate, lr_scheduler_type="constant",
        per_device_train_batch_size=setting.batch_size,
        gradient_checkpointing=False, report_to=[], disable_tqdm=True, logging_steps=10**6, seed=job.seed,
        dataloader_pin_memory=False, overwrite_output_dir=True, assistant_only_loss=False, bf16=setting.bf16,
        branch_state="persistent" if job.method.startswith("mot-persistent") else "fresh",
        allow_single_teacher=job.method == "restart-only", **scoring,
        **EXPLORATORY.get(job.method, {}).get("config", {}),
    )  # fmt: skip
    lora = LoraConfig(r=setting.lora_r, lora_alpha=setting.lora_alpha, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")  # fmt: skip
    if job.method in CONTROLS or job.method.startswith("mot"):
        teachers = {"restart-only": {"left": data["left"]}, "same-left": {f"left-{k}": data["left"] for k in range(4)}
                    }.get(job.method, data)  # fmt: skip
        per_round = setting.steps_per_round * len(teachers)
        branch_scores: dict[str, float] = {}  # mot-val-weighted: the round's validation scores, its merge weights

        class ScoreRound(MoTCallback):
            def on_branch_end(self, trainer, round_idx, teacher, metrics):
                if weighted:
                    branch_scores[teacher] = metrics["eval_accuracy"]

            def on_round_end(self, trainer, round_idx, metrics):
                keep = {k: metrics[k] for k in ("merge_rank", "merge_kept_norm") if k in metrics}
                if weighted:
                    keep.update(branch_accuracy=dict(branch_scores), weights=metrics["merge_weights"])
                last = reads if round_idx == setting.rounds else None  # MoT is read at its last round
                curve.append({"steps": round_idx * per_round, "round": round_idx,
                              **score(trainer.model, tokenizer, held, probes, setting, last), **keep})  # fmt: skip

        callbacks = [*quality.outer_steps(EXPLORATORY.get(job.method, {})), ScoreRound()]
    else:
        kind, teacher = ("mtd", None) if job.method.startswith("mtd") else ("std", job.method[4:])
        steps = "parallel" if job.method == "mtd-parallel" else None  # T*S steps of a K-fold batch
        teachers, args = baseline_run(kind, data, args, teacher=teacher, steps=steps)
        every = setting.path_steps

        class ScoreEvery(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kwargs):
                if state.global_step % every == 0:  # read at T*S steps (MTD-50, STD) and at K*T*S (MTD-200)
                    read = reads if state.global_step in (setting.path_steps, setting.compute_steps) else None
                    curve.append({"steps": state.global_step, **score(model, tokenizer, held, probes, setting, read)})

        callbacks = [ScoreEvery()]
    MoTTrainer(model, args=args, teachers=teachers, processing_class=tokenizer, peft_config=lora,
               eval_dataset=validation, callbacks=callbacks).train()  # fmt: skip
    run_dir.cleanup()
    return {"job": dataclasses.asdict(job), "name": job.name, "curve": curve, "seconds": time.perf_counter() - start}


def summarize(results: list[dict], setting: Setting) -> dict:
    """The quality benchmark's summary (last round, mean +- std, paired differences), with forgetting measured as
    the rise of the general-answer NLL (end minus start; higher forgets more)."""
    for result in results:  # the quality summary reads "pretrain_accuracy"; here it is minus the NLL
        for point in result["curve"]:
            point["pretrain_accuracy"] = -point["general_nll"]
    validation = {}  # by row, over the seeds whose run scored it where it is read (the learning-rate grid's choice)
    for label, by_seed in row_points(results, setting).items():
        values = [end["validation_accuracy"] for _, end in by_seed.values() if "validation_accuracy" in end]
        if values:
            seeds = [seed for seed, (_, end) in by_seed.items() if "validation_accuracy" in end]
            validation[label] = {"seeds": seeds, **quality._mean_std(values)}
    return {**quality.summarize(results, setting), "facts": facts_summary(results, setting),
            "validation_accuracy": validation}


def reported_reads(result: dict, setting: Setting) -> dict[str, dict]:
    """The points of one run that the report reads, by row: the end, and MTD's run also at T*S steps (MTD-50)."""
    curve = result["curve"]
    if result["name"] == "MTD":
        return {f"MTD-{setting.path_steps}": quality._at(curve, setting.path_steps),
                f"MTD-{setting.compute_steps}": curve[-1]}  # fmt: skip
    return {result["name"]: curve[-1]}


def row_points(results: list[dict], setting: Setting) -> dict[str, dict[int, tuple[dict, dict]]]:
    """Per reported row and seed, in seed order: (the run's start, the point the row reads)."""
    rows: dict[str, dict[int, tuple[dict, dict]]] = {}
    for result in sorted(results, key=lambda r: r["job"]["seed"]):
        for label, point in reported_reads(result, setting).items():
            rows.setdefault(label, {})[result["job"]["seed"]] = (result["curve"][0], point)
    return rows


def facts_summary(results: list[dict], setting: Setting) -> dict:
    """The second probe per reported row (MTD read at T*S steps and at the end, as the accuracy is), over the seeds
    whose runs measured it (runs cached before it was added did not)."""
    rows = {}
    for label, by_seed in row_points(results, setting).items():
        kept = {seed: (start["facts_kept"], end["facts_kept"]) for seed, (start, end) in by_seed.items()
                if "facts_kept" in start and "facts_kept" in end}  # fmt: skip
        if kept:
            rows[label] = {"seeds": list(kept), "facts_kept": quality._mean_std([e for _, e in kept.values()]),
                           "fact_forgetting": quality._mean_std([s - e for s, e in kept.values()])}  # fmt: skip
    return rows


def facts_markdown(summary: dict) -> str:
    """The second probe's table, for the rows that have it ("" when none has)."""
    if not summary.get("facts"):
        return ""
    known = summary.get("known_facts")
    lines = ["", FACTS + (f" The probe: the {known} facts the untrained student stated." if known else ""), "",
             "| method | seeds | facts kept | fact forgetting |", "|---|---|---:|---:|"]  # fmt: skip
    for label, row in summary["facts"].items():
        lines.append(f"| {label} | {', '.join(map(str, row['seeds']))} | {quality._fmt(row['facts_kept'])} "
                     f"| {quality._fmt(row['fact_forgetting'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 seed, 2 rounds x 1 step (batch 2)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (--quick: 0)")
    parser.add_argument("--steps", type=int, default=None, help="steps per branch per round (default 10; paper 50)")
    parser.add_argument("--regime", choices=sorted(REGIMES), default="shared",
                        help="teachers: 'shared' (the first design), 'formats' (traces differ from the first token), "
                        "or 'multiply' (the second task: products, teachers as in 'shared')")
    parser.add_argument("--methods", nargs="+", choices=[*METHODS, *EXPLORATORY], default=None,
                        help="default: the regime's pre-registered ones; the exploratory ones run only when named")
    parser.add_argument("--exploratory", nargs="+", choices=list(EXPLORATORY), default=[],
                        help="also run these methods added after the design; reported apart, beside the others")
    parser.add_argument("--bf16", action="store_true", help="nf4 compute and TRL's autocast in bf16 instead of "
                        "fp32 (issue 38's CPU study); cached and reported apart (suffix _bf16)")
    parser.add_argument("--learning-rate", type=float, default=None,
                        help=f"every method's learning rate (default {Setting.learning_rate:g}); given, even at the "
                        "default, the runs are cached and reported apart (suffix _lr<rate>): issue 39's grid, whose "
                        "runs all carry their validation accuracy")  # fmt: skip
    parser.add_argument("--validation", type=int, default=None,
                        help=f"validation problems (default {Setting.validation}; at most {HELD_OUT - Setting.held_out}"
                        "): what the learning-rate grid chooses by; given, the runs are cached and reported apart "
                        "(suffix _val<n>)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=None,
                        help=f"rounds T (default {Setting.rounds}; --quick {QUICK.rounds}); every baseline's steps "
                        "follow it (STD and MTD-<T*S>: T*S, MTD-<K*T*S>: K*T*S); given, the runs are cached and "
                        "reported apart (suffix _rounds<T>)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=2,
                        help="CPU threads per run (default 2, one run at a time on 2 cores); another count can change "
                        "the results in the last bits, so its runs are cached and reported apart (suffix _threads<n>)")
    parser.add_argument("--across-machines", action="store_true",
                        help="a method a seed's cache folder lacks is read from another machine's folder that holds "
                        "it (trained here if none does), so a method added later pairs with seeds made elsewhere; "
                        "the report names each crossing run's machine")  # fmt: skip
    parser.add_argument("--cached-only", action="store_true",
                        help="train nothing: report the runs cached so far and list the others")  # fmt: skip
    parser.add_argument("--work-dir", default=str(RUNS), help="the run cache (default: in the repository, so a "
                        "later session on the same kind of machine resumes; commit it)")
    parser.add_argument("--results-dir", default=str(RESULTS))
    args = parser.parse_args(argv)
    import torch

    from merge_of_thought.students import smollm2_135m

    keep_freed_memory()
    setting = dataclasses.replace(QUICK if args.quick else Setting(), regime=args.regime, bf16=args.bf16,
                                  **({} if args.quick else REGIME_SETTINGS.get(args.regime, {})))
    methods = list(dict.fromkeys([*(args.methods or default_methods(args.regime)), *args.exploratory]))
    unknown = [m for m in methods if m.startswith("std-") and m[4:] not in setting.teachers]
    if unknown:
        parser.error(f"{', '.join(unknown)}: not a teacher of the {args.regime} regime {setting.teachers}")
    if args.steps:
        setting = dataclasses.replace(setting, steps_per_round=args.steps)
    if args.learning_rate is not None:
        setting = dataclasses.replace(setting, learning_rate=args.learning_rate)
    if args.validation is not None:
        if not 0 < args.validation <= HELD_OUT - setting.held_out:
            parser.error(f"--validation: 1 to {HELD_OUT - setting.held_out} (the held-out problems after the "
                         f"{setting.held_out} scored ones)")
        setting = dataclasses.replace(setting, validation=args.validation)
    if args.rounds is not None:
        if args.rounds < 1:
            parser.error("--rounds: at least 1")
        setting = dataclasses.replace(setting, rounds=args.rounds)
    if args.threads < 1:
        parser.error("--threads: at least 1")
    torch.set_num_threads(args.threads)  # the untrained student's scores and every run: all cached under this count
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    regime = ("" if args.regime == "shared" else f"-{args.regime}") + ("-bf16" if args.bf16 else "")
    regime += "" if args.learning_rate is None else f"-lr{args.learning_rate:g}"
    regime += "" if args.validation is None else f"-val{args.validation}"
    regime += "" if args.rounds is None else f"-rounds{args.rounds}"
    regime += "" if args.threads == 2 else f"-threads{args.threads}"
    tag = ("quick" if args.quick else f"s{setting.steps_per_round}") + regime
    identity = quality.machine()  # runs are cached per machine: one seed's results differ between CPUs
    work = Path(args.work_dir) / f"{tag}-{quality.machine_tag(identity)}"
    work.mkdir(parents=True, exist_ok=True)
    quality.write_json_atomic(work / "machine.json", identity)
    start = time.perf_counter()
    training = not (args.cached_only or args.across_machines)  # across machines, a seed's base is its fullest folder
    folders = {seed: seed_folder(seed, methods, work, training) for seed in seeds}
    jobs = [Job(method, seed) for seed in seeds for method in methods]
    cached = {job: run_file(job, folders[job.seed], work, args.across_machines) for job in jobs}
    not_run: list[str] = []
    if args.cached_only:  # report only: neither the student nor its untrained scores are computed
        not_run = [f"{job.name} seed {job.seed}" for job in jobs if not cached[job].exists()]
        jobs = [job for job in jobs if cached[job].exists()]
        if not jobs:
            raise SystemExit(f"No run is cached in {work} yet: run without --cached-only to train them.")
        start_point = json.loads((folders[jobs[0].seed] / "untrained.json").read_text())  # written before any run
    else:
        folder = str(smollm2_135m())
        probes, start_point = untrained_student(folder, work, setting)
    results = []
    for done, job in enumerate(jobs, 1):  # one job at a time: each uses both cores
        path = cached[job]
        if path.exists():
            result = {"machine": folder_machine(path.parent), **json.loads(path.read_text()), "cached": True}
        else:
            result = {**run_job(job, setting, folder, probes, start_point), "machine": identity}
            quality.write_json_atomic(path, result)
        results.append(result)
        final = result["curve"][-1]
        print(f"[{done}/{len(jobs)}] {job.name} seed {job.seed}: accuracy {final['accuracy']:.3f}, general NLL "
              f"{final['general_nll']:.3f} ({result['seconds']:.0f}s; {time.perf_counter() - start:.0f}s elapsed)",
              flush=True)  # fmt: skip
    summary = summarize(results, setting)
    base = {seed: folder_machine(folder) for seed, folder in folders.items()}  # work's machine.json is identity
    machines = {seed: base[seed] for seed in sorted({r["job"]["seed"] for r in results})}
    crossed = crossed_runs(results, base)
    one_machine = len({json.dumps(r["machine"], sort_keys=True) for r in results}) == 1
    run_machines: dict[str, dict[int, dict | None]] = {}  # by run name and seed: what a caller pairing runs names
    for r in results:
        run_machines.setdefault(r["name"], {})[r["job"]["seed"]] = r["machine"]
    summary.update(wall_seconds=time.perf_counter() - start, runs_from_cache=sum(bool(r.pop("cached", False))
                   for r in results), untrained=start_point, not_run=not_run,
                   machine=next(iter(machines.values())) if one_machine else None,
                   machines_per_seed=None if one_machine else machines, machines_crossed=crossed or None,
                   run_machines=run_machines)  # fmt: skip
    if (work / "known_facts.json").exists():
        summary["known_facts"] = len(json.loads((work / "known_facts.json").read_text())["known"])
    summary["command"] = ("python benchmarks/real_student/run.py " + " ".join(argv if argv is not None
                          else sys.argv[1:])).strip()  # fmt: skip
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ("" if setting.steps_per_round == 10 else f"_s{setting.steps_per_round}")
    suffix += regime.replace("-", "_") + ("_exploratory" if set(methods) & set(EXPLORATORY) else "")
    (out / f"real_student{suffix}.json").write_text(json.dumps({"summary": summary, "runs": results}, indent=1))
    title = (f"# Real-student benchmark: SmolLM2-135M-Instruct in nf4, T={setting.rounds}, "
             f"S={setting.steps_per_round}, {args.regime} regime")
    quality.write_markdown(summary, out / f"real_student{suffix}.md", summary["command"], summary["wall_seconds"],
                           title=title, design="benchmarks/real_student/README.md", probe=PROBE)  # fmt: skip
    with open(out / f"real_student{suffix}.md", "a") as report:
        report.write(facts_markdown(summary))
    quality.plot(results, summary, out / f"real_student{suffix}.png", probe_is_accuracy=False)
    print((out / f"real_student{suffix}.md").read_text())
    return summary


if __name__ == "__main__":
    main()
