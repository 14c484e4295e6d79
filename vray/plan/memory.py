"""The architecture-to-VRAM model: predicted bytes per GPU of one training layout.

Per GPU, for a strategy sharding over S ranks (S = 1 for ddp, the data-parallel size for ZeRO / FSDP2,
the GPUs of a node for fsdp2-hybrid), with p the bytes of the run's precision (2 for BFloat16 / Float16,
4 for Float32) and T the trainable parameters:

- weights: frozen parameters at p (NF4 / FP4 Linear weights at 0.5 byte plus their quantization
  constants under QLoRA); trainable parameters at 4 bytes under ddp (fp32 master weights, bf16 autocast)
  and fsdp2 (fp32 shards, bf16 compute), at p under DeepSpeed (bf16 module). ZeRO-3 and FSDP2 divide all
  weights by S; ZeRO-3-offload keeps none on the GPU. LoRA adapters are fp32 (peft keeps them so).
- gradients: one per trainable parameter in its dtype (/S from ZeRO-2); DeepSpeed adds fp32 gradient
  partitions (4T/S) for the mixed-precision step.
- optimizer: AdamW / Adam two fp32 moments (8 bytes), SGD one (4), Adafactor factored second moments;
  DeepSpeed adds fp32 master weights (4T) under mixed precision; /S from ZeRO-1; torch optimizers keep a
  4-byte step counter per tensor.
- activations: one micro-batch of the planned sample (the data's largest, or a packed row; see SampleShape)
  through every decoder layer, per layer type (full attention, gated attention, Gated DeltaNet as its fused
  kernels run it, dense or MoE MLP), the LoRA adapters' saved tensors, and the label-only loss. Adapters run in
  the compute dtype under autocast over fp32 master weights, so an adapted Linear saves no fp32 copy of its
  input (it shares the base Linear's): only the rank-wide output of A at p and, with dropout, the dropped
  input at p plus its mask. The loss never holds full-vocabulary logits: it gathers the hidden rows of the
  label positions (at most every token; the plan takes all) and their gradient at p, and builds
  `loss_chunk_rows(vocab)` rows of fp32 logits at a time (vray.models.loss_chunks): the chunk's fp32 logits,
  their fp32 gradient and the matmul's output at p. Gradient checkpointing `every:k` recomputes every k-th
  decoder layer (layers 0, k, 2k, ...: ceil(L / k) of L; k = 1 is all of them): a recomputed layer keeps only
  its input (hidden x p per token), the other k - 1 of every k keep all they save, and the backward holds one
  recomputed layer at a time (with the running gradient of the hidden states, 2 x hidden x p per token) on top;
  the loss's chunks are freed before that, so the step's peak takes the larger of the two, not their sum. Vision blocks that train are counted in full (an upper bound when they are
  checkpointed too). The frozen vision tower
  saves nothing for backward; its forward peak counts when it exceeds the language model's.
- other: a stated framework overhead (256 MiB of allocator slack and workspaces) plus each engine's
  buffers: DeepSpeed communication buckets, ZeRO-3 live and prefetched parameters, FSDP2's unsharded
  working set (see fsdp2_buffer_bytes).

FSDP2 gradients stay sharded: the engine reduce-scatters on every micro-batch (for fsdp2-hybrid only the
cross-node all-reduce waits for the last one), so accumulation adds no unsharded gradient; only the unit
being reduced holds its full gradient for a moment, counted in the buffers.

The load-time peak (load_peak) is a second figure, per GPU and per host: what the loader holds while it
builds the model, before the first step. The fit test adds a margin of 5% of the GPU's memory plus 1 GiB
(CUDA context, NCCL, fragmentation) to the step peak and to the load peak per GPU; the load peak per host
must be within the node's CPU memory.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, replace
from functools import lru_cache

from vray.archs.registry import LoraSelection, lora_selection
from vray.archs.vision import image_grid, visual_grid
from vray.models.loss_chunks import loss_chunk_rows
from vray.models.sharded import LOAD_CHUNK_BYTES
from vray.plan.profile import ArchProfile

MIB = 1024**2
GIB = 1024**3
FRAMEWORK_OVERHEAD = 256 * MIB
MARGIN_SHARE = 0.05
MARGIN_FIXED = 1 * GIB
QUANT_BLOCK = 64  # bitsandbytes 4-bit block size
QUANT_NESTED_BLOCK = 256  # double quantization groups 256 absmax values
QUANT_FIXED_BYTES = 256 * 4 + 16 * 4 + 4  # per quantized Linear: nested code table, 4-bit code table, offset
DS_BUCKET = 200_000_000  # DeepSpeed reduce / all-gather bucket (elements) vray configures


@dataclass(frozen=True)
class MemoryBreakdown:
    """Predicted bytes per GPU."""

    weights: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0
    other: int = 0

    @property
    def total(self) -> int:
        """Sum of the parts."""
        return self.weights + self.gradients + self.optimizer + self.activations + self.other

    def to_dict(self) -> dict[str, int]:
        """The parts and their total."""
        return {**asdict(self), "total": self.total}


@dataclass(frozen=True)
class LoadPeak:
    """Predicted load-time peak: bytes on one GPU, and anonymous host memory of one node (all its ranks)."""

    per_gpu: int
    per_host: int

    def to_dict(self) -> dict[str, int]:
        return {"per_gpu": self.per_gpu, "per_host": self.per_host}


@dataclass(frozen=True)
class SampleShape:
    """The training sample the activation estimate assumes."""

    text_tokens: int
    images: int
    image_width: int
    image_height: int
    frames: int
    visual_tokens: int
    vision_patches: int
    sized_from: str = "assumed: no data at hand (512 text tokens + one image at the media limits)"
    sequence_tokens: int | None = None  # exact tokens of the sample (text + visual) when the data check counted them

    @property
    def sequence(self) -> int:
        """Tokens the language model sees."""
        return self.sequence_tokens if self.sequence_tokens is not None else self.text_tokens + self.visual_tokens

    def describe(self) -> dict[str, int | str]:
        """For `assumptions` in a plan."""
        media = f"{self.images} image(s) of {self.image_width}x{self.image_height} px"
        if self.frames:
            media = f"a video of {self.frames} frames of {self.image_width}x{self.image_height} px"
        if self.images > 1:
            media = f"{self.images} images of at most {self.image_width}x{self.image_height} px"
        what = f"{self.text_tokens} text tokens + {media}"
        if self.sequence_tokens is not None:
            what = f"{self.sequence_tokens} tokens with {media}"
        return {"sample": what, "sample_from": self.sized_from, "text_tokens": self.text_tokens,
                "images": self.images, "image_width": self.image_width, "image_height": self.image_height,
                "frames": self.frames, "visual_tokens": self.visual_tokens, "vision_patches": self.vision_patches,
                "sequence": self.sequence}


@dataclass(frozen=True)
class Workload:
    """The run as the memory model sees it."""

    mode: str  # "lora" | "qlora" | "full"
    precision: str  # "BFloat16" | "Float16" | "Float32"
    optimizer: str = "AdamW"
    lora_rank: int = 16
    lora_dropout: float = 0.0
    lora_regex: str | None = None
    train_vision: bool = False
    lora_scope: tuple[str, ...] = ("language",)
    lora_experts: bool = False

    @property
    def vision_trains(self) -> bool:
        """Whether anything in the vision tower trains (its activations are then kept for backward)."""
        return self.train_vision or (self.mode != "full" and "vision" in self.lora_scope)

    @property
    def p(self) -> int:
        """Bytes per element at the run's precision."""
        return 4 if self.precision == "Float32" else 2

    @property
    def mixed(self) -> bool:
        return self.precision != "Float32"


@dataclass(frozen=True)
class Layout:
    """How one run is laid out on GPUs."""

    strategy: str
    workers: int
    gpus_per_node: int
    micro_batch: int
    gradient_checkpointing: bool
    checkpoint_every: int = 1  # with gradient_checkpointing: every k-th decoder layer (and vision block) recomputed

    @property
    def checkpoint_k(self) -> int:
        """k of the checkpointing policy: 0 without checkpointing, 1 for every layer, k for every k-th."""
        return max(1, self.checkpoint_every) if self.gradient_checkpointing else 0

    @property
    def nodes(self) -> int:
        return math.ceil(self.workers / self.gpus_per_node)

    @property
    def shard(self) -> int:
        """Ranks one copy of the sharded state is spread over."""
        if self.strategy == "ddp":
            return 1
        if self.strategy == "fsdp2-hybrid":
            return min(self.workers, self.gpus_per_node)
        return self.workers


def sample_shape(profile: ArchProfile, min_pixels: int | None = None, max_pixels: int | None = None,
                 max_frames: int | None = None, text_tokens: int = 512) -> SampleShape:
    """The sample activations are planned for: one 1024x1024 image (or the media limits), 512 text tokens."""
    v = profile.vision
    pixels = 1024 * 1024
    if max_pixels:
        pixels = min(pixels, max_pixels) if not min_pixels or min_pixels <= pixels else min_pixels
    elif min_pixels and min_pixels > pixels:
        pixels = min_pixels
    frames = max_frames or 0
    if frames:
        pixels = min(pixels, 448 * 448) if not max_pixels else min(pixels, max_pixels)
    if v.kind == "nvila":  # a tiling tower: the image keeps its size, a pixel cap is a tile budget
        grid = image_grid(v, 1024, 1024, frames, max_pixels=max_pixels)
        return SampleShape(text_tokens, 0 if frames else 1, grid.width, grid.height, frames, grid.tokens, grid.patches)
    grid = visual_grid(v, pixels, frames)
    return SampleShape(text_tokens, 0 if frames else 1, grid.width, grid.height, frames, grid.tokens, grid.patches)


def data_sample_shape(profile: ArchProfile, tokens: int, images: int, sized_from: str, min_pixels: int | None = None,
                      max_pixels: int | None = None, max_frames: int | None = None, video: bool = False) -> SampleShape:
    """The sample of a checked dataset: `tokens` (text and visual, as the processor counted the longest sample) with
    `images` images per sample at most (or a video), each at most what the media limits allow (the vision tower's
    patches are sized so; the language model sees exactly `tokens`)."""
    one = sample_shape(profile, min_pixels, max_pixels, max_frames if video else None, text_tokens=0)
    count = 1 if video else images
    if count > 1 and profile.vision.kind == "nvila":  # each image of a several-image prompt is one tile
        grid = image_grid(profile.vision, one.image_width, one.image_height, alone=False)
        one = replace(one, visual_tokens=grid.tokens, vision_patches=grid.patches)
    visual = min(tokens, one.visual_tokens * count)
    patches = one.vision_patches * count if count else 0
    return SampleShape(tokens - visual, 0 if video else images, one.image_width, one.image_height,
                       one.frames if video else 0, visual, patches, sized_from, tokens)


def packed_row(sample: SampleShape, tokens: int) -> SampleShape:
    """One packed row of `tokens` tokens made of samples shaped like `sample` (its text, visual tokens and vision
    patches scaled by tokens / sample.sequence): what a packed micro-batch holds."""
    f = tokens / max(1, sample.sequence)
    visual = min(tokens, math.ceil(sample.visual_tokens * f))
    return replace(sample, text_tokens=tokens - visual, images=math.ceil(sample.images * f), visual_tokens=visual,
                   vision_patches=math.ceil(sample.vision_patches * f), sequence_tokens=tokens,
                   sized_from=f"a packed row of {tokens} tokens ({sample.sized_from})")


# ---- parameters --------------------------------------------------------------------------------------


def quantized_bytes(numel: int) -> int:
    """Bytes of one bitsandbytes 4-bit weight with double quantization: packed data plus its constants."""
    blocks = math.ceil(numel / QUANT_BLOCK)
    return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / QUANT_NESTED_BLOCK) + QUANT_FIXED_BYTES


@dataclass(frozen=True)
class ParamSplit:
    """Frozen storage bytes (unsharded) and trainable parameters of a workload."""

    frozen_bytes: int
    trainable: int
    trainable_tensors: int
    adafactor_states: int  # elements of Adafactor's factored second moments for the trainable tensors
    lora_targets: int
    base_trainable: bool  # trainables are base weights (full) rather than fp32 adapters


def _adafactor_elems(shape: tuple[int, ...]) -> int:
    if len(shape) < 2:
        return math.prod(shape)
    lead = math.prod(shape[:-2])
    return lead * shape[-2] + lead * shape[-1]


@lru_cache(maxsize=64)
def base_weight_bytes(profile: ArchProfile, p: int, four_bit: bool) -> int:
    """Bytes of a checkpoint's weights held at `p` bytes per element; with `four_bit`, as the 4-bit base of QLoRA
    (and of serving a QLoRA adapter) stores them: the language model's Linear weights in bitsandbytes 4-bit, the
    vision tower, projector, LM head, embeddings, norms and biases at `p` (vray.models.loader)."""
    quantize = {f"{lin.name}.weight" for lin in profile.linears if profile.role(lin.name) == "language"} if four_bit else set()
    return sum(quantized_bytes(t.numel) if t.name in quantize else t.numel * p for t in profile.tensors)


@lru_cache(maxsize=4096)
def param_split(profile: ArchProfile, w: Workload) -> ParamSplit:
    """Which parameters train and what the frozen ones occupy."""
    frozen = trainable = tensors = ada = 0
    if w.mode == "full":
        for t in profile.tensors:
            if profile.role(t.name) != "vision" or w.train_vision:
                trainable += t.numel
                tensors += 1
                ada += _adafactor_elems(t.shape)
            else:
                frozen += t.numel * w.p
    else:  # adapters train: every base weight is frozen, 4-bit under QLoRA
        frozen = base_weight_bytes(profile, w.p, w.mode == "qlora")
    targets = 0
    if w.mode in ("lora", "qlora"):
        selection = _lora_selection(profile, w)
        for lin in profile.linears:
            if selection.adapts(lin.name):
                targets += 1
                a, b = w.lora_rank * lin.in_features, lin.out_features * w.lora_rank
                trainable += a + b
                tensors += 2
                ada += (w.lora_rank + lin.in_features) + (lin.out_features + w.lora_rank)
        if w.lora_experts:  # peft's adapters on fused [experts, in, out] parameters: rank x experts wide
            for t in profile.tensors:
                if ".mlp.experts." in t.name and len(t.shape) == 3:
                    e, a, b = t.shape
                    trainable += w.lora_rank * e * (a + b)
                    tensors += 2
                    ada += (w.lora_rank * e + a) + (b + w.lora_rank * e)
    return ParamSplit(frozen, trainable, tensors, ada, targets, w.mode == "full")


def _lora_selection(profile: ArchProfile, w: Workload) -> LoraSelection:
    return lora_selection(w.lora_regex or "", w.lora_scope, profile.projector_prefixes, profile.vision_prefixes)


def optimizer_bytes_per_param(optimizer: str) -> float:
    """fp32 optimizer state per trainable parameter (Adafactor: see param_split.adafactor_states)."""
    return {"AdamW": 8.0, "Adam": 8.0, "SGD": 4.0}.get(optimizer, 0.0)


def static_bytes(profile: ArchProfile, w: Workload, layout: Layout) -> tuple[int, int, int, dict[str, int]]:
    """(weights, gradients, optimizer) bytes per GPU, and what an offloaded strategy keeps on the CPU."""
    split = param_split(profile, w)
    s, p, t = layout.shard, w.p, split.trainable
    opt_state = split.adafactor_states * 4 if w.optimizer == "Adafactor" else optimizer_bytes_per_param(w.optimizer) * t
    deepspeed = layout.strategy.startswith("zero")
    cpu: dict[str, int] = {}
    if layout.strategy == "ddp":
        # Adapters and full-fine-tuning trainables are fp32 (the latter as master weights under bf16 autocast).
        weights = split.frozen_bytes + 4 * t
        grads = 4 * t
        optim = opt_state + 4 * split.trainable_tensors
    elif deepspeed:
        master = 4 * t if w.mixed else 0
        fp32_grads = 4 * t if w.mixed else 0
        train_w = p * t
        if layout.strategy == "zero1":
            weights, grads, optim = split.frozen_bytes + train_w, p * t + fp32_grads / s, (master + opt_state) / s
        elif layout.strategy == "zero2":
            weights, grads, optim = split.frozen_bytes + train_w, (p * t + fp32_grads) / s, (master + opt_state) / s
        elif layout.strategy == "zero3":
            weights, grads, optim = (split.frozen_bytes + train_w) / s, (p * t + fp32_grads) / s, (master + opt_state) / s
        else:  # zero3-offload: parameters, fp32 gradients, master weights and moments live in CPU memory
            weights, grads, optim = 0, 0, 0
            cpu = {"cpu_bytes_per_rank": int((split.frozen_bytes + train_w + fp32_grads + master + opt_state) / s)}
    else:  # fsdp2 / fsdp2-hybrid: fp32 trainable shards (the master copy), bf16 compute
        weights = (split.frozen_bytes + 4 * t) / s
        grads = 4 * t / s
        optim = opt_state / s
    return int(weights), int(grads), int(optim), cpu


# ---- activations -------------------------------------------------------------------------------------


@lru_cache(maxsize=4096)
def _lora_inputs_per_layer(profile: ArchProfile, w: Workload) -> tuple[tuple[int, int], ...]:
    """(sum of in_features, adapted Linears) of each decoder layer: LoRA keeps an fp32 copy of each input."""
    per = [(0, 0)] * profile.text.layers
    if w.mode not in ("lora", "qlora"):
        return tuple(per)
    selection = _lora_selection(profile, w)
    layer_re = re.compile(re.escape(profile.lm_prefix) + r"\.layers\.(\d+)\.")
    for lin in profile.linears:
        m = layer_re.match(lin.name + ".")
        if m and selection.adapts(lin.name):
            i = int(m.group(1))
            per[i] = (per[i][0] + lin.in_features, per[i][1] + 1)
    return tuple(per)


def layer_activation_bytes(profile: ArchProfile, w: Workload, kind: str, lora: tuple[int, int] = (0, 0)) -> float:
    """Bytes one decoder layer saves for backward, per token."""
    t = profile.text
    h, q, kv = t.hidden, t.heads * t.head_dim, t.kv_heads * t.head_dim
    ab = w.p
    if kind == "linear_attention":
        kd, vd, hv = t.linear_key_heads * t.linear_key_dim, t.linear_value_heads * t.linear_value_dim, t.linear_value_heads
        # With the fused kernels the GPU image ships (causal-conv1d, flash-linear-attention): the convolution's
        # input, the l2-normalised q and k and v the chunked kernel keeps, z, the core output and the gated norm's
        # output, a and b; the kernel keeps its chunk-local fp32 matrix (64 per token and head) and recomputes the
        # chunk states in backward. (The torch fallback also keeps the convolution's output before and after its
        # activation, and upcasts: more than this.)
        attn = 2 * h + (2 * kd + vd) + 2 * kd + vd + 3 * vd + 2 * hv
        extra = hv * 64 * 4
    else:
        gate = 2 if t.attn_output_gate else 1
        attn = 2 * h + q * gate + 2 * kv + (q + kv) + q + (2 * q if t.attn_output_gate else 0)
        extra = 0.0
    if t.moe:
        mlp = 2 * h + t.experts_per_tok * (h + 4 * t.moe_intermediate) + (4 * t.shared_intermediate + 1 if t.shared_intermediate else 0)
        extra += 4 * t.num_experts  # fp32 router probabilities
    else:
        mlp = 2 * h + 4 * t.intermediate
    inputs, modules = lora
    # Adapters run at the compute dtype under autocast (fp32 masters): A shares the base Linear's saved input and
    # saves its rank-wide output at p; dropout adds the dropped input at p and its one-byte mask.
    adapters = inputs * (ab + 1 if w.lora_dropout > 0 else 0) + ab * w.lora_rank * modules
    return (attn + mlp) * ab + extra + adapters


@lru_cache(maxsize=4096)
def _per_layer_bytes(profile: ArchProfile, w: Workload) -> tuple[float, ...]:
    return tuple(layer_activation_bytes(profile, w, k, lora)
                 for k, lora in zip(profile.text.layer_kinds, _lora_inputs_per_layer(profile, w)))


def activation_bytes(profile: ArchProfile, w: Workload, layout: Layout, sample: SampleShape) -> tuple[int, dict[str, int]]:
    """Peak activation bytes of one micro-batch, and its parts."""
    t, v = profile.text, profile.vision
    b, seq, ab = layout.micro_batch, sample.sequence, w.p
    tokens = b * seq
    per_layer = _per_layer_bytes(profile, w)
    k = layout.checkpoint_k
    logits = loss_bytes(t.hidden, t.vocab, tokens, ab)
    final = tokens * 2 * t.hidden * ab  # the final norm's input and output (the embeddings are layer 0's input)
    if k:  # every k-th layer (0, k, 2k, ...) keeps only its input; one is recomputed at a time in backward
        recomputed = set(range(0, t.layers, k))
        kept = sum(b_ for i, b_ in enumerate(per_layer) if i not in recomputed)
        held = tokens * (len(recomputed) * t.hidden * ab + kept) + final
        # The loss's chunks are freed before the first layer is recomputed; that layer's backward holds what it
        # saves plus the running gradient of the hidden states (and its residual branch).
        redo = tokens * (max(per_layer[i] for i in recomputed) + 2 * t.hidden * ab)
    else:
        held, redo = tokens * sum(per_layer) + final, 0
    patches = b * sample.vision_patches
    vision_mlp = 3 if v.mlp == "swiglu" else 2
    vision_block = patches * (6 * v.hidden + vision_mlp * v.intermediate) * ab
    if w.vision_trains:
        vision_saved = v.depth * vision_block  # counted in full, checkpointed or not (an upper bound)
        vision_peak = 0
    else:
        vision_saved = 0
        vision_peak = vision_block + patches * v.hidden * ab
    projector = 0
    if w.mode == "full":  # the projector trains: its inputs are saved
        projector = b * sample.visual_tokens * (3 * v.merge * v.merge * v.hidden + 2 * t.hidden) * ab
    head = head_gradient_bytes(t.hidden, t.vocab, ab) if w.mode == "full" else 0
    lm_phase = held + max(logits, redo) + head + vision_saved + projector
    peak = max(lm_phase, vision_peak)
    return int(peak), {"language_model": int(held), "recompute": int(redo), "logits": int(logits), "head": int(head),
                       "vision": int(max(vision_saved, vision_peak)), "projector": int(projector)}


def loss_bytes(hidden: int, vocab: int, tokens: int, p: int) -> int:
    """The label-only loss's peak: the hidden rows of the label positions (at most `tokens`) and their gradient at
    p, and one chunk of `loss_chunk_rows(vocab)` rows: fp32 logits, their fp32 gradient and the matmul's output at
    p. No full-vocabulary logits are held."""
    rows = min(tokens, loss_chunk_rows(vocab))
    return int(tokens * hidden * 2 * p + rows * vocab * (4 + 4 + p))


def head_gradient_bytes(hidden: int, vocab: int, p: int) -> int:
    """When the LM head (or the embedding tied to it) trains, the label-only loss computes its gradient in the
    forward: a full (vocab, hidden) fp32 buffer on every rank, held from the end of the forward until the loss's
    backward, plus one (vocab, hidden) product at p per chunk and the head cast to p."""
    return int(vocab * hidden * (4 + 2 * p))


# ---- everything --------------------------------------------------------------------------------------


def fsdp2_buffer_bytes(profile: ArchProfile, w: Workload) -> int:
    """FSDP2's unsharded working set. The units are the decoder layers, the vision blocks, `embed_tokens` and
    `lm_head` (one unit when tied); the root owns the rest (patch embedding, merger, norms) and is not resharded
    after forward, so it stays gathered for the whole step. With unit = the largest of them, at the compute dtype p:
    root x p, plus 2 x unit x p (the unit computing and the one prefetched), plus the unit's unsharded gradient at
    p and its fp32 copy for the reduce-scatter, and the root's fp32 gradient, both scaled by the trainable share of
    the parameters (all of them under full fine-tuning, the adapters' share under LoRA)."""
    units = profile.fsdp_units
    unit = max(units["decoder_layer"], units["embed"], units["lm_head"], units["vision_block"])
    root = units["root"]
    p = w.p
    split = param_split(profile, w)
    share = 1.0 if split.base_trainable else min(1.0, split.trainable / max(profile.total_params, 1))
    grads = (unit * (p + 4) + root * 4) * share
    return int(root * p + 2 * unit * p + grads)


def buffers_bytes(profile: ArchProfile, w: Workload, layout: Layout) -> int:
    """Engine buffers and the stated framework overhead."""
    p = w.p
    unit = profile.largest_gather_unit
    split_trainable = param_split(profile, w).trainable
    if layout.strategy in ("zero1", "zero2"):
        bucket = min(DS_BUCKET, max(split_trainable, 1))
        extra = (3 if layout.strategy == "zero2" else 2) * bucket * p
    elif layout.strategy in ("zero3", "zero3-offload"):
        bucket = min(DS_BUCKET, max(split_trainable, 1))
        # gathered parameters are capped at stage3_max_live_parameters = 2 units (prefetched ones included), plus the
        # reduce bucket (measured on CPU: benchmarks/sharded_load.py)
        extra = 2 * unit * p + bucket * p
    elif layout.strategy in ("fsdp2", "fsdp2-hybrid"):
        extra = fsdp2_buffer_bytes(profile, w)
    else:
        extra = 0
    return int(FRAMEWORK_OVERHEAD + extra)


def load_peak(profile: ArchProfile, w: Workload, layout: Layout, device: str = "gpu") -> LoadPeak:
    """The load-time peak of the loader each strategy runs (vray.models.loader), before the first step.

    P parameters, b bytes per parameter at the load dtype, W = layout.shard, R = ranks on one node, L = the largest
    tensor's elements (4L: it read in the file's fp32, the cast's transient; 2L for a bf16 file, as the registry's
    checkpoints are published), M = the largest module's own parameters.
    The checkpoint is read through a mmap (file-backed pages, not counted).

    - ddp / zero1 / zero2 (`from_pretrained` straight onto the device): per GPU the model at the load dtype + 4L;
      per host R x 4L. The load dtype is the run's precision, except that ddp full fine-tuning loads what trains in
      fp32 (its optimizer steps fp32 master weights); DeepSpeed makes its fp32 master partitions at initialise,
      which the step counts. Adapters are created after the load (the step counts them).
    - zero3 (built under zero.Init): per GPU P x b / W + M x b (gathered to load it) + 4L; per host R x 4L.
    - zero3-offload: per GPU M x b; per host R x (P x b / W + 4L): the partitions live in host memory. The step's
      offloaded state (cpu_bytes_per_rank) holds those partitions too and is checked on its own.
    - fsdp2 / fsdp2-hybrid (built on meta, sharded, then each rank reads its slices in chunks of LOAD_CHUNK_BYTES):
      per GPU the sharded weights (fp32 for what trains, the run's precision for the rest) / W + C; per host R x C,
      with C = min(LOAD_CHUNK_BYTES, 4L).

    On a CPU worker (`device="cpu"`) the host is the device: `per_gpu` is one worker's peak and `per_host` every
    worker of the plan. There zero.Init's whole-module allocations are never written (not resident), so ZeRO-3
    counts its partitions and one read chunk; zero3-offload's partitions are in the worker's memory. Measured by
    benchmarks/sharded_load.py (a 1.0B-parameter Qwen2.5-VL-3B-shaped fp32 checkpoint, 2 ranks).
    """
    split = param_split(profile, w)
    s, p = layout.shard, w.p
    full = split.trainable if split.base_trainable else 0  # base weights that train (adapters come after the load)
    chunk = min(LOAD_CHUNK_BYTES, 4 * profile.largest_tensor)  # never more than one tensor (in fp32) at once
    # from_pretrained reads a tensor at the file's dtype, then casts it: the read copy is the transient (fp32 files:
    # 4L; the registry's checkpoints are published in bf16: 2L)
    transient = profile.stored_bytes * profile.largest_tensor
    # zero.Init allocates each module whole on the GPU before it partitions it; on a CPU worker those pages are
    # never written (the weights are read into the partitions), so only the read chunk counts there.
    gathered = profile.largest_module * p if device != "cpu" else chunk
    ranks = layout.workers if device == "cpu" else min(layout.workers, layout.gpus_per_node)
    strategy = layout.strategy
    if strategy in ("ddp", "zero1", "zero2"):
        model = split.frozen_bytes + (4 if strategy == "ddp" else p) * full
        gpu, host = model + transient, transient
    elif strategy == "zero3":
        gpu, host = (split.frozen_bytes + p * full) / s + gathered + (transient if device != "cpu" else 0), transient
    elif strategy == "zero3-offload":
        gpu, host = gathered, (split.frozen_bytes + p * full) / s + (transient if device != "cpu" else chunk)
    else:  # fsdp2 / fsdp2-hybrid
        gpu, host = (split.frozen_bytes + 4 * split.trainable) / s + chunk, chunk
    if device == "cpu":
        worker = gpu + host if strategy == "zero3-offload" else gpu
        return LoadPeak(int(worker), int(ranks * worker))
    return LoadPeak(int(gpu), int(ranks * host))


@dataclass(frozen=True)
class Estimate:
    """Predicted bytes per GPU of one layout: the step peak and the load peak."""

    memory: MemoryBreakdown
    capacity: int
    margin: int
    activation_parts: dict[str, int]
    cpu: dict[str, int]
    host_limit: int | None = None  # CPU memory one rank may use for offloaded state
    load: LoadPeak = LoadPeak(0, 0)
    node_host_memory: int | None = None  # CPU memory of one node, for the load peak per host

    @property
    def step_fits(self) -> bool:
        cpu = self.cpu.get("cpu_bytes_per_rank", 0)
        return self.memory.total + self.margin <= self.capacity and (self.host_limit is None or cpu <= self.host_limit)

    @property
    def load_fits_gpu(self) -> bool:
        return self.load.per_gpu + self.margin <= self.capacity

    @property
    def load_fits_host(self) -> bool:
        return self.node_host_memory is None or self.load.per_host <= self.node_host_memory

    @property
    def fits(self) -> bool:
        return self.step_fits and self.load_fits_gpu and self.load_fits_host

    @property
    def headroom(self) -> int:
        return self.capacity - self.margin - max(self.memory.total, self.load.per_gpu)

    def failures(self) -> list[str]:
        """What does not fit, in words (empty when it fits)."""
        gib = GIB
        out: list[str] = []
        cap = f"{self.capacity / gib:.1f} GiB"
        if self.memory.total + self.margin > self.capacity:
            out.append(f"step peak {self.memory.total / gib:.1f} GiB per GPU + margin {self.margin / gib:.1f} GiB "
                       f"exceeds {cap}")
        cpu = self.cpu.get("cpu_bytes_per_rank", 0)
        if self.host_limit is not None and cpu > self.host_limit:
            out.append(f"offloaded state {cpu / gib:.1f} GiB per rank exceeds its {self.host_limit / gib:.1f} GiB of "
                       "host memory")
        if not self.load_fits_gpu:
            out.append(f"load peak {self.load.per_gpu / gib:.1f} GiB per GPU (while loading the model) + margin "
                       f"exceeds {cap}")
        if not self.load_fits_host:
            out.append(f"load peak {self.load.per_host / gib:.1f} GiB of host memory per node (while loading the "
                       f"model) exceeds the node's {self.node_host_memory / gib:.0f} GiB")
        return out


def margin_bytes(capacity: int) -> int:
    """The safety margin: 5% of the GPU's memory plus 1 GiB."""
    return int(MARGIN_SHARE * capacity + MARGIN_FIXED)


HOST_SHARE = 0.8  # of a rank's share of host memory that offloaded state may take


def estimate(profile: ArchProfile, w: Workload, layout: Layout, sample: SampleShape, capacity: int,
             host_memory_per_gpu: int | None = None) -> Estimate:
    """Predicted peak bytes per GPU of `w` laid out as `layout` (and, for offload, CPU bytes per rank), with the
    load-time peak per GPU and per node (the node's CPU memory is host_memory_per_gpu x GPUs per node)."""
    weights, grads, optim, cpu = static_bytes(profile, w, layout)
    acts, parts = activation_bytes(profile, w, layout, sample)
    memory = MemoryBreakdown(weights=weights, gradients=grads, optimizer=optim, activations=acts,
                             other=buffers_bytes(profile, w, layout))
    limit = int(HOST_SHARE * host_memory_per_gpu) if host_memory_per_gpu else None
    node = host_memory_per_gpu * layout.gpus_per_node if host_memory_per_gpu else None
    return Estimate(memory, capacity, margin_bytes(capacity), parts, cpu, limit, load_peak(profile, w, layout), node)


def cpu_estimate(profile: ArchProfile, w: Workload, layout: Layout, sample: SampleShape) -> tuple[MemoryBreakdown, LoadPeak, dict[str, int]]:
    """One CPU worker's memory (gloo ranks, the host is the device): the step's parts without the GPU's framework
    overhead or margin (a process's fixed cost is not the model's), zero3-offload's partitions counted where they
    are (in the worker's memory), and the load peak per worker and for all workers of the plan."""
    step = replace(layout, strategy="zero3") if layout.strategy == "zero3-offload" else layout
    weights, grads, optim, _ = static_bytes(profile, w, step)
    acts, parts = activation_bytes(profile, w, step, sample)
    memory = MemoryBreakdown(weights=weights, gradients=grads, optimizer=optim, activations=acts,
                             other=buffers_bytes(profile, w, step) - FRAMEWORK_OVERHEAD)
    return memory, load_peak(profile, w, layout, device="cpu"), parts
