"""Reasoning in the formats that exist, rendered the way the student's chat template expects.

Teachers' traces carry their chain of thought in one of three ways: ``<think>…</think>`` inside the assistant's
content (DeepSeek-R1, QwQ, OpenMathReasoning), a ``reasoning_content`` message key (Qwen3, the DeepSeek API,
:func:`~merge_of_thought.sources.conversations_from_columns`) or a ``thinking`` key (gpt-oss). Chat templates differ
in which they render: Qwen3's puts ``reasoning_content`` (and inline ``<think>``) in ``<think>``, gpt-oss's puts
``thinking`` in its analysis channel, a plain ChatML template renders only the content, and DeepSeek-R1-Distill's
drops everything before ``</think>``. :func:`reasoning_style` asks the template (by rendering a probe), and
:func:`render_reasoning` rewrites every assistant message into that form, so no teacher's reasoning is silently left
out of training.
"""

from __future__ import annotations

from typing import Any

from datasets import Dataset, Features, List, Value

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
REASONING_KEYS = ("reasoning_content", "thinking")
INLINE = "inline"
STYLES = (*REASONING_KEYS, INLINE)  # in order of preference: a template's own key renders as its model was trained

_PROBE_QUESTION, _PROBE_REASONING, _PROBE_ANSWER = "mot-probe-question", "mot-probe-reasoning", "mot-probe-answer"


def split_think(text: str) -> tuple[str | None, str, bool]:
    """``(reasoning, answer, closed)`` of an assistant text with inline reasoning.

    ``"<think>R</think>A"`` and ``"R</think>A"`` (a template's generation prompt opened the block) give ``("R", "A",
    True)``; ``"<think>R"`` with no ``</think>`` gives ``("R", "", False)``; text without tags is all answer.
    """
    if THINK_CLOSE in text:
        reasoning, _, answer = text.rpartition(THINK_CLOSE)
        return reasoning.replace(THINK_OPEN, "", 1).strip(), answer.strip(), True
    if THINK_OPEN in text:
        before, _, reasoning = text.partition(THINK_OPEN)
        return reasoning.strip(), before.strip(), False
    return None, text, True


def message_reasoning(message: dict[str, Any]) -> tuple[str | None, str, bool]:
    """``(reasoning, answer, closed)`` of one assistant message, whichever way it carries its reasoning."""
    content = message.get("content")
    content = content if isinstance(content, str) else ""
    for key in REASONING_KEYS:
        if isinstance(message.get(key), str) and message[key].strip():
            return message[key].strip(), split_think(content)[1] if THINK_OPEN in content else content.strip(), True
    return split_think(content)


def reasoning_style(tokenizer: Any, chat_template: str | None = None) -> str | None:
    """How this chat template renders an assistant's reasoning: ``"reasoning_content"`` or ``"thinking"`` (it reads
    that key), ``"inline"`` (it keeps ``<think>…</think>`` in the content), or ``None`` (it drops the reasoning)."""
    for style in STYLES:
        conversation = [{"role": "user", "content": _PROBE_QUESTION},
                        assistant_message(_PROBE_REASONING, _PROBE_ANSWER, style)]  # fmt: skip
        try:
            text = tokenizer.apply_chat_template(conversation, tokenize=False, chat_template=chat_template)
        except Exception:  # a template may refuse a key or a role it does not know: that style does not work
            continue
        if _PROBE_REASONING in text and _PROBE_ANSWER in text:
            return style
    return None


def assistant_message(reasoning: str | None, answer: str, style: str) -> dict[str, Any]:
    """An assistant message holding ``reasoning`` the way ``style`` says (every key present, for one schema)."""
    message = {"role": "assistant", "content": answer, **{key: None for key in REASONING_KEYS}}
    if reasoning is None:
        return message
    if style == INLINE:
        message["content"] = f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n{answer}"
    else:
        message[style] = reasoning
    return message


def has_reasoning(messages: list[dict[str, Any]]) -> bool:
    """Whether an assistant message of this conversation carries reasoning in any form."""
    return any(
        m.get("role") == "assistant" and message_reasoning(m)[0] is not None for m in messages if isinstance(m, dict)
    )


def render_reasoning(dataset: Dataset, column: str, style: str, label: str) -> Dataset:
    """Rewrite the assistant messages of ``column`` (``messages``, or a conversational ``completion``) so their
    reasoning is in ``style``; every other key and message is kept as it is."""

    def rewrite(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for m in messages:
            if m.get("role") == "assistant":
                reasoning, answer, _ = message_reasoning(m)
                out.append({**m, **assistant_message(reasoning, answer, style)})
            else:
                out.append({**m, **{key: m.get(key) for key in REASONING_KEYS}})
        return out

    return dataset.map(lambda row: {column: rewrite(row[column])}, desc=f"Reasoning of {label} as {style!r}")


def with_reasoning_keys(dataset: Dataset) -> Dataset:
    """The data set with every message of its ``messages``/``conversations`` column carrying the reasoning keys
    (None where absent), so conversations mapped from columns and ones with inline ``<think>`` share one schema."""
    column = next((c for c in ("messages", "conversations") if c in dataset.column_names), None)
    message = getattr(dataset.features.get(column), "feature", None)
    if column is None or not isinstance(message, dict):
        return dataset
    keys = {key: Value("string") for key in REASONING_KEYS}
    features = Features({**dataset.features, column: List({**message, **keys})})
    return dataset.map(
        lambda row: {column: [{**m, **{key: m.get(key) for key in REASONING_KEYS}} for m in row[column]]},
        features=features,
        desc="Reasoning keys",
    )
