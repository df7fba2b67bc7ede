"""A small byte-level BPE tokenizer trained in memory (no downloads), with the special tokens and chat template of
a LLaVA-1.5 / LLaVA-NeXT / Qwen2-VL checkpoint, wrapped as a ``transformers`` fast tokenizer.

Byte-level pre-tokenisation means any text encodes (no unknown tokens) and decodes back exactly; the merges are
learnt from a few hundred English words so that prompts take a realistic number of tokens.
"""

from __future__ import annotations

from typing import Any

_WORDS = (
    "a an the is are was were be of in on at to for with from by and or not no yes what which who where when how "
    "many much color colour shape size number count there this that these those it its image picture photo "
    "question answer describe left right top bottom middle center front back above below next near far red green "
    "blue yellow black white gray grey orange purple pink brown dog cat man woman person people child car bus "
    "train plane bird horse cow sheep table chair bed sofa window door wall floor sky tree grass water road street "
    "building sign text word letter digit one two three four five six seven eight nine ten zero big small large "
    "tall short long round square circle triangle line stripe dot bright dark light shadow holding wearing "
    "sitting standing walking running eating looking user assistant system you helpful please single phrase "
    "using briefly chat between curious human artificial intelligence gives detailed polite answers questions"
)

# (role-tag grammar, special tokens) per family; templates are written here, following each family's published
# prompt format: Vicuna v1 (LLaVA-1.5), Mistral [INST] (LLaVA-NeXT mistral), ChatML (Qwen2-VL)
_LLAVA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] if message['content'] is string "
    "else message['content'][0]['text'] }}{{ ' ' }}"
    "{% else %}{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] + ' ' }}{% endif %}{% endfor %}"
    "{% endif %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
_MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{ ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{% if message['content'] is string %}{{ ' ' + message['content'] }}"
    "{% else %}{% for c in message['content'] %}{{ ' ' + c['text'] }}{% endfor %}{% endif %}{{ eos_token }}"
    "{% endif %}{% endfor %}"
)
_CHATML_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif c['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

FAMILIES: dict[str, dict[str, Any]] = {
    "llava": {
        "special": ["<unk>", "<s>", "</s>", "<pad>", "<image>"],
        "kw": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"},
        "extra": {"image_token": "<image>"},
        "template": _LLAVA_TEMPLATE,
    },
    "mistral": {
        "special": ["<unk>", "<s>", "</s>", "<pad>", "<image>"],
        "kw": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"},
        "extra": {"image_token": "<image>"},
        "template": _MISTRAL_TEMPLATE,
    },
    "chatml": {
        "special": [
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "<|vision_start|>",
            "<|vision_end|>",
            "<|image_pad|>",
            "<|video_pad|>",
        ],
        "kw": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        "extra": {
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_bos_token": "<|vision_start|>",
            "vision_eos_token": "<|vision_end|>",
        },
        "template": _CHATML_TEMPLATE,
    },
}


def build_tokenizer(family: str, vocab_size: int = 512) -> Any:
    """A ``PreTrainedTokenizerFast`` for ``family`` ('llava', 'mistral' or 'chatml'): byte-level BPE of about
    ``vocab_size`` tokens learnt from a fixed word list, the family's special tokens, image token and chat template.
    Deterministic: the same call gives the same vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if family not in FAMILIES:
        raise ValueError(f"unknown tokenizer family {family!r}; choose from {sorted(FAMILIES)}")
    fam = FAMILIES[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=fam["special"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    words = _WORDS.split()
    corpus = [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    corpus += [w.capitalize() for w in words] + ["?", ".", ",", ":", "\n"]
    tok.train_from_iterator(corpus * 3, trainer)
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        extra_special_tokens=fam["extra"],
        chat_template=fam["template"],
        padding_side="left",  # batched generation pads on the left
        **fam["kw"],
    )
    return out
