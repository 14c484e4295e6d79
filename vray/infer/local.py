"""Local inference without a server: `vray.load(run)` then `model(image, prompt)`.

```python
import vray

model = vray.load("~/vray-runs/my-run")              # best checkpoint; on the GPU when there is one
answer = model("street.jpg", "Locate the red car.")   # a path, data: URL, PIL image, or URL of an allowed host
print(answer.text, answer.boxes)                      # boxes in the image's own pixels (grounding runs)
```
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from vray.errors import VrayError


@dataclass(frozen=True)
class Answer:
    """A model's answer to one image and prompt."""

    text: str
    boxes: list[dict[str, Any]] = field(default_factory=list)  # [{label, bbox: [x0, y0, x1, y1]}], image pixels
    prompt_tokens: int = 0
    completion_tokens: int = 0


def _image_url(image: Any) -> str:
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    text = str(image)
    if text.startswith(("data:", "http://", "https://")):
        return text
    path = Path(text).expanduser()
    if not path.is_file():
        raise VrayError(f"image {text!r}: no such file")
    return "data:image;base64," + base64.b64encode(path.read_bytes()).decode()


class LocalModel:
    """A run (or checkpoint, or model) loaded in this process."""

    def __init__(self, engine: Any):
        self.engine = engine

    @property
    def task(self) -> str | None:
        """The run's task (grounding answers carry boxes)."""
        return self.engine.target.task

    def __call__(self, image: Any, prompt: str, **generation: Any) -> Answer:
        """Answer `prompt` about `image` (None for text only). Generation keys: max_tokens, temperature, top_p,
        top_k, repetition_penalty (default: the run's evaluation settings)."""
        content: list[dict[str, Any]] = []
        if image is not None:
            content.append({"type": "image_url", "image_url": {"url": _image_url(image)}})
        content.append({"type": "text", "text": prompt})
        return self.chat([{"role": "user", "content": content}], **generation)

    def chat(self, messages: list[dict[str, Any]], **generation: Any) -> Answer:
        """Answer OpenAI-format messages."""
        template = generation.pop("chat_template_kwargs", None)
        result = self.engine.chat(messages, chat_template_kwargs=template, **generation)
        return Answer(result.text, result.boxes, result.prompt_tokens, result.completion_tokens)


def load(run: str, device: str | None = None, quantize: str | None = None, architecture: str | None = None,
         task: str | None = None, allowed_image_hosts: list[str] | tuple[str, ...] = ()) -> LocalModel:
    """Load a run directory's best (else latest) checkpoint, a checkpoint, a merged export or a base model.

    `device`: "cuda" when available, else "cpu"; `quantize`: "8bit" or "4bit" (bitsandbytes) for small GPUs;
    `allowed_image_hosts`: the host names http(s) image URLs may come from (none by default: paths, data: URLs
    and PIL images need none)."""
    from vray.infer.engine import ModelEngine
    from vray.infer.requests import UNBOUNDED
    from vray.infer.target import resolve_target

    if isinstance(allowed_image_hosts, str):
        raise VrayError(f"allowed_image_hosts: a list of host names, not the string {allowed_image_hosts!r}")
    target = resolve_target(str(Path(run).expanduser()) if "://" not in run else run, architecture=architecture, task=task)
    return LocalModel(ModelEngine(target, device=device, allowed_image_hosts=tuple(allowed_image_hosts),
                                  limits=UNBOUNDED, quantize=quantize))
