"""The transformers generation engine behind the server, usable on its own for local inference.

`ModelEngine(target)` loads the base model (and the LoRA adapter, if any) and the processor once;
`chat(messages, ...)` takes OpenAI-format messages (text and `image_url` parts with data: URLs or base64)
and returns the completion text, the boxes of a grounding answer (original-image pixels) and usage counts.
"""

from __future__ import annotations

import base64
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from vray.data.boxes import parse_answer
from vray.data.collate import Collator, image_geometry
from vray.data.media import load_image
from vray.errors import RequestError
from vray.models.generate import GenerationSettings, generate_texts
from vray.models.loader import load_model, load_processor, resolve_source
from vray.serve.target import ServeTarget


@dataclass
class ChatResult:
    """One completion."""

    text: str
    boxes: list[dict[str, Any]] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"


def _image_from_part(part: dict[str, Any], index: int, allowed_hosts: tuple[str, ...]) -> Any:
    value = part.get("image_url")
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise RequestError(f"messages: image part {index} has no image_url.url")
    if url.startswith("data:"):
        return load_image(url)
    if url.startswith(("http://", "https://")):
        host = url.split("/", 3)[2].split("@")[-1].split(":")[0]
        if host not in allowed_hosts:
            raise RequestError(
                f"messages: image URL host {host!r} is not allowed; send the image as a data: URL "
                "(or ask the operator to allow the host)"
            )
        return load_image(url)
    try:  # bare base64
        raw = base64.b64decode(url, validate=True)
    except Exception:  # noqa: BLE001
        raise RequestError(f"messages: image part {index} is neither a data: URL, an allowed http(s) URL, nor base64") from None
    return load_image("data:image/png;base64," + base64.b64encode(raw).decode())


def convert_messages(messages: list[dict[str, Any]], default_system: str | None,
                     allowed_hosts: tuple[str, ...] = ()) -> tuple[list[dict[str, Any]], list[Any]]:
    """OpenAI messages -> (chat-template messages, images in order); the run's system prompt when none is given."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages: a non-empty list of {role, content} is required")
    out: list[dict[str, Any]] = []
    images: list[Any] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in ("system", "user", "assistant"):
            raise RequestError(f"messages[{i}]: role must be system, user or assistant")
        content = msg.get("content")
        if isinstance(content, str):
            out.append({"role": msg["role"], "content": content if msg["role"] != "user" else [{"type": "text", "text": content}]})
            continue
        if not isinstance(content, list):
            raise RequestError(f"messages[{i}].content: a string or a list of parts is required")
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append({"type": "text", "text": str(part.get("text", ""))})
            elif kind == "image_url":
                try:
                    images.append(_image_from_part(part, j, allowed_hosts))
                except RequestError:
                    raise
                except Exception as exc:  # noqa: BLE001 - an undecodable image is the caller's error
                    raise RequestError(f"messages[{i}].content[{j}]: {exc}") from None
                parts.append({"type": "image"})
            else:
                raise RequestError(f"messages[{i}].content[{j}]: part type {kind!r} is not supported; use text or image_url")
        if msg["role"] != "user":
            text = "".join(p.get("text", "") for p in parts if p["type"] == "text")
            out.append({"role": msg["role"], "content": text})
        else:
            out.append({"role": "user", "content": parts})
    if out[0]["role"] != "system" and default_system:
        out.insert(0, {"role": "system", "content": default_system})
    if out[-1]["role"] != "user":
        raise RequestError("messages: the last message must come from the user")
    return out, images


class ModelEngine:
    """A loaded model and processor for one ServeTarget; thread-safe `chat`."""

    def __init__(self, target: ServeTarget, device: str | None = None, allowed_image_hosts: tuple[str, ...] = ()):
        self.target = target
        self.arch = target.arch
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.allowed_image_hosts = allowed_image_hosts
        precision = "BFloat16" if self.device.type == "cuda" else "Float32"
        base = resolve_source(target.base_source)
        weights = target.weights or base
        self.processor = load_processor(target.adapter or weights)
        model = load_model(weights, self.arch, precision, target.quantization if target.adapter else None,
                           device=self.device)
        if target.adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, target.adapter)
        model.eval()
        self.model = model
        self.collator = Collator(self.processor, self.arch, target.system_prompt)
        self._lock = threading.Lock()

    def settings(self, overrides: dict[str, Any]) -> GenerationSettings:
        """The run's evaluation settings with a request's own values on top."""
        g = self.target.generation
        base = GenerationSettings.from_evaluation(g)
        values = {
            "max_new_tokens": overrides.get("max_tokens") or overrides.get("max_completion_tokens") or base.max_new_tokens,
            "temperature": base.temperature if overrides.get("temperature") is None else overrides["temperature"],
            "top_p": base.top_p if overrides.get("top_p") is None else overrides["top_p"],
            "top_k": base.top_k if overrides.get("top_k") is None else overrides["top_k"],
            "repetition_penalty": base.repetition_penalty if overrides.get("repetition_penalty") is None else overrides["repetition_penalty"],
        }
        checks = [
            ("max_tokens", values["max_new_tokens"], lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
            ("temperature", values["temperature"], lambda v: isinstance(v, (int, float)) and v >= 0, ">= 0 (0 is greedy)"),
            ("top_p", values["top_p"], lambda v: isinstance(v, (int, float)) and 0 < v <= 1, "in (0, 1]"),
            ("top_k", values["top_k"], lambda v: isinstance(v, int) and v >= 0, "an integer >= 0"),
            ("repetition_penalty", values["repetition_penalty"], lambda v: isinstance(v, (int, float)) and v > 0, "> 0"),
        ]
        for name, value, ok, allowed in checks:
            if not ok(value):
                raise RequestError(f"{name}: got {value!r}; must be {allowed}")
        return GenerationSettings(**values)

    def chat(self, messages: list[dict[str, Any]], chat_template_kwargs: dict[str, Any] | None = None,
             want_boxes: bool | None = None, **params: Any) -> ChatResult:
        """Answer one conversation; grounding runs (or `want_boxes`) also get the answer's boxes."""
        settings = self.settings(params)
        converted, images = convert_messages(messages, self.target.system_prompt, self.allowed_image_hosts)
        prompt = self.processor.apply_chat_template(converted, add_generation_prompt=True, tokenize=False,
                                                    **(chat_template_kwargs or {}))
        try:
            inputs = self.processor(text=[prompt], images=images or None, return_tensors="pt")
        except Exception as exc:  # noqa: BLE001 - a mismatch of placeholders and images, an odd image size
            raise RequestError(f"messages: the processor rejected the input ({exc})") from None
        batch = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        with self._lock, torch.no_grad():
            texts, counts = generate_texts(self.model, self.processor.tokenizer, batch, settings)
        text = texts[0]
        result = ChatResult(text=text, prompt_tokens=int(batch["input_ids"].shape[1]), completion_tokens=counts[0],
                            finish_reason="length" if counts[0] >= settings.max_new_tokens else "stop")
        if want_boxes is None:
            want_boxes = self.target.task == "phrase_grounding"
        if want_boxes and images:
            geo = image_geometry(self.processor, self.arch, images[0])
            result.boxes = [{"label": b.label, "bbox": [round(c, 1) for c in b.bbox]}
                            for b in parse_answer(text, self.arch.box_convention, geo)]
        return result

    def ground(self, image: Any, phrase: str, **params: Any) -> ChatResult:
        """Boxes for a phrase on one image (original-image pixels)."""
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                 {"type": "text", "text": f"Locate the {phrase}."}]}]
        return self.chat(messages, want_boxes=True, **params)
