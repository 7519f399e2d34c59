"""Regenerate docs/trl_diff.md: `diff -u` of the installed TRL's scripts/sft.py against examples/trl_sft_to_mot.py.

    python docs/make_trl_diff.py
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import trl
import trl.scripts.sft

ROOT = Path(__file__).resolve().parents[1]

INTRO = """# From TRL's `sft.py` to Merge-of-Thought

`examples/trl_sft_to_mot.py` is TRL's own `trl/scripts/sft.py` (TRL {version}) converted to MoT. Outside the module
docstring (usage text) and the script-dependency comment, the code changes are:

- `SFTTrainer` -> `MoTTrainer`, `SFTConfig` -> `MoTConfig` (imports and the parser's dataclasses);
- `train_dataset=...` -> `teachers=load_teachers(dataset_args)`: each `datasets:` entry of the YAML is one teacher,
  trained as its own LoRA branch every round (TRL would concatenate them into one training set).

Everything else is TRL's script unchanged: `TrlParser`, `model_init_kwargs`, the held-out split for `eval_dataset`,
`get_quantization_config`/`get_peft_config`, `trainer.train(...)`, `trainer.accelerator.print`, `trainer.save_model`
(writes the student: the merged delta of all rounds as a PEFT LoRA adapter), `trainer.push_to_hub` and `trainer.end()`.
`tests/test_trl_example.py` keeps this diff within 12 changed code lines (+/- lines after the docstring, blank lines
not counted; {count} today) and runs the script on a tiny local model.

Caveats: the unchanged `dataset = get_dataset(dataset_args)` still builds TRL's concatenated mixture, which the script
then only uses for `eval_dataset` (when `eval_strategy` is set and `test_split_size` makes a test split); that split is
drawn from the teachers' own rows, and teachers with different columns cannot be concatenated (select common
`columns:`). For a separate held-out set and mixed formats use `mot train` with `teachers:` and `eval_dataset:`.
As in TRL, `lora_r`, `lora_alpha`, ... apply with `use_peft: true`; without it the branches use MoT's default LoRA.

Regenerate with `python docs/make_trl_diff.py`.

```diff
{diff}```
"""


def trl_diff() -> str:
    command = ["diff", "-u", "--label", "trl/scripts/sft.py", "--label", "examples/trl_sft_to_mot.py"]
    files = [trl.scripts.sft.__file__, str(ROOT / "examples" / "trl_sft_to_mot.py")]
    return subprocess.run(command + files, capture_output=True, text=True).stdout


def code_changes(diff: str) -> list[str]:
    """The +/- lines of the diff after TRL's module docstring (which ends before line 60), blank lines excluded."""
    changes, in_header = [], True
    for line in diff.splitlines():
        if line.startswith(("---", "+++")):
            continue
        if line.startswith("@@"):
            in_header = int(line.split()[1].split(",")[0][1:]) < 60
            continue
        if line[:1] in "+-" and line[1:].strip() and not in_header:
            changes.append(line)
    return changes


if __name__ == "__main__":
    diff = trl_diff()
    text = INTRO.format(version=trl.__version__, count=len(code_changes(diff)), diff=diff)
    (ROOT / "docs" / "trl_diff.md").write_text(text)
    print(f"docs/trl_diff.md: {len(code_changes(diff))} changed code lines")
