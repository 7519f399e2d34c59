"""How each round's branches are weighted in the merge (``MoTConfig.teacher_weighting``).

``"fixed"`` (the paper): every round merges with ``teacher_weights``, uniform when unset.

``"eval_accuracy"``: every round merges with weights proportional to the branches' own accuracy (pass@1) on the
``eval_dataset`` (the branch evaluation of ``eval_branches="all"``, its default then), uniform when every branch
scores 0. Where the teachers write formats the student learns unequally well, a uniform average gives the ones it cannot
learn an equal share of every merge. On SmolLM2-135M with four correct teachers of four formats, two of which it
barely learns, this rule scored 0.653 against the uniform average's 0.533 and the best single teacher's 0.640 (3
seeds; benchmarks/real_student/README.md): it selects the learnable teachers rather than reconciling the others.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

TEACHER_WEIGHTINGS = ("fixed", "eval_accuracy")  # past "fixed", each names the branch-record metric it weighs by


def round_weights(
    weighting: str, teachers: Sequence[str], fixed: Sequence[float], branch_records: Mapping[str, Mapping]
) -> list[float]:
    """The merge weights of one round's ``teachers`` (those merged, in teacher order), summing to 1.

    ``fixed`` are their configured weights (``teacher_weights``), used as they are when they sum to 1 and
    renormalised when a diverged branch was left out; ``branch_records`` are the teachers' branch records of this
    round (metrics.jsonl's ``branch`` lines), which hold the scores an adaptive weighting reads.
    """
    if weighting == "fixed":  # MoTTrainer has refused a round whose kept weights sum to 0
        total = sum(fixed)
        return list(fixed) if math.isclose(total, 1.0, rel_tol=0, abs_tol=1e-6) else [w / total for w in fixed]
    key = weighting
    missing = [t for t in teachers if key not in branch_records.get(t, {})]
    if missing:
        raise RuntimeError(
            f"teacher_weighting={weighting!r} needs every branch's {key}, but the branch records of {missing} have "
            "none (the branch evaluation did not run for them)."
        )
    scores = [float(branch_records[t][key]) for t in teachers]
    total = sum(scores)
    return [s / total if total > 0 else 1.0 / len(teachers) for s in scores]


def averaging_warning(
    round_idx: int, merged: float | None, branches: Mapping[str, float], scored: int
) -> str | None:
    """A warning when a round's merged student scores clearly below its best branch: the sign that these teachers'
    updates do not average (each branch learned something their mean lost). ``merged`` and ``branches`` are eval
    accuracies over ``scored`` samples; "clearly" means by more than two standard errors of the difference of two
    binomial accuracies over that many samples, and by at least 0.05.
    """
    if merged is None or not branches or scored < 1:
        return None
    teacher, best = max(branches.items(), key=lambda item: item[1])
    noise = 2 * math.sqrt((best * (1 - best) + merged * (1 - merged)) / scored)
    if best - merged <= max(noise, 0.05):
        return None
    return (
        f"Round {round_idx}: the merged student scored {merged:.3f}, below its best branch (teacher {teacher!r}, "
        f"{best:.3f}) by more than the noise ({noise:.3f} over {scored} samples): these teachers' updates do not "
        "average well. Where this happened in this project's benchmarks (four teachers writing four formats), "
        "teacher_weighting='eval_accuracy' (the merge weighted by the branches' scores) recovered the best "
        "teacher's accuracy; checking the branches' eval.jsonl for formats the student mixes helps too."
    )
