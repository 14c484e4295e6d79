"""Turn samples into model inputs with the family's processor and chat template.

The prompt (system prompt, earlier turns, user turn with its images) goes through the processor, which
expands image placeholders into visual tokens; the answer is tokenized on its own and appended, so the
labels cover exactly the answer tokens and the end-of-turn token, never the prompt.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from vray.archs.registry import BOX_QWEN25_ABS, Architecture
from vray.data.boxes import ImageGeometry, PixelBox, format_answer
from vray.data.sample import Sample, Turn
from vray.errors import DataError

IGNORE_INDEX = -100
# Every transformers-native family in the registry closes a turn with this token (Qwen chat layout).
END_OF_TURN = "<|im_end|>"
_PER_TOKEN = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


def load_image(ref: str) -> Image.Image:
    """An RGB image from a path, an s3:// or http(s) URI, or a data: URL."""
    try:
        if ref.startswith("data:"):
            payload = ref.split(",", 1)[1]
            raw = base64.b64decode(payload)
            return Image.open(io.BytesIO(raw)).convert("RGB")
        if "://" in ref:
            import fsspec

            with fsspec.open(ref, "rb") as fh:
                return Image.open(io.BytesIO(fh.read())).convert("RGB")
        with Image.open(ref) as im:
            return im.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - any decoder error becomes one clear message
        shown = ref if len(ref) < 120 else ref[:60] + "..."
        raise DataError(f"image {shown!r} cannot be read ({type(exc).__name__}: {exc})") from None


def image_geometry(processor: Any, arch: Architecture, image: Image.Image) -> ImageGeometry:
    """Original and processor-resized size of an image (the resize matters for absolute-pixel boxes)."""
    w, h = image.size
    if arch.box_convention != BOX_QWEN25_ABS:
        return ImageGeometry.unresized(w, h)
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    ip = processor.image_processor
    size = getattr(ip, "size", None) or {}
    factor = ip.patch_size * ip.merge_size
    rh, rw = smart_resize(h, w, factor=factor, min_pixels=size.get("shortest_edge", 56 * 56),
                          max_pixels=size.get("longest_edge", 28 * 28 * 1280))
    return ImageGeometry(w, h, rw, rh)


def answer_text(turn: Turn, arch: Architecture, geometries: list[ImageGeometry]) -> str:
    """The text the model is trained to write for a turn: its text, or its boxes in the family's form."""
    if not turn.boxes:
        return turn.text
    geo = geometries[turn.boxes[0].image]
    boxes = format_answer([PixelBox(b.label, b.bbox) for b in turn.boxes], arch.box_convention, geo)
    return f"{turn.text}\n{boxes}" if turn.text else boxes


@dataclass
class Encoded:
    """One sample's tensors (unpadded) plus what evaluation needs to score it."""

    tensors: dict[str, torch.Tensor]
    geometries: list[ImageGeometry]
    reference: str  # the gold answer text


class Collator:
    """Builds padded training batches and left-padded generation batches for one family."""

    def __init__(self, processor: Any, arch: Architecture, system_prompt: str | None,
                 chat_template_kwargs: dict[str, Any] | None = None):
        self.processor = processor
        self.arch = arch
        self.system_prompt = system_prompt
        self.chat_template_kwargs = chat_template_kwargs or {}
        tok = processor.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.convert_tokens_to_ids(END_OF_TURN)
        self.eot_id = tok.convert_tokens_to_ids(END_OF_TURN)
        if self.eot_id is None or self.eot_id == tok.unk_token_id:
            raise DataError(f"the tokenizer has no {END_OF_TURN} token; vray expects a Qwen-layout chat template")

    # ---- messages ------------------------------------------------------------------------------
    def messages(self, sample: Sample, geometries: list[ImageGeometry], system_prompt: str | None = None) -> list[dict]:
        """Chat-template messages for everything before the final assistant turn."""
        system = sample.system or system_prompt or self.system_prompt
        out: list[dict] = [{"role": "system", "content": system}] if system else []
        images_left = len(sample.images)
        for turn in sample.conversation[:-1]:
            if turn.role == "system":
                continue
            if turn.role == "user":
                parts: list[dict] = [{"type": "image"} for _ in range(images_left)]
                images_left = 0
                parts.append({"type": "text", "text": turn.text})
                out.append({"role": "user", "content": parts})
            else:
                out.append({"role": "assistant", "content": answer_text(turn, self.arch, geometries)})
        return out

    def prompt_text(self, messages: list[dict]) -> str:
        """The rendered prompt, ending with the assistant generation prompt."""
        return self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False, **self.chat_template_kwargs
        )

    # ---- encoding ------------------------------------------------------------------------------
    def encode(self, sample: Sample, with_answer: bool = True, images: list[Image.Image] | None = None) -> Encoded:
        """Tensors for one sample; labels cover the answer and the end-of-turn token only."""
        try:
            images = images if images is not None else [load_image(ref) for ref in sample.images]
        except DataError as exc:
            raise DataError(f"sample '{sample.id}': {exc}") from None
        geometries = [image_geometry(self.processor, self.arch, im) for im in images]
        prompt = self.prompt_text(self.messages(sample, geometries))
        out = self.processor(text=[prompt], images=images or None, return_tensors="pt")
        tensors = {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
        reference = answer_text(sample.answer, self.arch, geometries)
        for key in _PER_TOKEN:
            if key in tensors:
                tensors[key] = tensors[key][0]
        if with_answer:
            answer_ids = self.processor.tokenizer(reference, add_special_tokens=False)["input_ids"] + [self.eot_id]
            answer = torch.tensor(answer_ids, dtype=tensors["input_ids"].dtype)
            n_prompt = tensors["input_ids"].shape[0]
            tensors["input_ids"] = torch.cat([tensors["input_ids"], answer])
            for key in _PER_TOKEN[1:]:
                if key in tensors:
                    fill = 1 if key == "attention_mask" else 0
                    tensors[key] = torch.cat([tensors[key], torch.full((len(answer_ids),), fill, dtype=tensors[key].dtype)])
            labels = torch.full_like(tensors["input_ids"], IGNORE_INDEX)
            labels[n_prompt:] = answer
            tensors["labels"] = labels
        return Encoded(tensors, geometries, reference)

    def batch(self, encoded: list[Encoded], left_pad: bool = False) -> dict[str, torch.Tensor]:
        """Pad per-token tensors (right for training, left for generation) and concatenate visual ones."""
        longest = max(e.tensors["input_ids"].shape[0] for e in encoded)
        out: dict[str, torch.Tensor] = {}
        keys = [k for k in encoded[0].tensors]
        for key in keys:
            values = [e.tensors[key] for e in encoded if key in e.tensors]
            if key in _PER_TOKEN or key == "labels":
                fill = {"input_ids": self.pad_id, "labels": IGNORE_INDEX}.get(key, 0)
                rows = []
                for v in values:
                    pad = torch.full((longest - v.shape[0],), fill, dtype=v.dtype)
                    rows.append(torch.cat([pad, v]) if left_pad else torch.cat([v, pad]))
                out[key] = torch.stack(rows)
            else:
                out[key] = torch.cat(values, dim=0)
        return out
