"""Model cards and Hub uploads for exported MoT adapters and merged models.

The card is a :class:`huggingface_hub.ModelCard`: YAML metadata the Hub indexes (``base_model``,
``base_model_relation``, ``library_name``, ``tags``, ``datasets``) and a body with how to load the model, the
teachers, the MoT and LoRA settings, a per-round metrics table and a plot of those metrics. Uploads follow the
conventions of TRL's and PEFT's ``push_to_hub``: a repo id, ``private``, ``revision`` (a branch) and ``token``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from huggingface_hub import CommitInfo, HfApi, ModelCard, ModelCardData

from . import plots

PLOT_FILE = "mot_metrics.png"
ACCURACY_PLOT_FILE = "mot_accuracy.png"
PLOT_HINT = f"{plots.PLOT_HINT} and export again to add it"
NO_PLOT = (
    f"(The plot of the losses per round, `{PLOT_FILE}`, is missing: matplotlib was not installed where this card "
    f"was written. {PLOT_HINT}.)"
)
BRANCH_EVAL_NOTE = (
    "A branch's eval is the student of its round plus that branch's own update, before the merge. Branches that "
    "score better than the merged student are teachers whose updates the weight average does not reconcile."
)
TAGS = ["merge-of-thought", "distillation", "reasoning", "lora"]
KEEP_4BIT_NOTE = (
    "On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit layer in place on its first inference forward, and a "
    "plain PEFT reload of the 4-bit student then computes other logits (they differed by up to 1.41 from the "
    "trained student's in our check; 0.0 with the guard). Call `merge_of_thought.quantization.keep_4bit_layout(model)` "
    "on the loaded 4-bit model before its first forward there."
)
CITATION = "Merge-of-Thought distillation: Shen et al., [arXiv:2509.08814](https://arxiv.org/abs/2509.08814)."

Kind = Literal["adapter", "merged"]
_HUB_CACHE_SNAPSHOT = re.compile(r"models--(?P<org>[^/\\]+?)--(?P<name>[^/\\]+)[/\\]snapshots[/\\][0-9a-f]+/?$")


def hub_id(name_or_path: str | None) -> str | None:
    """The Hub id behind a model path: a Hub cache snapshot folder maps back to ``org/name``; anything else is kept."""
    if name_or_path is None:
        return None
    match = _HUB_CACHE_SNAPSHOT.search(str(name_or_path))
    return f"{match['org']}/{match['name']}" if match else str(name_or_path)


def is_local_path(name_or_path: str | None) -> bool:
    """True for a path on this machine (which the Hub cannot resolve), False for a Hub id."""
    if not name_or_path:
        return False
    name = str(name_or_path)
    return os.path.isabs(name) or name.startswith(".") or os.path.isdir(name)


def check_model_source(name_or_path: str) -> None:
    """Refuse, in one line naming it, a model that is neither an existing local folder nor shaped like a Hub id."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if os.path.isdir(name_or_path):
        return
    try:
        validate_repo_id(name_or_path)
        hub_shaped = not is_local_path(name_or_path) and not os.path.exists(name_or_path)
    except HFValidationError:
        hub_shaped = False
    if not hub_shaped:
        raise FileNotFoundError(
            f"model {name_or_path!r} is neither a local folder (none exists there) nor a Hub model id (org/name): "
            "check model_name_or_path."
        )


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a local folder or a Hub model; a Hub id that can be neither downloaded nor found in the cache
    is named in one line (transformers says "couldn't connect" without the id)."""
    from transformers import AutoTokenizer

    check_model_source(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except OSError as error:
        if os.path.isdir(name_or_path) or "connect" not in str(error):
            raise
        raise ConnectionError(
            f"model {name_or_path!r}: the Hugging Face Hub could not be reached to download it and it is not in the "
            "local cache; check the connection (or HF_HUB_OFFLINE), or pass a local folder as model_name_or_path."
        ) from None


def card_data(
    kind: Kind,
    base_model: str | None,
    datasets: Sequence[str] = (),
    relation: str | None = None,
    tags: Sequence[str] = TAGS,
    **extra: Any,
) -> ModelCardData:
    """Hub metadata; a local base path is left out of ``base_model`` (the Hub could not resolve it)."""
    base = hub_id(base_model)
    return ModelCardData(
        base_model=None if is_local_path(base) else base,
        base_model_relation=relation or ("adapter" if kind == "adapter" else "finetune"),
        library_name="peft" if kind == "adapter" else "transformers",
        pipeline_tag="text-generation",
        tags=list(tags) + (["peft"] if kind == "adapter" else ["transformers"]),
        datasets=sorted(set(datasets)) or None,
        **extra,
    )


def usage(kind: Kind, base_model: str | None, repo_id: str) -> str:
    """The few lines that load the export with transformers (and PEFT for an adapter) alone."""
    base = hub_id(base_model) or "<base model>"
    if kind == "adapter":
        code = (
            "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'base = AutoModelForCausalLM.from_pretrained("{base}")\n'
            f'model = PeftModel.from_pretrained(base, "{repo_id}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{base}")'
        )
    else:
        code = (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")'
        )
    return f"```python\n{code}\n```"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; floats shown with 4 significant digits, missing values as a dash."""

    def cell(value: Any) -> str:
        if value is None:
            return "–"
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _mean(values: Iterable[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def round_metrics(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per round from ``metrics.jsonl``: mean branch train loss, per-teacher losses, eval loss, merge."""
    rows = []
    for record in records:
        if record.get("type") != "round":
            continue
        branches = [b for b in records if b.get("type") == "branch" and b.get("round") == record["round"]]
        losses = {b["teacher"]: b.get("train_loss") for b in branches}
        rows.append(
            {
                "round": record["round"],
                "train_loss": _mean(losses.values()),
                "teacher_losses": losses,
                "eval_loss": record.get("eval_loss"),
                "eval_accuracy": record.get("eval_accuracy"),
                "branch_eval_loss": _mean(b.get("eval_loss") for b in branches),
                "branch_eval_accuracy": _mean(b.get("eval_accuracy") for b in branches),
                "merge_rank": record.get("merge_rank"),
                "merge_rel_error_total": record.get("merge_rel_error_total"),
                "merge_kept_norm": record.get("merge_kept_norm"),
                "merge_weights": record.get("merge_weights"),
                "averaging_warning": record.get("averaging_warning"),
            }
        )
    return rows


def plot_metrics(rows: Sequence[Mapping[str, Any]], path: Path) -> bool:
    """Losses per round (mean and per teacher branch, and eval) as a PNG; False when matplotlib is missing."""
    plt = plots.pyplot()
    if plt is None:
        return False
    rounds = [row["round"] for row in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    teachers = sorted({t for row in rows for t in row["teacher_losses"]})
    for teacher in teachers:
        ax.plot(rounds, [row["teacher_losses"].get(teacher) for row in rows], "o--", alpha=0.5, label=teacher)
    ax.plot(rounds, [row["train_loss"] for row in rows], "o-", color="black", label="mean branch train loss")
    if any(row["eval_loss"] is not None for row in rows):
        ax.plot(rounds, [row["eval_loss"] for row in rows], "s-", color="tab:red", label="eval loss (student)")
    ax.set_xlabel("MoT round")
    ax.set_ylabel("loss")
    ax.set_xticks(rounds)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def precision(quantization: Mapping[str, Any] | None) -> str:
    """The student's base weights in words: ``4-bit (bitsandbytes nf4)``, or unquantized."""
    if not quantization:
        return "not quantized"
    kind = f" {quantization['type']}" if quantization.get("type") else ""
    return f"{quantization.get('bits')}-bit ({quantization.get('method')}{kind})"


def quantization_note(kind: Kind, quantization: Mapping[str, Any] | None) -> str | None:
    """What training on a quantized base means for an export that applies the delta to the full-precision base."""
    if not quantization:
        return None
    what = "base + this adapter" if kind == "adapter" else "this merged model"
    note = (
        f"The student was trained on a {precision(quantization)} copy of the base. This export applies the MoT "
        f"delta to the full-precision base weights, so {what} differs from the student as trained by the base's "
        "own quantization error (which the student carried and the export does not bake in)."
    )
    if kind == "adapter":
        note += (
            " To run the student exactly as trained, load the base with the same quantization config before "
            f"attaching the adapter. {KEEP_4BIT_NOTE}"
        )
    return note


def teacher_data(run: Mapping[str, Any]) -> dict[str, str | None]:
    """Each teacher's data: its Hub data set id, else its files or folder as the run recorded them; an MTD baseline's
    ``union`` lists every teacher's."""
    sources = {**(run.get("teacher_sources") or {}), **(run.get("teacher_datasets") or {})}
    data = {t: sources.get(t) for t in run.get("teachers", [])}
    baseline = run.get("baseline") or {}
    if baseline.get("kind") == "mtd":
        known = [sources[t] for t in baseline["teachers"] if sources.get(t)]
        data = {t: "; ".join(known) or None for t in data}
    return data


def evaluation_settings(run: Mapping[str, Any]) -> list[str]:
    """The card's lines on how the student was evaluated (empty when the run had no eval set)."""
    settings = run.get("evaluation") or {}
    if not settings.get("eval_rows"):
        return []
    lines = [f"- held-out rows: {settings['eval_rows']} (eval loss on all of them, every round and before round 1)"]
    if settings.get("eval_accuracy_samples"):
        pattern = settings.get("answer_pattern") or "the last \\boxed{...}, else the text after ####"
        lines.append(
            f"- accuracy: greedy generation on {settings['eval_accuracy_samples']} rows, at most "
            f"{settings.get('eval_max_new_tokens')} new tokens; answer: {pattern}; compared "
            f"{settings.get('answer_match')}"
        )
    lines.append(f"- branches evaluated before each merge: {settings.get('eval_branches')}")
    return lines


def run_card(
    kind: Kind,
    folder: Path,
    run: Mapping[str, Any],
    metrics: Sequence[Mapping[str, Any]],
    rounds: int,
    export: Mapping[str, Any],
    base_model: str | None,
    repo_id: str | None = None,
) -> ModelCard:
    """The card of an exported MoT student, with its metrics plot written beside it in ``folder``."""
    teachers = list(run.get("teachers", []))
    weights = dict(zip(teachers, run.get("teacher_weights", [])))
    by_score = run.get("teacher_weighting", "fixed") != "fixed"  # weights chosen each round (weighting.py)
    if by_score:
        weights = {t: f"each round, by the branch's {run['teacher_weighting']}" for t in teachers}
    dataset_ids = dict(run.get("teacher_datasets") or {})
    baseline = run.get("baseline")
    lora = run.get("lora", {})
    steps = run.get("steps_per_branch")
    lora_config = run.get("lora_config") or lora  # the full LoraConfig; "lora" holds the shape fields only
    rows = round_metrics(metrics)
    base = hub_id(base_model)
    on_top = f"`{base}`"
    if is_local_path(base):
        on_top = (
            f"the base model in the local folder `{base}` (the export was not told its Hub id: "
            "`mot export --base-model <hub id>`)"
        )
    what = "a LoRA adapter" if kind == "adapter" else "a full model (the MoT delta folded into the base weights)"
    if baseline:
        from .baselines import describe as describe_baseline  # baselines imports the trainer's config: not at import

        what = "a LoRA adapter" if kind == "adapter" else "a full model (the LoRA delta folded into the base weights)"
        about = (
            f"{what[0].upper()}{what[1:]} trained on top of {on_top} as the {describe_baseline(baseline)} of a "
            f"Merge-of-Thought run with {len(baseline['teachers'])} teachers ({baseline['mot_num_rounds']} rounds x "
            f"{baseline['mot_steps_per_branch']} steps per branch): plain LoRA SFT for {steps} steps with the same "
            "student, LoRA, optimizer and batch, made with the merge-of-thought library, TRL and PEFT. It is the "
            "comparison point for the MoT run (`mot compare`), not a MoT student."
        )
    else:
        about = (
            f"{what[0].upper()}{what[1:]} distilled from {len(teachers)} teachers with Merge-of-Thought (MoT, "
            f"[arXiv 2509.08814](https://arxiv.org/abs/2509.08814)) on top of {on_top}, with the merge-of-thought "
            "library, TRL and PEFT. Every round trains one LoRA branch per teacher from the current student and "
            "adds the weighted average of the branch deltas to it."
        )
    body = [
        f"# {repo_id or folder.name}",
        "",
        about,
        "",
        usage(kind, base_model, repo_id or "path/to/this/folder"),
        "",
    ]
    if kind == "adapter":
        if export.get("requested_rank") is None:
            body.append(f"The adapter is exact: its delta is the cumulative MoT delta (rank {export.get('rank')}).")
        else:
            body.append(
                f"The adapter is the cumulative MoT delta truncated to rank {export.get('rank')} by SVD; relative "
                f"Frobenius error {export.get('relative_error_total', 0.0):.3g} in total, "
                f"{export.get('relative_error_max', 0.0):.3g} in the worst layer (per layer in `mot_export.json`)."
            )
    else:
        body.append(f"The delta was added to the original base weights in fp32 and cast once to {export.get('dtype')}.")
    quantized = quantization_note(kind, run.get("quantization"))
    if quantized:
        body += ["", quantized]
    body += ["", "## Teachers", ""]
    data_of = teacher_data(run)
    body.append(table(["teacher", "data", "merge weight"], [[t, data_of.get(t), weights.get(t)] for t in teachers]))
    total = rounds * len(teachers) * steps if steps else None
    body += [
        "",
        "## Training",
        "",
        f"- MoT rounds: {rounds}; SFT steps per branch per round: {steps}; total steps: {total}",
        f"- LoRA branches: r={lora.get('r')}, lora_alpha={lora.get('lora_alpha')}, "
        f"dropout={lora_config.get('lora_dropout')}, rslora={lora.get('use_rslora')}, "
        f"target_modules={lora.get('target_modules')}",
        f"- branches: {run.get('branch_state', 'fresh')} (fresh: a new LoRA adapter and optimizer every round; "
        "persistent: each teacher's adapter and optimizer carried across rounds)",
        f"- student weights: {precision(run.get('quantization'))}",
        f"- merge weights: {run.get('teacher_weighting', 'fixed')} (fixed: the teacher weights above every round; "
        "eval_accuracy: proportional to each branch's own eval accuracy that round)",
        f"- seed: {run.get('seed')}",
        "",
        "## Metrics per round",
        "",
    ]
    columns = {"round": "round", "train_loss": "mean branch train loss", "eval_loss": "eval loss",
               "branch_eval_loss": "branches' eval loss (mean)", "eval_accuracy": "eval accuracy",
               "branch_eval_accuracy": "branches' eval accuracy (mean)", "merge_rank": "merged rank",
               "merge_rel_error_total": "merge rel. error", "merge_kept_norm": "update norm kept by the average"}
    optional = ("eval_accuracy", "branch_eval_loss", "branch_eval_accuracy")  # shown when measured
    columns = {k: v for k, v in columns.items() if k not in optional or any(r[k] is not None for r in rows)}
    if by_score:
        columns["merge_weights"] = "merge weights"
        for row in rows:
            row["merge_weights"] = ", ".join(f"{t} {w:.3g}" for t, w in (row["merge_weights"] or {}).items()) or None
    body.append(table(list(columns.values()), [[r[k] for k in columns] for r in rows]))
    if any(r["branch_eval_loss"] is not None for r in rows):
        body += ["", BRANCH_EVAL_NOTE]
    warnings = [r["averaging_warning"] for r in rows if r.get("averaging_warning")]
    if warnings:  # the merged student clearly below its best branch: these teachers did not average
        body += ["", "**Warning.** " + " ".join(warnings)]
    if rows and plot_metrics(rows, folder / PLOT_FILE):
        body += ["", f"![Losses per MoT round]({PLOT_FILE})"]
    elif rows:
        body += ["", NO_PLOT]
    accuracy = {
        label: [(r["round"], r[key]) for r in rows if r[key] is not None]
        for label, key in (("student", "eval_accuracy"), ("branches (mean)", "branch_eval_accuracy"))
    }
    if accuracy["student"] and plots.plot_curves(accuracy, folder / ACCURACY_PLOT_FILE, "eval accuracy"):
        body += ["", f"![Eval accuracy per MoT round]({ACCURACY_PLOT_FILE})"]
    settings = evaluation_settings(run)
    if settings:
        body += ["", "## Evaluation", "", *settings]
    body += ["", "## Method", "", CITATION, ""]
    used = set(teachers) | set((baseline or {}).get("teachers", []) if (baseline or {}).get("kind") == "mtd" else ())
    hub_sets = [d for t, d in dataset_ids.items() if d and t in used]
    extra = {"tags": TAGS + [f"mot-baseline-{baseline['kind']}"]} if baseline else {}
    data = card_data(kind, base_model, hub_sets, model_name=repo_id or folder.name, **extra)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n" + "\n".join(body))


def merge_card(
    kind: Kind,
    folder: Path,
    sources: Sequence[str],
    weights: Sequence[float],
    method: str,
    base_model: str | None,
    export: Mapping[str, Any],
    repo_id: str | None = None,
) -> ModelCard:
    """The card of a ``mot merge`` output: which adapters, with which weights and method."""
    body = [
        f"# {repo_id or folder.name}",
        "",
        f"{len(sources)} LoRA adapters of `{hub_id(base_model)}` merged with `mot merge --method {method}` "
        "(merge-of-thought library).",
        "",
        usage(kind, base_model, repo_id or "path/to/this/folder"),
        "",
        table(["adapter", "weight"], list(zip(sources, weights))),
        "",
    ]
    if kind == "adapter":
        body.append(
            f"Rank {export.get('rank')}; relative Frobenius error of the low-rank form "
            f"{export.get('relative_error_total', 0.0):.3g} in total (per layer in `mot_export.json`)."
        )
    data = card_data(kind, base_model, relation="adapter" if kind == "adapter" else "merge")
    return ModelCard(f"---\n{data.to_yaml()}\n---\n" + "\n".join(body) + "\n")


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    private: bool | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    commit_message: str = "Upload MoT export",
) -> CommitInfo:
    """Create the repo (and the ``revision`` branch) if needed and upload ``folder`` in one commit."""
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, token=token)
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True, token=token)
    return api.upload_folder(
        repo_id=repo_id, folder_path=folder, revision=revision, commit_message=commit_message, token=token
    )
