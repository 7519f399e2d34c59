"""Every bad input fails with a clear error before a model is trained (and, where it can, before it is loaded)."""

from __future__ import annotations

import copy
import warnings

import pytest
from datasets import Dataset
from peft import IA3Config, LoraConfig, PrefixTuningConfig

from merge_of_thought import MoTConfig, MoTTrainer

from conftest import make_teacher
from helpers import quick_config, quick_lora


def build(model, teachers, tmp_path, lora=None, **config):
    return MoTTrainer(model, args=quick_config(tmp_path, **config), teachers=teachers, peft_config=lora or quick_lora())


MISSING_MODEL = "/nonexistent/model/that/must/not/be/loaded"


@pytest.mark.parametrize(
    "teachers, message",
    [
        ({"only": make_teacher(0)}, "Only one teacher"),
        ({}, "teachers is empty"),
        ({"a": make_teacher(0), "b": make_teacher(1, n=0)}, "teacher 'b': its data set is empty"),
        ({"a": make_teacher(0), "b": Dataset.from_list([{"question": "1+1", "answer": "2"}])}, "no usable column"),
        ([make_teacher(0), make_teacher(1)], "must be a dict"),
        ({"a": make_teacher(0), "b": [{"text": "x"}]}, "expected a datasets.Dataset"),
        ({"a": make_teacher(0), "b": make_teacher(1).to_iterable_dataset()}, "IterableDataset is not supported"),
        ({"a": make_teacher(0), "": make_teacher(1)}, "teacher names must be non-empty strings"),
    ],
)
def test_bad_teachers_fail_before_the_model_is_loaded(teachers, message, tmp_path):
    with pytest.raises((ValueError, TypeError), match=message):
        build(MISSING_MODEL, teachers, tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_one_teacher_is_allowed_only_explicitly(qwen3_dir, tmp_path):
    trainer = build(qwen3_dir, {"only": make_teacher(0)}, tmp_path, allow_single_teacher=True)
    assert trainer.teacher_weights == [1.0]


@pytest.mark.parametrize(
    "weights, message",
    [
        ({"a": 0.5, "c": 0.5}, r"unknown: \['c'\], missing: \['b'\]"),
        ({"a": 0.7, "b": 0.7}, "must sum to 1"),
        ({"a": 1.5, "b": -0.5}, "non-negative"),
        ('{"a": 0.2, "b": 0.2}', "must sum to 1"),
    ],
)
def test_bad_teacher_weights(weights, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        build(MISSING_MODEL, {"a": make_teacher(0), "b": make_teacher(1)}, tmp_path, teacher_weights=weights)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("num_rounds", 0, "num_rounds must be at least 1"),
        ("max_steps", -1, r"max_steps=-1 \(train for num_train_epochs\): MoT trains every branch for max_steps"),
        ("num_train_epochs", 1.0, r"num_train_epochs=1: .* One epoch over a teacher of N rows is ceil\(N / "),
        ("max_steps", 0, "max_steps must be at least 1"),
        ("merge_max_rank", 0, "merge_max_rank"),
        ("merge_tolerance", 0.01, r"merge_tolerance must be in \[0, 1e-3\]"),
        ("merge_step_size", 0.0, "merge_step_size must be a positive number"),
        ("merge_step_size", float("nan"), "merge_step_size must be a positive number"),
        ("on_branch_divergence", "skip", "on_branch_divergence must be 'raise' or 'drop'"),
    ],
)
def test_bad_config_values(field, value, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        quick_config(tmp_path, **{field: value})


@pytest.mark.parametrize(
    "peft_config, message",
    [
        (IA3Config(target_modules=["q_proj"], feedforward_modules=[]), "must be a peft.LoraConfig"),
        (PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"), "must be a peft.LoraConfig"),
        (LoraConfig(target_modules=["q_proj"], use_dora=True), "DoRA"),
        (LoraConfig(target_modules=["q_proj"], bias="all"), "bias"),
        (LoraConfig(target_modules=["q_proj"], init_lora_weights="pissa"), "start at the student"),
        (LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]), "modules_to_save"),
    ],
)
def test_unsupported_peft_configs(peft_config, message, tmp_path):
    teachers = {"a": make_teacher(0), "b": make_teacher(1)}
    with pytest.raises((TypeError, ValueError), match=message):
        build(MISSING_MODEL, teachers, tmp_path, lora=peft_config)


def test_target_modules_that_match_nothing(qwen3_dir, tmp_path):
    teachers = {"a": make_teacher(0), "b": make_teacher(1)}
    with pytest.raises(ValueError, match=r"match no module of Qwen3ForCausalLM.*q_proj"):
        build(qwen3_dir, teachers, tmp_path, lora=LoraConfig(target_modules=["query_key_value"]))
    with pytest.raises(ValueError, match="Embedding; MoT merges linear layers only"):
        build(qwen3_dir, teachers, tmp_path, lora=LoraConfig(target_modules=["embed_tokens"]))


def test_a_peft_model_is_refused(qwen3_dir, tmp_path):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(qwen3_dir), quick_lora())
    with pytest.raises(TypeError, match="was given a PeftModel"):
        build(model, {"a": make_teacher(0), "b": make_teacher(1)}, tmp_path)


def test_config_defaults_suit_the_cpu(tmp_path):
    config = MoTConfig(output_dir=str(tmp_path))
    assert config.bf16 is False  # this machine has no GPU
    assert config.dataloader_pin_memory is False  # pinning needs a GPU (torch would warn in every branch)
    assert config.max_steps == 50 and config.num_rounds == 5


def test_bf16_asked_for_on_a_machine_without_a_gpu_trains_on_the_cpu(tmp_path):
    """transformers refuses bf16 without a GPU unless ``use_cpu`` is set; on such a machine MoT sets it (there is
    nothing else to train on), so ``bf16=True`` means bf16 autocast on the CPU, as the docs say."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the slow-bf16 warning on CPUs without native bf16
        config = MoTConfig(output_dir=str(tmp_path), bf16=True)
    assert config.bf16 is True and config.use_cpu is True
    assert config.device.type == "cpu"


def chat_teacher(n: int = 4) -> Dataset:
    return Dataset.from_list(
        [{"messages": [{"role": "user", "content": f"{k}+1"}, {"role": "assistant", "content": f"{k + 1}"}]}
         for k in range(n)]
    )  # fmt: skip


def test_chat_format_problems_fail_before_the_model_is_loaded(tokenizer, tmp_path):
    """What TRL would raise in the first branch or the round-0 evaluation, after the model had loaded."""
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}"
    chat = {"a": chat_teacher(), "b": chat_teacher()}

    def build_with(tok, teachers, **config):
        args = quick_config(tmp_path, **config)
        return MoTTrainer(MISSING_MODEL, args=args, teachers=teachers, processing_class=tok, peft_config=quick_lora())

    with pytest.raises(ValueError, match=r"assistant_only_loss=True: the chat template of .* no \{% generation %\}"):
        build_with(plain, chat, assistant_only_loss=True)
    with pytest.raises(ValueError, match="assistant_only_loss=True needs conversational data.*teacher 'b'"):
        build_with(tokenizer, {"a": chat_teacher(), "b": make_teacher(1)}, assistant_only_loss=True)
    plain.chat_template = None
    with pytest.raises(ValueError, match="teacher 'a' is conversational .* has no chat template"):
        build_with(plain, chat)
    assert not any(tmp_path.iterdir())  # nothing written (the folder itself is the writability probe's)
    # With markers, or a template given as chat_template_path, the check passes and the model is the next step.
    (tmp_path / "template.jinja").write_text(tokenizer.chat_template)
    with pytest.raises(OSError, match="must/not/be/loaded"):
        build_with(plain, chat, assistant_only_loss=True, chat_template_path=str(tmp_path / "template.jinja"))


def test_an_unreachable_hub_model_is_named_in_one_line(tmp_path, monkeypatch):
    import huggingface_hub

    # offline, as without a connection but at once (no retries): nothing is cached under this id
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    message = r"^model 'mot-tests/not-a-cached-model': the Hugging Face Hub could not be reached to download it"
    with pytest.raises(ConnectionError, match=message):
        build("mot-tests/not-a-cached-model", {"a": make_teacher(0), "b": make_teacher(1)}, tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()
