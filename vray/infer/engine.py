"""The transformers generation engine behind the server, usable on its own for local inference.

`ModelEngine(target)` loads the base model (and the LoRA adapter, if any) and the processor once.
`prepare(messages, ...)` encodes one OpenAI-format request that `vray.infer.requests` has checked; `generate([...])` answers several prepared requests in left-padded
batches (grouped by adapter and sampling settings); `stream(prepared)` yields text as it is generated. Generations
from several threads take turns on the model one token at a time (`vray.infer.turns`), so a stream does not hold
back a batch. Extra LoRA adapters of the same base are loaded and dropped by name (`load_adapter`,
`unload_adapter`), and stay loaded while a request that uses them runs (`hold`).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from PIL import Image

from vray.data.boxes import parse_answer
from vray.data.collate import Collator, Encoded, image_geometry, sample_tensors
from vray.errors import RequestError, VrayError
from vray.infer.requests import DEFAULT_LIMITS, Limits, convert_messages, template_switches
from vray.infer.target import ServeTarget
from vray.infer.turns import Turns
from vray.models.generate import GenerationSettings, generate_texts
from vray.models.loader import load_model, load_processor, resolve_source
from vray.spec import QuantizationBlock

DEFAULT_ADAPTER = "default"  # the adapter name of a run's own LoRA weights


def _peft_name(name: str) -> str:
    """peft keeps adapters in torch ModuleDicts, whose keys may not contain '.', and 'default' is the run's own:
    extra adapters get a stable name of their own."""
    import hashlib

    return "extra_" + hashlib.sha1(name.encode()).hexdigest()[:16]


def grounding_messages(image: Any, phrase: str) -> list[dict[str, Any]]:
    """The OpenAI-format conversation that asks for the boxes of `phrase` on one image (a URL, data: URL or base64)."""
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                         {"type": "text", "text": f"Locate the {phrase}."}]}]


@dataclass
class ChatResult:
    """One completion."""

    text: str
    boxes: list[dict[str, Any]] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"


@dataclass(frozen=True)
class RequestFailure:
    """A request that got no answer: what to tell the client, and the HTTP status it maps to."""

    message: str
    status: int

    @classmethod
    def of(cls, exc: Exception) -> RequestFailure:
        """The failure of a request that raised `exc`: the client's mistake (4xx) or the server's (500)."""
        if isinstance(exc, RequestError):
            return cls(str(exc), exc.status)
        if isinstance(exc, VrayError):
            return cls(str(exc), 400)
        return cls(f"generation failed: {type(exc).__name__}: {exc}", 500)


@dataclass
class Prepared:
    """A checked, encoded request waiting for generation."""

    tensors: dict[str, torch.Tensor]  # per-token tensors 1-D (unpadded), visual tensors as the processor gave them
    images: list[Image.Image]
    settings: GenerationSettings
    want_boxes: bool
    adapter: str | None = None  # an extra adapter's name; None is the target's own weights

    @property
    def prompt_tokens(self) -> int:
        return int(self.tensors["input_ids"].shape[0])


def _load_quantized(weights: Any, arch: Any, device: torch.device, quantize: str) -> Any:
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    from vray.models import register_families

    register_families()
    if quantize == "8bit":
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(arch.vision_modules + arch.projector_modules) + ["lm_head"])
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        return AutoModelForImageTextToText.from_pretrained(weights, dtype=dtype, quantization_config=config,
                                                           device_map={"": device})
    precision = "BFloat16" if device.type == "cuda" else "Float32"
    return load_model(weights, arch, precision, QuantizationBlock(enabled=True, type="NF4"), device=device)


class ModelEngine:
    """A loaded model and processor for one ServeTarget; thread-safe."""

    def __init__(self, target: ServeTarget, device: str | None = None, allowed_image_hosts: tuple[str, ...] = (),
                 limits: Limits = DEFAULT_LIMITS, quantize: str | None = None, device_map: str | None = None):
        if quantize not in (None, "8bit", "4bit"):
            raise VrayError(f"quantize: {quantize!r} is not one of 8bit, 4bit")
        self.target = target
        self.arch = target.arch
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.allowed_image_hosts = tuple(allowed_image_hosts)
        self.limits = limits
        weights = target.weights or resolve_source(target.base_source)  # full weights need no base model
        # images resized as the run trained on them (by default at most the family's default size), and to at most
        # the visual tokens one request's image may have
        self.processor = load_processor(target.adapter or weights, target.media, limits.processor_pixels(self.arch),
                                        arch=self.arch)
        self.processor.tokenizer.padding_side = "left"
        # no token spells more characters than the longest in the vocabulary: bounds a prompt before tokenizing
        self.chars_per_token = max(map(len, self.processor.tokenizer.get_vocab()), default=1)
        if quantize and not target.quantization:
            model = _load_quantized(weights, self.arch, self.device, quantize)
        elif device_map:  # a replica that spans several GPUs: accelerate places the layers
            from transformers import AutoModelForImageTextToText

            from vray.models import register_families

            register_families()
            model = AutoModelForImageTextToText.from_pretrained(weights, dtype=torch.bfloat16, device_map=device_map)
        else:
            precision = "BFloat16" if self.device.type == "cuda" else "Float32"
            model = load_model(weights, self.arch, precision, target.quantization if target.adapter else None,
                               device=self.device)
        if target.adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, target.adapter, adapter_name=DEFAULT_ADAPTER)
        model.eval()
        self.model = model
        self.collator = Collator(self.processor, self.arch, target.system_prompt)
        self.adapters: dict[str, str] = {}  # extra adapters loaded now: name -> folder
        self._holds: Counter[str] = Counter()  # extra adapter -> its loads and the requests using it
        self._book = threading.Lock()  # adapters and _holds (quick updates only)
        self._changing = threading.Lock()  # one adapter load or drop at a time
        self._turns = Turns(self._set_mode)
        self.generated_tokens = 0  # tokens generated on this engine, cancelled requests included

    # ---- requests --------------------------------------------------------------------------------
    def settings(self, overrides: dict[str, Any]) -> GenerationSettings:
        """The run's evaluation settings with a request's own values on top."""
        base = GenerationSettings.from_evaluation(self.target.evaluation)
        max_tokens = overrides.get("max_tokens")
        if max_tokens is None:
            max_tokens = overrides.get("max_completion_tokens")
        values = {
            "max_new_tokens": base.max_new_tokens if max_tokens is None else max_tokens,
            "temperature": base.temperature if overrides.get("temperature") is None else overrides["temperature"],
            "top_p": base.top_p if overrides.get("top_p") is None else overrides["top_p"],
            "top_k": base.top_k if overrides.get("top_k") is None else overrides["top_k"],
            "repetition_penalty": base.repetition_penalty if overrides.get("repetition_penalty") is None else overrides["repetition_penalty"],
        }
        number = (int, float)
        checks = [
            ("max_tokens", values["max_new_tokens"], lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an integer >= 1"),
            ("temperature", values["temperature"], lambda v: isinstance(v, number) and 0 <= v <= 2, "in [0, 2] (0 is greedy)"),
            ("top_p", values["top_p"], lambda v: isinstance(v, number) and 0 < v <= 1, "in (0, 1]"),
            ("top_k", values["top_k"], lambda v: isinstance(v, int) and v >= 0, "an integer >= 0 (0 is off)"),
            ("repetition_penalty", values["repetition_penalty"], lambda v: isinstance(v, number) and v > 0, "> 0 (1.0 is off)"),
        ]
        for name, value, ok, allowed in checks:
            if not ok(value):
                raise RequestError(f"{name}: got {value!r}; must be {allowed}")
        return GenerationSettings(**values)

    def prepare(self, messages: Any, chat_template_kwargs: dict[str, Any] | None = None,
                want_boxes: bool | None = None, adapter: str | None = None, **params: Any) -> Prepared:
        """Check and encode one request; every problem is a RequestError naming the field. The encoded prompt
        plus `max_tokens` must fit in the limits' `max_model_len`, checked here, before any generation."""
        settings = self.settings(params)
        switches = template_switches(chat_template_kwargs)
        default = params.get("max_tokens") is None and params.get("max_completion_tokens") is None
        self.limits.check_max_tokens(settings.max_new_tokens, default)
        converted, images = convert_messages(messages, self.target.system_prompt, self.allowed_image_hosts, self.limits)
        self.limits.check_text(sum(len(m["content"]) if isinstance(m["content"], str) else
                                   sum(len(part.get("text", "")) for part in m["content"]) for m in converted),
                               self.chars_per_token)
        try:
            prompt = self.processor.apply_chat_template(converted, add_generation_prompt=True, tokenize=False,
                                                        **switches)
            out = self.processor(text=[prompt], images=images or None, return_tensors="pt")
        except Exception as exc:  # noqa: BLE001 - an odd image size, a template that refuses the conversation
            raise RequestError(f"messages: the processor rejected the input ({type(exc).__name__}: {exc})") from None
        tensors = sample_tensors(out)
        allowed = self.limits.check_length(int(tensors["input_ids"].shape[0]), settings.max_new_tokens, default)
        if allowed != settings.max_new_tokens:
            settings = replace(settings, max_new_tokens=allowed)
        if want_boxes is None:
            want_boxes = self.target.task == "phrase_grounding"
        return Prepared(tensors, images, settings, bool(want_boxes and images), adapter)

    def _finish(self, prepared: Prepared, text: str, count: int) -> ChatResult:
        result = ChatResult(text=text, prompt_tokens=prepared.prompt_tokens, completion_tokens=count,
                            finish_reason="length" if count >= prepared.settings.max_new_tokens else "stop")
        if prepared.want_boxes:
            geo = image_geometry(self.processor, self.arch, prepared.images[0])
            result.boxes = [{"label": b.label, "bbox": [round(c, 1) for c in b.bbox]}
                            for b in parse_answer(text, self.arch.box_convention, geo)]
        return result

    def _batch(self, group: list[Prepared]) -> dict[str, torch.Tensor]:
        return self.collator.batch([Encoded(p.tensors, [], "") for p in group], left_pad=True)

    # ---- generation ------------------------------------------------------------------------------
    def _generate_group(self, group: list[Prepared], streamer: Any = None,
                        stop: threading.Event | None = None) -> list[ChatResult]:
        """One batch of requests that share an adapter and settings. It takes turns on the model with the other
        generations a step at a time (vray.infer.turns) and stops at the next step once `stop` is set."""
        adapter, settings = group[0].adapter, group[0].settings
        batch = self._batch(group)
        with self.holding(adapter), self._turns.turn(adapter) as step_done, torch.no_grad():
            def on_step(grew: int) -> bool:
                self.generated_tokens += grew  # inside the turn, so one generation counts at a time
                step_done()
                return stop is not None and stop.is_set()

            texts, counts = generate_texts(self.model, self.processor.tokenizer, batch, settings, streamer=streamer,
                                           on_step=on_step)
        return [self._finish(p, text, count) for p, text, count in zip(group, texts, counts)]

    def generate(self, requests: list[Prepared]) -> list[ChatResult | RequestFailure]:
        """Answers in request order; requests sharing an adapter and sampling settings run as one batch. A batch
        that fails answers each of its requests with the RequestFailure; the other batches are answered."""
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, p in enumerate(requests):
            groups.setdefault((p.adapter, p.settings), []).append(i)
        results: list[ChatResult | RequestFailure] = [RequestFailure("no answer", 500)] * len(requests)
        for indices in groups.values():
            group = [requests[i] for i in indices]
            try:
                answers: list[ChatResult | RequestFailure] = list(self._generate_group(group))
            except Exception as exc:  # noqa: BLE001 - one group's failure is its own requests' answer
                answers = [RequestFailure.of(exc)] * len(group)
            for i, answer in zip(indices, answers):
                results[i] = answer
        return results

    def stream(self, prepared: Prepared, stop: threading.Event | None = None) -> Iterator[str | ChatResult]:
        """Text pieces as they are generated, then the finished ChatResult. Generation stops at the next token once
        `stop` is set, or once the caller closes this iterator before its end."""
        from transformers import TextIteratorStreamer

        stop = stop or threading.Event()
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                outcome["result"] = self._generate_group([prepared], streamer, stop)[0]
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                outcome["error"] = exc
                streamer.end()

        thread = threading.Thread(target=work, name="vray-stream", daemon=True)
        thread.start()
        try:
            for piece in streamer:
                if piece:
                    yield piece
        except GeneratorExit:
            stop.set()
            raise
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        yield outcome["result"]

    def chat(self, messages: Any, chat_template_kwargs: dict[str, Any] | None = None,
             want_boxes: bool | None = None, adapter: str | None = None, **params: Any) -> ChatResult:
        """Answer one conversation; grounding runs (or `want_boxes`) also get the answer's boxes."""
        prepared = self.prepare(messages, chat_template_kwargs, want_boxes, adapter, **params)
        return self._generate_group([prepared])[0]

    def ground(self, image: Any, phrase: str, adapter: str | None = None, **params: Any) -> ChatResult:
        """Boxes for a phrase on one image (original-image pixels)."""
        return self.chat(grounding_messages(image, phrase), want_boxes=True, adapter=adapter, **params)

    # ---- adapters --------------------------------------------------------------------------------
    def _set_mode(self, adapter: str | None) -> None:
        """Activate an extra adapter, else the target's own weights (its adapter, or the bare base); called by a
        generation's turn."""
        from peft import PeftModel

        if not isinstance(self.model, PeftModel):
            return
        if adapter is None and not self.target.adapter:
            self.model.base_model.disable_adapter_layers()
            return
        self.model.base_model.enable_adapter_layers()
        self.model.set_adapter(DEFAULT_ADAPTER if adapter is None else _peft_name(adapter), inference_mode=True)

    def hold(self, adapter: str | None) -> None:
        """Keep extra adapter `adapter` loaded until the matching `unload_adapter` (a request that will use it);
        None holds nothing. A 503 RequestError when it is not loaded."""
        if adapter is None:
            return
        with self._book:
            if adapter not in self.adapters:
                raise RequestError(f"model: adapter {adapter!r} is not loaded on this replica", status=503)
            self._holds[adapter] += 1

    @contextmanager
    def holding(self, adapter: str | None) -> Iterator[None]:
        """`hold(adapter)` for the duration of the block."""
        self.hold(adapter)
        try:
            yield
        finally:
            if adapter is not None:
                self.unload_adapter(adapter)

    def load_adapter(self, name: str, folder: str) -> None:
        """Add a LoRA adapter of the same base under `name`. Loads are counted like holds: the adapter stays until
        each load and hold has had its `unload_adapter`."""
        from peft import PeftModel

        with self._changing:
            with self._book:
                if name in self.adapters:
                    self._holds[name] += 1
                    return
            with self._turns.exclusive():
                if isinstance(self.model, PeftModel):
                    self.model.load_adapter(folder, adapter_name=_peft_name(name))
                else:
                    self.model = PeftModel.from_pretrained(self.model, folder, adapter_name=_peft_name(name))
                self.model.eval()
            with self._book:
                self.adapters[name] = folder
                self._holds[name] = 1

    def unload_adapter(self, name: str) -> None:
        """Release one load or hold of `name`; the last one drops the adapter and frees its weights."""
        with self._changing:
            with self._book:
                if name not in self.adapters:
                    return
                self._holds[name] -= 1
                if self._holds[name] > 0:
                    return
                del self._holds[name], self.adapters[name]
            with self._turns.exclusive():
                self.model.delete_adapter(_peft_name(name))
                left = list(self.model.peft_config)
                if not left:  # the base's last extra adapter: back to the plain base
                    self.model = self.model.unload()
                elif self.model.active_adapter not in left:  # peft keeps naming the deleted one
                    self.model.set_adapter(left[0], inference_mode=True)
