"""A tiny, deterministic character-level tokenizer for the embedded demo.

Built entirely offline with the ``tokenizers`` library (one ``WordLevel`` token per character), wrapped in a
[`~transformers.PreTrainedTokenizerFast`] so it round-trips through ``save_pretrained`` /
``AutoTokenizer.from_pretrained`` like any Hub tokenizer.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast


PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|startoftext|>"
UNK_TOKEN = "<|unk|>"
SPECIAL_TOKENS = [PAD_TOKEN, EOS_TOKEN, BOS_TOKEN, UNK_TOKEN]

# Characters covered by the vocabulary, in a fixed order (token ids are stable across runs and machines).
CHARACTERS = (
    string.digits
    + " \n"
    + "+-*/=?#:.,;()<>!'_|%"
    + string.ascii_lowercase
    + string.ascii_uppercase
)

# Minimal chat template: "role: content" lines, the assistant turn closed by the EOS token. The `generation`
# block makes `return_assistant_tokens_mask=True` (TRL's `assistant_only_loss`) work.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ 'assistant: ' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ message['role'] + ': ' + message['content'] + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


def build_char_tokenizer(model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """Build the demo's character-level tokenizer.

    Every character of [`CHARACTERS`] is one token; anything else maps to ``<|unk|>``. Special tokens come first
    (``<|pad|>`` = 0, ``<|endoftext|>`` = 1 is both EOS and the chat end-of-turn, ``<|startoftext|>`` = 2 is a BOS
    token prepended when ``add_special_tokens=True`` (and by the chat template), ``<|unk|>`` = 3). Padding side
    defaults to ``"right"`` (training); switch it to ``"left"`` for batched generation.

    Args:
        model_max_length: Maximum sequence length stored in the tokenizer config.

    Returns:
        A [`~transformers.PreTrainedTokenizerFast`] with ``len(tokenizer) < 128``.
    """
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + list(CHARACTERS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    # Split into single characters ("[\s\S]" also matches newlines); keep every character, spaces included.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    # Like Llama-style tokenizers, prepend BOS when `add_special_tokens=True` (the demo student was pre-trained so).
    bos_id = vocab[BOS_TOKEN]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B:1", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        bos_token=BOS_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
