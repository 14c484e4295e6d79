"""vray: fine-tune and serve vision-language models on Ray."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load(run: str, device: str | None = None, quantize: str | None = None, architecture: str | None = None,
         task: str | None = None, allowed_image_hosts: list[str] | tuple[str, ...] = ()) -> Any:
    """A run (best checkpoint), checkpoint, merged export or base model loaded for local inference; see vray.infer.
    `allowed_image_hosts`: the hosts http(s) image URLs may come from."""
    from vray.infer.local import load as _load

    return _load(run, device=device, quantize=quantize, architecture=architecture, task=task,
                 allowed_image_hosts=allowed_image_hosts)
