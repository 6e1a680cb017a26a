"""How long a named GPU takes for one engine step of a named model: a pure roofline cost model.

The emulated cluster computes on a 2-core CPU, whose ratio of load time to service time is
nothing like a GPU's. Paced executors (``LSCALE_PACE=h100:llama-2-7b``) and the simulator take
their step times from here instead, so both must come from one model with stated constants.

A step is one forward pass over a batch of *chunks* (continuous batching: decodes of running
requests and prefill chunks of new ones share it). Each chunk is ``(cached, new)``: ``new``
tokens appended after ``cached`` tokens already in the KV cache (a decode is ``(c, 1)``, a
whole-prompt prefill ``(0, n)``). For a stage holding ``layers`` of the model's layers:

    flops  = 2 * params_touched * tokens  +  attention (4 * d_model * context per token-layer)
    bytes  = weights read once + KV read (every cached token's K and V, per layer) + KV written
    c, m   = flops / (peak * mfu), bytes / (hbm * mbu)
    time   = max(c, m) + overlap_loss * min(c, m) + step overhead
             + tensor-parallel all-reduces (2 per layer over NVLink: a fixed latency each, and
               ring traffic of 2 (tp-1)/tp of the activations)

``max`` is the roofline: a step is bound by compute or by memory, whichever is slower; prefills
are compute-bound, decodes at small batch memory-bound. Near the ridge point the two overlap
imperfectly (short prefills are slower than either bound alone), which ``overlap_loss`` adds.
A pipeline stage pays only its share of the layers (embedding with the first stage, final norm
and LM head with the last) and the activation hop to the next stage at the link's rate
(:func:`activation_hop_seconds`).

Constants (each with its source) are in :data:`GPUS` and :data:`MODELS`; the efficiencies and
the per-step overhead were fitted to one set of published figures and checked against others:
:data:`PUBLISHED` lists them and :func:`check_published` gives the error of each (the tests
hold it under a stated bound; ``python -m loadgen cost-model`` prints the table).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from shared.errors import InvalidParameter
from shared.model.config import ModelConfig
from shared.model.layout import DTYPE_SIZES

GB = 1e9
TERA = 1e12


@dataclass(frozen=True)
class GpuProfile:
    """One GPU's peak rates and the efficiencies a tuned serving engine reaches on it."""

    name: str
    peak_flops: float  # dense FP16/BF16 tensor-core FLOP/s (no sparsity)
    hbm_bytes_per_s: float
    nvlink_bytes_per_s: float  # per direction, per GPU (tensor-parallel all-reduce)
    pcie_bytes_per_s: float  # host memory -> device, pinned, per direction
    memory_bytes: float
    mfu: float  # achieved / peak FLOP/s in compute-bound steps
    mbu: float  # achieved / peak HBM bandwidth in memory-bound steps
    step_overhead_s: float  # launch, sampling and scheduling per step (batch-independent)
    overlap_loss: float  # share of the smaller of compute and memory time not hidden by the other
    allreduce_latency_s: float  # one small NCCL all-reduce over NVLink
    source: str


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Llama-family decoder (what its Hugging Face config.json says)."""

    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    dtype_bytes: int = 2  # fp16 / bf16
    tied_embeddings: bool = False
    source: str = ""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def params_per_layer(self) -> int:
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        attention = 2 * h * h + 2 * h * kv  # q, o; k, v (grouped-query: kv < h)
        mlp = 3 * h * self.intermediate_size  # gate, up, down (SwiGLU)
        return attention + mlp + 2 * h  # + the two RMSNorm weights

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def head_params(self) -> int:
        """Final norm and LM head (the head shares the embedding's bytes when tied)."""
        return self.hidden_size + self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        untied_embedding = 0 if self.tied_embeddings else self.embedding_params
        return self.num_layers * self.params_per_layer + untied_embedding + self.head_params

    @property
    def weight_bytes(self) -> int:
        return self.num_params * self.dtype_bytes

    @property
    def kv_bytes_per_token_layer(self) -> int:
        return 2 * self.num_kv_heads * self.head_dim * self.dtype_bytes


@dataclass(frozen=True)
class Pace:
    """A GPU and a model (and its tensor-parallel degree): what a paced executor imitates."""

    gpu: GpuProfile
    model: ModelShape
    tensor_parallel: int = 1

    @property
    def label(self) -> str:
        tp = f"x{self.tensor_parallel}" if self.tensor_parallel > 1 else ""
        return f"{self.gpu.name}{tp}:{self.model.name}"


# NVIDIA datasheets: A100 (SXM4 80GB): 312 TFLOPS dense FP16/BF16 tensor core, 2,039 GB/s HBM2e,
# NVLink 600 GB/s (both directions), PCIe Gen4 x16 64 GB/s (both directions).
# H100 (SXM5 80GB): 989 TFLOPS dense BF16 (1,979 is the figure with sparsity), 3.35 TB/s HBM3,
# NVLink 900 GB/s (both directions), PCIe Gen5 x16 128 GB/s (both directions).
# PCIe: pinned host->device copies reach ~80% of one direction's rate.
# mfu, mbu, the step overhead and overlap_loss: fitted to TensorRT-LLM v0.5's batch-1 first-token
# latencies (A100, FP16) and NeMo's Llama-2-7B batch-1 latencies at TP=1; PUBLISHED marks them and
# holds the held-out checks. allreduce_latency_s: an assumed 15 us, the order of a small-message
# NCCL all-reduce within one NVLink node (it matters only for TP > 1 at small batch).
GPUS: dict[str, GpuProfile] = {
    "a100": GpuProfile(
        name="a100", peak_flops=312 * TERA, hbm_bytes_per_s=2039 * GB,
        nvlink_bytes_per_s=300 * GB, pcie_bytes_per_s=0.8 * 32 * GB, memory_bytes=80 * GB,
        mfu=0.70, mbu=0.80, step_overhead_s=2.5e-3, overlap_loss=0.7,
        allreduce_latency_s=15e-6, source="NVIDIA A100 datasheet; efficiencies fitted (PUBLISHED)"),
    "h100": GpuProfile(
        name="h100", peak_flops=989 * TERA, hbm_bytes_per_s=3350 * GB,
        nvlink_bytes_per_s=450 * GB, pcie_bytes_per_s=0.8 * 64 * GB, memory_bytes=80 * GB,
        mfu=0.55, mbu=0.75, step_overhead_s=2.5e-3, overlap_loss=0.7,
        allreduce_latency_s=15e-6, source="NVIDIA H100 SXM datasheet; efficiencies fitted (PUBLISHED)"),
}

# The config.json of each meta-llama/Llama-2-*-hf checkpoint (Touvron et al. 2023, table 1).
MODELS: dict[str, ModelShape] = {
    "llama-2-7b": ModelShape("llama-2-7b", num_layers=32, hidden_size=4096,
                             intermediate_size=11008, num_heads=32, num_kv_heads=32,
                             vocab_size=32000, source="meta-llama/Llama-2-7b-hf config.json"),
    "llama-2-13b": ModelShape("llama-2-13b", num_layers=40, hidden_size=5120,
                              intermediate_size=13824, num_heads=40, num_kv_heads=40,
                              vocab_size=32000, source="meta-llama/Llama-2-13b-hf config.json"),
    "llama-2-70b": ModelShape("llama-2-70b", num_layers=80, hidden_size=8192,
                              intermediate_size=28672, num_heads=64, num_kv_heads=8,
                              vocab_size=32000, source="meta-llama/Llama-2-70b-hf config.json"),
}


def parse_pace(spec: str) -> Pace:
    """``gpu[xTP]:model``, e.g. ``h100:llama-2-7b`` or ``a100x4:llama-2-70b``."""
    gpu_part, sep, model_part = spec.strip().lower().partition(":")
    name, _, tp_text = gpu_part.partition("x")
    if not sep or name not in GPUS or model_part not in MODELS:
        raise InvalidParameter(
            f"pace {spec!r}: expected gpu[xTP]:model with gpu in {sorted(GPUS)} and model in "
            f"{sorted(MODELS)}", field="pace")
    try:
        tp = int(tp_text) if tp_text else 1
    except ValueError:
        raise InvalidParameter(f"pace {spec!r}: tensor-parallel degree {tp_text!r} is not an "
                               "integer", field="pace") from None
    pace = Pace(GPUS[name], MODELS[model_part], tp)
    if tp < 1 or pace.model.num_heads % tp or pace.model.num_kv_heads % tp:
        raise InvalidParameter(f"pace {spec!r}: tensor-parallel degree {tp} must divide the "
                               "model's attention and KV heads", field="pace")
    if pace.model.weight_bytes / tp > pace.gpu.memory_bytes:
        need = math.ceil(pace.model.weight_bytes / pace.gpu.memory_bytes)
        raise InvalidParameter(
            f"pace {spec!r}: {pace.model.weight_bytes / GB:.0f} GB of weights do not fit "
            f"{tp} x {pace.gpu.memory_bytes / GB:.0f} GB; use at least x{need}", field="pace")
    return pace


Chunk = tuple[int, int]  # (tokens already cached, new tokens this step)


@dataclass(frozen=True)
class StepWork:
    """What one step over some layers must compute and move (per model replica, before TP)."""

    linear_flops: int  # the matmuls of the projections, MLP and LM head: 2 per weight per token
    attention_flops: int  # QK^T and AV over every attended key
    weight_bytes: int
    kv_bytes: int  # cached keys/values read plus the new ones written
    tokens: int

    @property
    def flops(self) -> int:
        return self.linear_flops + self.attention_flops

    @property
    def bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes


def step_work(model: ModelShape, chunks: Sequence[Chunk], first_layer: int = 0,
              last_layer: int | None = None) -> StepWork:
    """The work of one step over ``chunks`` on layers ``[first_layer, last_layer)``.

    The embedding counts with a stage that starts at layer 0 (a lookup: no FLOPs, one row read
    per token, neglected), the final norm and LM head with one that ends at the last layer (it
    computes logits for one position per chunk, as the engine does).
    """
    last = model.num_layers if last_layer is None else last_layer
    if not 0 <= first_layer < last <= model.num_layers:
        raise InvalidParameter(f"layers [{first_layer}, {last}) outside the model's "
                               f"{model.num_layers}", field="layers")
    layers = last - first_layer
    tokens = sum(new for _, new in chunks)
    # each new token at position p attends to p+1 keys: QK^T and AV are 2 * 2 * d_model each key
    attended = sum(new * cached + new * (new + 1) // 2 for cached, new in chunks)
    matmul_params = model.params_per_layer - 2 * model.hidden_size  # the norms are elementwise
    linear = layers * 2 * matmul_params * tokens
    weights = layers * model.params_per_layer
    if last == model.num_layers:
        linear += 2 * model.vocab_size * model.hidden_size * len(chunks)
        weights += model.head_params
    kv_tokens = sum(cached + new for cached, new in chunks)
    return StepWork(
        linear_flops=linear, attention_flops=layers * 4 * model.hidden_size * attended,
        weight_bytes=weights * model.dtype_bytes,
        kv_bytes=layers * kv_tokens * model.kv_bytes_per_token_layer, tokens=tokens)


def step_seconds(pace: Pace, chunks: Sequence[Chunk], *, first_layer: int = 0,
                 last_layer: int | None = None) -> float:
    """Seconds one step over ``chunks`` takes on layers ``[first_layer, last_layer)``."""
    work = step_work(pace.model, chunks, first_layer, last_layer)
    if not chunks:
        return 0.0
    gpu, tp = pace.gpu, pace.tensor_parallel
    compute_s = work.flops / tp / (gpu.peak_flops * gpu.mfu)
    memory_s = work.bytes / tp / (gpu.hbm_bytes_per_s * gpu.mbu)
    seconds = (max(compute_s, memory_s) + gpu.overlap_loss * min(compute_s, memory_s)
               + gpu.step_overhead_s)
    if tp > 1:  # two all-reduces of the activations per layer (attention out, MLP out)
        layers = (pace.model.num_layers if last_layer is None else last_layer) - first_layer
        activations = work.tokens * pace.model.hidden_size * pace.model.dtype_bytes
        ring = 2 * (tp - 1) / tp * activations / gpu.nvlink_bytes_per_s
        seconds += layers * 2 * (gpu.allreduce_latency_s + ring)
    return seconds


def activation_hop_seconds(pace: Pace, new_tokens: int, link_bytes_per_s: float,
                           latency_s: float = 0.0) -> float:
    """Seconds to send one stage's output activations (new_tokens x hidden) over a link."""
    if link_bytes_per_s <= 0:
        raise InvalidParameter("link rate must be positive", field="link_bytes_per_s")
    size = new_tokens * pace.model.hidden_size * pace.model.dtype_bytes
    return latency_s + size / link_bytes_per_s


def request_seconds(pace: Pace, prompt_tokens: int, output_tokens: int) -> tuple[float, float]:
    """(first-token latency, whole-request latency) of one request alone (batch 1)."""
    first = step_seconds(pace, [(0, prompt_tokens)])
    total = first + sum(step_seconds(pace, [(prompt_tokens + i, 1)])
                        for i in range(output_tokens - 1))
    return first, total


@dataclass(frozen=True)
class PublishedFigure:
    """One published latency, how it is reproduced here, and whether the fit used it."""

    source: str
    pace: str
    prompt_tokens: int
    output_tokens: int
    metric: str  # "first_token_s" | "latency_s"
    seconds: float
    fitted: bool  # used to fit mfu/mbu/overhead (else a held-out check)


# TensorRT-LLM v0.5 docs/source/performance.md, "Low Latency", A100 FP16, batch 1 (1st token).
# NeMo Framework user guide, "Llama-2 Results / Inference Performance", batch 1, 128 in / 20 out,
# TP=1, 2, 4, average latency (the whole request). NeMo's Llama-2-13B rows are left out: they
# list 13B as faster than 7B on the same GPU (142 vs 234 ms on A100), which NeMo discussion
# #8455 questions; no other batch-1 13B figure was found, so 13B rests on its shape alone.
# Known gap: 7B at TP=4 (and more) is modelled ~20% fast (per-step costs of small-model tensor
# parallelism beyond the all-reduces are not modelled); paced profiles use TP=1 below 70B.
PUBLISHED: tuple[PublishedFigure, ...] = (
    PublishedFigure("TensorRT-LLM v0.5 (A100 FP16)", "a100:llama-2-7b", 128, 1,
                    "first_token_s", 0.016, fitted=True),
    PublishedFigure("TensorRT-LLM v0.5 (A100 FP16)", "a100:llama-2-7b", 2048, 1,
                    "first_token_s", 0.133, fitted=True),
    PublishedFigure("TensorRT-LLM v0.5 (A100 FP16)", "a100x4:llama-2-70b", 128, 1,
                    "first_token_s", 0.047, fitted=False),
    PublishedFigure("TensorRT-LLM v0.5 (A100 FP16)", "a100x4:llama-2-70b", 2048, 1,
                    "first_token_s", 0.377, fitted=False),
    PublishedFigure("NeMo Llama-2 inference (A100 80GB)", "a100:llama-2-7b", 128, 20,
                    "latency_s", 0.2340, fitted=True),
    PublishedFigure("NeMo Llama-2 inference (H100 80GB)", "h100:llama-2-7b", 128, 20,
                    "latency_s", 0.1538, fitted=True),
    PublishedFigure("NeMo Llama-2 inference (A100 80GB)", "a100x2:llama-2-7b", 128, 20,
                    "latency_s", 0.1717, fitted=False),
    PublishedFigure("NeMo Llama-2 inference (H100 80GB)", "h100x2:llama-2-7b", 128, 20,
                    "latency_s", 0.1286, fitted=False),
    PublishedFigure("NeMo Llama-2 inference (A100 80GB)", "a100x4:llama-2-7b", 128, 20,
                    "latency_s", 0.1437, fitted=False),
    PublishedFigure("NeMo Llama-2 inference (H100 80GB)", "h100x4:llama-2-7b", 128, 20,
                    "latency_s", 0.1074, fitted=False),
)


@dataclass(frozen=True)
class FigureCheck:
    figure: PublishedFigure
    modelled_s: float

    @property
    def relative_error(self) -> float:
        return (self.modelled_s - self.figure.seconds) / self.figure.seconds


def check_published(figures: Iterable[PublishedFigure] = PUBLISHED) -> list[FigureCheck]:
    checks = []
    for fig in figures:
        first, total = request_seconds(parse_pace(fig.pace), fig.prompt_tokens, fig.output_tokens)
        checks.append(FigureCheck(fig, first if fig.metric == "first_token_s" else total))
    return checks


def shape_of(name: str, config: ModelConfig) -> ModelShape:
    """The :class:`ModelShape` of a checkpoint the store read (its parsed ``config.json``)."""
    return ModelShape(
        name=name, num_layers=config.num_layers, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_heads=config.num_heads,
        num_kv_heads=config.num_kv_heads, vocab_size=config.vocab_size,
        dtype_bytes=DTYPE_SIZES[config.dtype], tied_embeddings=config.tie_word_embeddings,
        source="config.json")
