"""Turn samples into model inputs with the family's processor and chat template.

The conversation is rendered with the chat template turn by turn. Context (system prompt, user turns with
their images and videos, the template's own markup) goes through the processor, which expands image and
video placeholders into visual tokens; every assistant answer is tokenized on its own and followed by the
end-of-turn token. Labels cover exactly the answers and their end-of-turn tokens, never the context.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from vray.archs.registry import BOX_QWEN25_ABS, Architecture
from vray.data.boxes import ImageGeometry, PixelBox, format_answer
from vray.data.media import load_image, load_video
from vray.data.sample import IMAGE_TAG, VIDEO_TAG, Sample, Turn
from vray.errors import DataError

IGNORE_INDEX = -100
# Every transformers-native family in the registry closes a turn with this token (Qwen chat layout).
END_OF_TURN = "<|im_end|>"
_PER_TOKEN = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")
_VISUAL = ("pixel_values", "pixel_values_videos")
VISION_DUMMY_SIDE = 56  # pixels: the smallest image every family's processor takes as it is (a few visual tokens)
NEAR_BUDGET = 0.9  # a sample above this share of the token budget is reported as a warning


def sample_tensors(out: Any) -> dict[str, torch.Tensor]:
    """The tensors a processor returned for one sample, per-token tensors 1-D (what `Collator.batch` pads)."""
    tensors = {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
    for key in _PER_TOKEN:
        if key in tensors:
            tensors[key] = tensors[key][0]
    return tensors


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
    """The text the model is trained to write for a turn: its text, then its boxes in the family's form."""
    if not turn.boxes:
        return turn.text
    geo = geometries[turn.boxes[0].image]
    boxes = format_answer([PixelBox(b.label, b.bbox) for b in turn.boxes], arch.box_convention, geo)
    return f"{turn.text}\n{boxes}" if turn.text.strip() else boxes


@dataclass
class Encoded:
    """One sample's tensors (unpadded) plus what evaluation needs to score it."""

    tensors: dict[str, torch.Tensor]
    geometries: list[ImageGeometry]
    reference: str  # the gold text of the last answer
    visual_tokens: int = 0
    notes: list[str] = field(default_factory=list)
    sample_id: str = ""
    skipped: dict[str, Any] | None = None  # a stand-in for a sample that failed to encode (`Collator.stand_in`)

    @property
    def length(self) -> int:
        return int(self.tensors["input_ids"].shape[0])

    @property
    def has_visual(self) -> bool:
        return any(key in self.tensors for key in _VISUAL)


@dataclass
class Media:
    """A sample's decoded images and videos."""

    images: list[Image.Image]
    videos: list[tuple[list[Image.Image], float]]



def skip_record(sample: Sample, error: DataError) -> dict[str, str]:
    """What the run's data report says of a sample that no longer encodes: its id, file, kind of fault and error."""
    return {"id": sample.id, "file": error.file, "kind": error.kind or "unreadable", "error": str(error)}

class Collator:
    """Builds padded training batches and left-padded generation batches for one family."""

    def __init__(self, processor: Any, arch: Architecture, system_prompt: str | None,
                 max_tokens: int | None = None, max_frames: int | None = None):
        self.processor = processor
        self.arch = arch
        self.system_prompt = system_prompt
        self.max_tokens = max_tokens
        self.max_frames = max_frames
        tok = processor.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.convert_tokens_to_ids(END_OF_TURN)
        self.eot_id = tok.convert_tokens_to_ids(END_OF_TURN)
        if self.eot_id is None or self.eot_id == tok.unk_token_id:
            raise DataError(f"the tokenizer has no {END_OF_TURN} token; vray expects a Qwen-layout chat template")
        template = getattr(processor, "chat_template", None) or ""
        self.thinking_switch = "enable_thinking" in template
        self.image_token = getattr(processor, "image_token", "<|image_pad|>")
        self.video_token = getattr(processor, "video_token", "<|video_pad|>")
        self.qwen_video = "Qwen" in type(getattr(processor, "video_processor", None)).__name__
        self._vision_dummy: Encoded | None = None

    # ---- media ---------------------------------------------------------------------------------
    def load_media(self, sample: Sample) -> Media:
        """Decode the sample's images and videos; a DataError names the sample and the file."""
        images: list[Image.Image] = []
        videos: list[tuple[list[Image.Image], float]] = []
        ref: str | None = None
        try:
            for ref in sample.images:
                images.append(load_image(ref))
            for video in sample.videos:
                ref = video.path or (video.frames[0] if video.frames else None)
                videos.append(load_video(video, self.max_frames))
        except DataError as exc:
            raise DataError(f"sample '{sample.id}': {exc}", kind=exc.kind, file=exc.file or ref) from None
        return Media(images, videos)

    # ---- messages ------------------------------------------------------------------------------
    def _user_parts(self, text: str, images_left: list[int], videos_left: list[int], first: bool) -> list[dict]:
        if IMAGE_TAG in text or VIDEO_TAG in text:
            parts: list[dict] = []
            for piece in re.split(f"({re.escape(IMAGE_TAG)}|{re.escape(VIDEO_TAG)})", text):
                if piece == IMAGE_TAG:
                    images_left.pop(0)
                    parts.append({"type": "image"})
                elif piece == VIDEO_TAG:
                    videos_left.pop(0)
                    parts.append({"type": "video"})
                elif piece:
                    parts.append({"type": "text", "text": piece})
            return parts
        parts = []
        if first:  # untagged media open the first user turn
            parts += [{"type": "image"} for _ in images_left] + [{"type": "video"} for _ in videos_left]
            images_left.clear()
            videos_left.clear()
        return parts + [{"type": "text", "text": text}]

    def messages(self, sample: Sample, geometries: list[ImageGeometry]) -> tuple[list[dict], list[int]]:
        """Chat-template messages of the whole conversation, and the indexes of the assistant messages."""
        system = sample.system or self.system_prompt
        out: list[dict] = [{"role": "system", "content": system}] if system else []
        images_left, videos_left = list(range(len(sample.images))), list(range(len(sample.videos)))
        tagged = any(IMAGE_TAG in t.text or VIDEO_TAG in t.text for t in sample.conversation if t.role == "user")
        first = True
        answers = []
        for turn in sample.conversation:
            if turn.role == "system":
                continue
            if turn.role == "user":
                out.append({"role": "user", "content": self._user_parts(turn.text, images_left, videos_left, first and not tagged)})
                first = False
            else:
                answers.append(len(out))
                out.append({"role": "assistant", "content": answer_text(turn, self.arch, geometries)})
        return out, answers

    def _render(self, messages: list[dict], thinking: bool) -> str:
        kwargs = {"enable_thinking": thinking} if self.thinking_switch else {}
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)

    def segments(self, sample: Sample, geometries: list[ImageGeometry], with_answer: bool) -> tuple[list[tuple[str, bool]], list[str]]:
        """(text, is_answer) pieces of the conversation in order, and notes (history the template rewrote)."""
        messages, answers = self.messages(sample, geometries)
        thinking = sample.has_reasoning
        if not with_answer:
            return [(self._render(messages[: answers[-1]], thinking), False)], []
        pieces: list[tuple[str, bool]] = []
        consumed = ""
        for i in answers:
            prompt = self._render(messages[:i], thinking)
            if not prompt.startswith(consumed):  # the template rewrites earlier answers: learn the last one only
                last = answers[-1]
                prompt = self._render(messages[:last], thinking)
                answer = self._answer(prompt, messages[last]["content"])
                return [(prompt, False), (answer, True)], ["history rewritten by the chat template: last answer only"]
            answer = self._answer(prompt, messages[i]["content"])
            pieces += [(prompt[len(consumed):], False), (answer, True)]
            consumed = prompt + answer + END_OF_TURN
        return pieces, []

    @staticmethod
    def _answer(prompt: str, answer: str) -> str:
        # A template that opens the think block in the generation prompt: the answer continues inside it.
        if prompt.rstrip().endswith("<think>") and answer.lstrip().startswith("<think>"):
            return answer.lstrip()[len("<think>"):].lstrip("\n")
        return answer

    # ---- encoding ------------------------------------------------------------------------------
    def _context(self, text: str, media: Media, next_image: int, next_video: int) -> tuple[dict[str, torch.Tensor], int, int]:
        n_img, n_vid = text.count(self.image_token), text.count(self.video_token)
        images = media.images[next_image:next_image + n_img]
        videos = media.videos[next_video:next_video + n_vid]
        kwargs: dict[str, Any] = {}
        if videos:
            from transformers.video_utils import VideoMetadata

            kwargs["video_metadata"] = [VideoMetadata(total_num_frames=len(f), fps=fps, frames_indices=list(range(len(f))))
                                        for f, fps in videos]
            kwargs["do_sample_frames"] = False
            if self.qwen_video:
                kwargs["cap_pixels_per_frame"] = True
        if getattr(self.processor, "tiles_single_images", False):  # NVILA-Lite: an image alone is tiled
            kwargs["images_in_prompt"] = len(media.images)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = self.processor(text=[text], images=images or None, videos=[f for f, _ in videos] or None,
                                 return_tensors="pt", **kwargs)
        return sample_tensors(out), next_image + n_img, next_video + n_vid

    def encode(self, sample: Sample, with_answer: bool = True, media: Media | None = None,
               images: list[Image.Image] | None = None) -> Encoded:
        """Tensors for one sample: labels cover every answer and its end-of-turn token only. `media` (or just
        `images`) skips decoding the sample's files."""
        if media is None:
            media = Media(images, []) if images is not None else self.load_media(sample)
        geometries = [image_geometry(self.processor, self.arch, im) for im in media.images]
        pieces, notes = self.segments(sample, geometries, with_answer)
        parts: list[dict[str, torch.Tensor]] = []
        next_image = next_video = 0
        for text, is_answer in pieces:
            if is_answer:
                ids = self.processor.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.eot_id]
                t = torch.tensor(ids, dtype=torch.long)
                parts.append({"input_ids": t, "attention_mask": torch.ones_like(t), "labels": t.clone()})
            else:
                ctx, next_image, next_video = self._context(text, media, next_image, next_video)
                ctx["labels"] = torch.full_like(ctx["input_ids"], IGNORE_INDEX) if with_answer else None
                parts.append({k: v for k, v in ctx.items() if v is not None})
        tensors = _concat(parts)
        ids = tensors["input_ids"]
        visual = int(((ids == self.processor.tokenizer.convert_tokens_to_ids(self.image_token))
                      | (ids == self.processor.tokenizer.convert_tokens_to_ids(self.video_token))).sum())
        encoded = Encoded(tensors, geometries, answer_text(sample.answer, self.arch, geometries), visual, notes,
                          sample.id)
        if self.max_tokens and encoded.length > self.max_tokens:
            raise DataError(
                f"sample '{sample.id}' is {encoded.length} tokens ({visual} visual + {encoded.length - visual} text), over "
                f"the budget of {self.max_tokens}; lower media.maxPixels / media.maxFrames, shorten it, or raise data.maxTokens",
                kind="over token budget",
            )
        return encoded

    def vision_dummy(self) -> Encoded:
        """A user turn holding one small blank image, every label ignored (built once)."""
        if self._vision_dummy is None:
            image = Image.new("RGB", (VISION_DUMMY_SIDE, VISION_DUMMY_SIDE))
            text = self._render([{"role": "user", "content": [{"type": "image"}]}], thinking=False)
            tensors, _, _ = self._context(text, Media([image], []), 0, 0)
            tensors["labels"] = torch.full_like(tensors["input_ids"], IGNORE_INDEX)
            self._vision_dummy = Encoded(tensors, [ImageGeometry.unresized(VISION_DUMMY_SIDE, VISION_DUMMY_SIDE)], "")
        return self._vision_dummy

    def stand_in(self, sample: Sample, error: DataError) -> Encoded:
        """What trains in place of a sample that no longer encodes (an image replaced or deleted after the data
        check): the vision dummy, every label ignored, so the step keeps its shape on every rank (no loss, zero
        gradient); `skipped` says which sample and file, and why."""
        dummy = self.vision_dummy()
        return Encoded(dict(dummy.tensors), list(dummy.geometries), "", dummy.visual_tokens, [], sample.id,
                       skipped=skip_record(sample, error))

    def with_vision(self, encoded: list[Encoded]) -> list[Encoded]:
        """A training micro-batch that runs the vision tower and projector even when none of its samples has an
        image or video: a text-only micro-batch gets `vision_dummy` appended to its first row.

        Sharded engines gather the vision blocks' weights inside their forward and DDP expects a gradient for
        every trainable parameter, so every rank must run the same modules in every micro-batch. The dummy follows
        every real token of its row and all its labels are ignored: under the causal mask no scored position sees
        it, so the loss is unchanged and its gradients to the vision side are exactly zero."""
        if any(e.has_visual for e in encoded):
            return encoded
        first = encoded[0]
        joined = Encoded(_concat([first.tensors, self.vision_dummy().tensors]), first.geometries, first.reference,
                         first.visual_tokens, first.notes, first.sample_id)
        return [joined, *encoded[1:]]

    def batch(self, encoded: list[Encoded], left_pad: bool = False) -> dict[str, torch.Tensor]:
        """Pad per-token tensors (right for training, left for generation) and concatenate visual ones."""
        longest = max(e.length for e in encoded)
        out: dict[str, torch.Tensor] = {}
        keys = list(dict.fromkeys(k for e in encoded for k in e.tensors))
        for key in keys:
            values = [e.tensors[key] for e in encoded if key in e.tensors]
            if key in _PER_TOKEN or key == "labels":
                fill = {"input_ids": self.pad_id, "labels": IGNORE_INDEX}.get(key, 0)
                rows = []
                for e in encoded:
                    v = e.tensors.get(key)
                    if v is None:  # a text-only row in a batch whose other rows carry this column
                        v = torch.zeros(e.length, dtype=values[0].dtype)
                    pad = torch.full((longest - v.shape[0],), fill, dtype=v.dtype)
                    rows.append(torch.cat([pad, v]) if left_pad else torch.cat([v, pad]))
                out[key] = torch.stack(rows)
            else:
                out[key] = torch.cat(values, dim=0)
        return out


    def pack(self, encoded: list[Encoded],
             positions: Callable[[dict[str, torch.Tensor]], torch.Tensor]) -> dict[str, torch.Tensor]:
        """One packed row: the samples end to end, no padding and no attention mask, with `position_ids` that
        restart at every sample. `positions(tensors)` gives one sample's positions (`vray.models.packing`): [L] for
        plain rotary families, [4, L] (text row, then the three mRoPE rows) for the mRoPE families; the row's
        `position_ids` are [1, T] or [4, 1, T]. Attention then stays inside each sample (transformers derives the
        sample boundaries from the text positions when the attention mask is None); visual tensors are
        concatenated in sample order, as in `batch`."""
        row = _concat([e.tensors for e in encoded])
        row.pop("attention_mask", None)
        out = {k: (v[None] if k in _PER_TOKEN or k == "labels" else v) for k, v in row.items()}
        pos = torch.cat([positions(e.tensors) for e in encoded], dim=-1)
        out["position_ids"] = pos[None] if pos.ndim == 1 else pos[:, None]
        return out


def pack_in_order(lengths: list[int], budget: int, visual: list[bool], extra: int = 0,
                  names: list[str] | None = None, strict: bool = True) -> list[list[int]]:
    """Greedy, order-keeping packing: the indexes of consecutive samples whose lengths sum to at most `budget`
    tokens, one group per packed row. A group with no visual sample is charged `extra` tokens (the vision dummy
    that `Collator.with_vision` appends to it) unless it holds a single sample, which always fits alone. A sample
    longer than the budget is a DataError naming it (`strict`: the user's data.packTokens), or else a row of its
    own (a budget the planner derived from the data check's counts, which may be estimates)."""
    groups: list[list[int]] = []
    used, has_visual = 0, False
    for i, (n, vis) in enumerate(zip(lengths, visual)):
        if n > budget and strict:
            name = names[i] if names else str(i)
            raise DataError(
                f"sample '{name}' is {n} tokens, over the packed row of {budget} tokens (data.packTokens or the "
                f"plan's pack_tokens); raise data.packTokens, lower data.maxTokens so the data check refuses it, or "
                f"shorten the sample", kind="over token budget")
        cost = used + n + (0 if (has_visual or vis) else extra)
        if groups and cost <= budget:
            groups[-1].append(i)
            used += n
            has_visual = has_visual or vis
        else:
            groups.append([i])
            used, has_visual = n, vis
    return groups


def _concat(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Join the pieces of one sample: token columns end to end (zeros where a piece lacks one), visual ones stacked."""
    keys = list(dict.fromkeys(k for p in parts for k in p))
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        if key in _PER_TOKEN or key == "labels":
            cols = [p[key] if key in p else torch.zeros_like(p["input_ids"]) for p in parts]
            out[key] = torch.cat(cols)
        else:
            out[key] = torch.cat([p[key] for p in parts if key in p], dim=0)
    return out
