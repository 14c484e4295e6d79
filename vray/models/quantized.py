"""4-bit (bitsandbytes) layers kept in the one layout that training, evaluation, serving and merging all read.

On a CPU with AVX512-BF16, bitsandbytes' `Linear4bit.forward` rewrites a layer's weight in place into a layout for
fast CPU inference whenever the layer runs in eval mode without gradients (it marks the layer's
`quant_state.packing_format_for_cpu`). That is exactly how vray evaluates and generates. The rewritten layer is
unusable afterwards for what vray does next:
- training: the autograd path cannot run on the packed layout ("a view of a leaf Variable that requires grad is
  being used in an in-place operation" at the next training step);
- merging: `dequantize()` reads the packed codes as if they were the original ones;
- restoring: bitsandbytes' inverse is lossy. The 4-bit codes come back, but absmax has been rounded through
  bfloat16 and the double-quant statistics are quantized again; without double quantization absmax even stays
  bfloat16 and transposed. The dequantized weights then differ from the ones the adapter was trained on (by up to
  0.02 with double quantization, by up to 2 without, on a random 256 x 512 NF4 weight).

So vray keeps bitsandbytes from repacking at all rather than undoing it: every 4-bit layer's
`support_avx512bf16_for_cpu` (the switch bitsandbytes checks before repacking) is cleared when vray loads a model,
and again on entry to every evaluation and generation, since code outside vray may have set it since. This also keeps
one set of numerics for evaluation during training, `vray eval`, serving and the merged export. CPU 4-bit inference
then runs bitsandbytes' generic dequantize path; GPUs never take the repack path.
"""

from __future__ import annotations

from torch import nn

from vray.errors import VrayError

REPACK_SWITCH = "support_avx512bf16_for_cpu"


def _repacked(module: nn.Module) -> bool:
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def repacked_layers(model: nn.Module) -> list[str]:
    """The names of the model's 4-bit layers that bitsandbytes has repacked for CPU inference."""
    return [name for name, module in model.named_modules() if _repacked(module)]


def keep_4bit_layout(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking the model's 4-bit layers for CPU inference; returns how many layers had the
    repack switched on. Raises when a layer was already repacked (outside vray): its weights can no longer be
    trained or merged exactly, and the model has to be loaded again."""
    switched, repacked = 0, False
    for module in model.modules():  # every generation passes here: names are built only for the error
        if getattr(module, REPACK_SWITCH, False):
            setattr(module, REPACK_SWITCH, False)
            switched += 1
        repacked = repacked or _repacked(module)
    if repacked:
        raise VrayError(
            f"{repacked_layers(model)[0]}: this 4-bit layer was repacked by bitsandbytes for CPU inference (it ran in "
            "eval mode without gradients before vray saw it); its weights cannot be trained or merged exactly. Load "
            "the model again through vray (vray.models.loader.load_model)"
        )
    return switched
