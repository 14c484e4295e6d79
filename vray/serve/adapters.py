"""Which LoRA adapters a deployment may load on its base: named runs, or the runs under one folder or S3 prefix."""

from __future__ import annotations

from dataclasses import dataclass, field

from vray.errors import RequestError, VrayError
from vray.serve.options import ADAPTER_NAME


def _same_source(a: str, b: str) -> bool:
    return a.rstrip("/") == b.rstrip("/")


@dataclass
class AdapterCatalog:
    """Adapter name -> local adapter folder, checked against the deployment's base."""

    base_source: str
    named: dict[str, str] = field(default_factory=dict)
    folder: str | None = None
    full_weights: bool = False  # the deployment serves fine-tuned weights, not the base the adapters were trained on

    def names(self) -> list[str]:
        """The adapters this deployment can load: the named ones and the run directories under `folder`."""
        names = set(self.named)
        if self.folder:
            from vray.storage.rundir import RunDir

            root = RunDir.of(self.folder)
            for child in root.listdir():
                if ADAPTER_NAME.match(child) and RunDir.of(root.join(child)).exists("spec.yaml"):
                    names.add(child)
        return sorted(names)

    def location(self, name: str) -> str:
        """Where adapter `name` lives; a 404 RequestError when it is not known."""
        if not ADAPTER_NAME.match(name):
            raise RequestError(f"model: adapter name {name!r} may use letters, digits, '.', '_' and '-' only", status=400)
        if name in self.named:
            return self.named[name]
        if self.folder:
            from vray.storage.rundir import RunDir

            where = RunDir.of(self.folder).join(name)
            if RunDir.of(where).exists("spec.yaml"):
                return where
        known = ", ".join(self.names()) or "none"
        raise RequestError(f"model: no adapter named {name!r} on this deployment (adapters: {known})", status=404)

    def resolve(self, name: str) -> str:
        """The local folder of adapter `name`, after checking that it is a LoRA of this deployment's base."""
        from vray.infer.target import resolve_target

        where = self.location(name)
        if self.full_weights:
            raise RequestError(f"model: this deployment serves full fine-tuned weights, not the base {self.base_source}; "
                               f"serve adapter {name!r} from a deployment of its base", status=400)
        try:
            target = resolve_target(where)
        except VrayError as exc:
            raise RequestError(f"model: adapter {name!r} cannot be loaded: {exc}", status=404) from None
        if not target.adapter:
            raise RequestError(f"model: {name!r} holds full weights, not a LoRA adapter; serve it as its own deployment",
                               status=400)
        if not _same_source(target.base_source, self.base_source):
            raise RequestError(f"model: adapter {name!r} was trained on {target.base_source}, but this deployment "
                               f"serves {self.base_source}; deploy it on its own base", status=400)
        if target.quantization:
            raise RequestError(f"model: adapter {name!r} is a QLoRA adapter (trained on a 4-bit base); serve it as its "
                               "own deployment, or merge it with `vray export --merge`", status=400)
        return target.adapter
