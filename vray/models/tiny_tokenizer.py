"""A small byte-level BPE tokenizer trained on the fly, carrying a family's special tokens and chat template."""

from __future__ import annotations

import json
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

# The words of the synthetic datasets (vray.data.synthetic): the tiny tokenizers are trained on them.
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
}
SHAPES = ("square", "circle", "triangle")

# The Qwen pre-tokenizer split (words, single digits, punctuation runs, newlines), so that digits of
# box coordinates become one token each, as in the real Qwen tokenizers.
_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

QWEN_SPECIAL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
QWEN3_ADDED = ["<tool_call>", "</tool_call>", "<think>", "</think>"]
# VILA's tokens after Qwen2's (NVILA-Lite): its image and video placeholders are `<image>` and `<vila/video>`.
NVILA_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[BOS]", "[PAD]", "<vila/sentinel>", "<image>",
                 "<vila/video>"]
INTERNVL_SPECIAL = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>", "<video>"]

# A chat template in the Qwen layout: <|im_start|>role\n...<|im_end|>; images and videos as placeholders the
# processor expands. `enable_thinking=false` closes an empty think block (Qwen3.5's switch).
_QWEN_TEMPLATE = r"""{%- set image_ph = '<|vision_start|><|image_pad|><|vision_end|>' -%}
{%- set video_ph = '<|vision_start|><|video_pad|><|vision_end|>' -%}
{%- for message in messages -%}
<|im_start|>{{ message['role'] }}
{% if message['content'] is string -%}
{{ message['content'] }}
{%- else -%}
{%- for part in message['content'] -%}
{%- if part['type'] == 'image' or part['type'] == 'image_url' -%}{{ image_ph }}
{%- elif part['type'] == 'video' -%}{{ video_ph }}
{%- elif part['type'] == 'text' -%}{{ part['text'] }}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
<|im_end|>
{% endfor -%}
{%- if add_generation_prompt -%}
<|im_start|>assistant
{% if THINKING_SWITCH and enable_thinking is defined and not enable_thinking -%}
<think>

</think>

{% endif -%}
{%- endif -%}"""

_INTERNVL_TEMPLATE = _QWEN_TEMPLATE.replace(
    "{%- set image_ph = '<|vision_start|><|image_pad|><|vision_end|>' -%}", "{%- set image_ph = '<IMG_CONTEXT>\n' -%}"
).replace("{%- set video_ph = '<|vision_start|><|video_pad|><|vision_end|>' -%}", "{%- set video_ph = '<video>\n' -%}")


_NVILA_TEMPLATE = _QWEN_TEMPLATE.replace(
    "{%- set image_ph = '<|vision_start|><|image_pad|><|vision_end|>' -%}", "{%- set image_ph = '<image>' -%}"
).replace("{%- set video_ph = '<|vision_start|><|video_pad|><|vision_end|>' -%}", "{%- set video_ph = '<vila/video>' -%}")


def chat_template(family: str) -> str:
    """The chat template of a tiny checkpoint of this model_type."""
    if family == "nvila_lite":
        return _NVILA_TEMPLATE.replace("THINKING_SWITCH", "false")
    if family == "internvl":
        return _INTERNVL_TEMPLATE.replace("THINKING_SWITCH", "false")
    thinking = "true" if family.startswith("qwen3_5") else "false"
    return _QWEN_TEMPLATE.replace("THINKING_SWITCH", thinking)


def special_tokens(family: str) -> list[str]:
    """The family's special tokens, in the order they get ids after the trained vocabulary."""
    if family == "nvila_lite":
        return list(NVILA_SPECIAL)
    tokens = list(QWEN_SPECIAL)
    if family != "qwen2_5_vl":
        tokens += QWEN3_ADDED
    if family == "internvl":
        tokens += INTERNVL_SPECIAL
    return tokens


def train_bpe(corpus: list[str], vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a byte-level BPE with the Qwen split on `corpus`; returns (vocab, merges)."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return dict(model["vocab"]), merges


def build_tokenizer(family: str, corpus: list[str], vocab_size: int = 1024) -> Any:
    """A transformers tokenizer of the family's class (Qwen2Tokenizer / Qwen3_5Tokenizer) trained on `corpus`."""
    from transformers import Qwen2Tokenizer

    vocab, merges = train_bpe(corpus, vocab_size)
    cls: Any = Qwen2Tokenizer
    if family.startswith("qwen3_5"):
        from transformers import Qwen3_5Tokenizer

        cls = Qwen3_5Tokenizer
    extra: dict[str, str] = {}
    if family == "internvl":
        extra = {
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        }
    elif family == "nvila_lite":
        extra = {"image_token": "<image>", "video_token": "<vila/video>"}
    tokenizer = cls(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="[PAD]" if family == "nvila_lite" else "<|endoftext|>",
        extra_special_tokens=extra or None,
    )
    specials = special_tokens(family)
    tokenizer.add_special_tokens({"additional_special_tokens": specials}, replace_extra_special_tokens=False)
    tokenizer.chat_template = chat_template(family)
    return tokenizer


def corpus() -> list[str]:
    """Text the tiny tokenizers are trained on: every word the synthetic datasets and default prompts use."""
    from vray.spec import DEFAULT_SYSTEM_PROMPTS

    lines = list(DEFAULT_SYSTEM_PROMPTS.values())
    for colour in COLOURS:
        for shape in SHAPES:
            lines += [
                f"What colour is the {shape}?", f"Locate the {colour} {shape}.", f"A {colour} {shape}.",
                f"a {colour} {shape} and a {colour} {shape}", colour, shape, f" {colour}", f" {shape}",
            ]
    lines += ["Describe the image.", "What is in this picture? Answer briefly."]
    lines += ['[{"bbox_2d": [12, 34, 56, 78], "label": "red circle"}]', "<ref>blue square</ref><box>[[100, 200, 300, 400]]</box>"]
    lines += [" ".join(str(n) for n in range(i, i + 50)) for i in range(0, 1001, 50)]
    lines += ["The quick brown fox jumps over the lazy dog. Yes, no, left, right, top, bottom, one, two, three."]
    return lines * 3
