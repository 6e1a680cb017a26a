"""The model runner: a Llama-family forward pass over a contiguous layer range.

Weights are a ``Mapping[str, Tensor]`` of Hugging Face names whose tensors are *views* into the
executor's weight buffer; the runner never copies them (no ``clone``, no copying ``.to()``,
no ``nn.Parameter``): every layer is ``torch.nn.functional`` calls on those views. A runner
holding layers ``[first, last)`` is a *stage*: when ``first == 0`` it also needs the token
embeddings and takes token ids; when ``last == num_layers`` it also needs the final norm and
the LM head (or the tied embeddings) and returns logits; otherwise it takes and returns hidden
states. A whole model is the stage ``[0, num_layers)``.

One forward pass serves many requests at once. Its input is *packed*: the tokens of every
chunk (a request's prefill, or one decode token) laid end to end, ``[N]`` token ids or
``[N, hidden]`` hidden states. All matrix multiplies run on the packed tokens (the weights are
read once per step whatever the batch); attention runs

- for one-token chunks (decode), as one batched ``scaled_dot_product_attention`` over the
  KV slab rows they own (a view, padded to the longest, with a length mask);
- for longer chunks (prefill), one call per chunk with a causal mask against its own row.

Grouped-query attention folds the query heads that share a KV head into the query-length
axis (``[rows, kv_heads, group * q_len, head_dim]``), so K/V are never repeated.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shared.engine.kvcache import KVCache, kv_bytes_per_token, plan_slab
from shared.engine.pacing import StepPacer
from shared.engine.rope import RotaryEmbedding, rotate_half
from shared.errors import (
    CheckpointError,
    ConfigError,
    EngineError,
    InvalidParameter,
    KVCacheFull,
    LayersNotReady,
)
from shared.model.config import ModelConfig, expected_tensor_shapes, layer_of_tensor

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_KV_BUDGET_BYTES = 256 * 1024 * 1024


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The device given, else CUDA when available, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class Chunk:
    """One request's consecutive tokens in a forward pass: positions start..start+length-1."""

    request_id: str
    start: int
    length: int


@dataclass(frozen=True)
class _LayerWeights:
    input_norm: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    q_bias: torch.Tensor | None
    k_bias: torch.Tensor | None
    v_bias: torch.Tensor | None
    o: torch.Tensor
    post_norm: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor


@dataclass
class _PrefillPlan:
    token_slice: slice
    row: int
    start: int
    length: int
    mask: torch.Tensor  # [group * length, start + length] bool, True = attend


@dataclass
class _DecodePlan:
    token_index: torch.Tensor  # packed index of each decode token
    contiguous: slice | None  # the same as a slice when the decode tokens are adjacent
    rows_offset: torch.Tensor  # row - lo of each decode token
    in_order: bool  # rows are exactly lo..hi-1 in the packed order
    lo: int
    hi: int
    max_len: int
    mask: torch.Tensor  # [hi - lo, 1, 1, max_len] bool
    not_mask: torch.Tensor  # its negation (the CPU path fills these with -inf)


@dataclass
class _StepPlan:
    positions: torch.Tensor  # [N]
    rows_per_token: torch.Tensor  # [N]
    cos: torch.Tensor  # [N, 1, head_dim]
    sin: torch.Tensor
    decode: _DecodePlan | None
    prefills: list[_PrefillPlan]
    last_token_index: torch.Tensor  # [num_chunks]


def tied_head_name(cfg: ModelConfig, weights: Mapping[str, torch.Tensor]) -> str:
    """Which tensor serves as the LM head.

    The store's block layout puts a copy of tied embeddings in the last block as
    ``lm_head.weight`` (so a last pipeline stage works without block 0); plain HF checkpoints
    of tied models have no ``lm_head.weight`` and the embeddings serve.
    """
    if not cfg.tie_word_embeddings or "lm_head.weight" in weights:
        return "lm_head.weight"
    return "model.embed_tokens.weight"


def required_tensor_names(
    cfg: ModelConfig, first: int, last: int, weights: Mapping[str, torch.Tensor] | None = None
) -> dict[str, tuple[int, ...]]:
    """The tensors (HF names, shapes) a stage of layers ``[first, last)`` needs."""
    shapes = expected_tensor_shapes(cfg)
    if cfg.tie_word_embeddings and last == cfg.num_layers:
        head = tied_head_name(cfg, weights or {})
        shapes[head] = shapes["model.embed_tokens.weight"]
    needed: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        layer = layer_of_tensor(name)
        if layer is not None:
            if first <= layer < last:
                needed[name] = shape
        elif name == "model.embed_tokens.weight":
            if first == 0 or (last == cfg.num_layers and cfg.tie_word_embeddings
                              and tied_head_name(cfg, weights or {}) == name):
                needed[name] = shape
        elif last == cfg.num_layers:  # final norm, lm_head
            needed[name] = shape
    return needed


class ModelRunner:
    """Runs layers ``[first, last)`` of a Llama-family model with its own KV cache."""

    def __init__(
        self,
        config: ModelConfig,
        weights: Mapping[str, torch.Tensor],
        *,
        layers: tuple[int, int] | None = None,
        device: str | torch.device | None = None,
        kv_budget_bytes: int = DEFAULT_KV_BUDGET_BYTES,
        max_seq_len: int | None = None,
        max_rows: int | None = None,
        is_layer_ready: Callable[[int], bool] | None = None,
        pacer: StepPacer | None = None,
    ) -> None:
        self.config = config
        self.pacer = pacer  # when set, every forward pass takes the paced GPU's time
        first, last = layers if layers is not None else (0, config.num_layers)
        if not 0 <= first < last <= config.num_layers:
            raise ConfigError(
                "layers",
                f"[{first}, {last}) is not a layer range of a {config.num_layers}-layer model",
            )
        self.first, self.last = first, last
        self.is_first = first == 0
        self.is_last = last == config.num_layers
        self.device = pick_device(device)
        self.dtype = torch_dtype(config.dtype)
        self.is_layer_ready = is_layer_ready
        self.group = config.num_heads // config.num_kv_heads
        self.scale = config.head_dim**-0.5
        self.max_seq_len = max_seq_len or config.max_position_embeddings
        self._check_weights(weights)
        self.embed = weights["model.embed_tokens.weight"] if self.is_first else None
        self.final_norm = weights["model.norm.weight"] if self.is_last else None
        self.lm_head: torch.Tensor | None = None
        if self.is_last:
            self.lm_head = weights[tied_head_name(config, weights)]
        self.layers = [self._layer_weights(weights, i) for i in range(first, last)]
        per_token = kv_bytes_per_token(
            last - first, config.num_kv_heads, config.head_dim, self.dtype
        )
        rows, row_len = plan_slab(kv_budget_bytes, per_token, self.max_seq_len, max_rows)
        self.kv = KVCache(
            last - first,
            config.num_kv_heads,
            config.head_dim,
            rows=rows,
            row_len=row_len,
            dtype=self.dtype,
            device=self.device,
        )
        self.rope = RotaryEmbedding(config, max(self.max_seq_len, 1), self.device)
        self._cos_table = self.rope.cos_table.to(self.dtype)
        self._sin_table = self.rope.sin_table.to(self.dtype)
        self._key_positions = torch.arange(row_len, device=self.device)

    # ---------------------------------------------------------------- construction

    def _check_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        for name, shape in required_tensor_names(self.config, self.first, self.last, weights).items():
            tensor = weights.get(name)
            if tensor is None:
                raise CheckpointError(f"weights: missing tensor {name!r}", tensor=name)
            if tuple(tensor.shape) != shape:
                raise CheckpointError(
                    f"weights: {name} has shape {tuple(tensor.shape)}, expected {shape}",
                    tensor=name,
                )
            # refusing beats converting: a conversion would copy the weight buffer
            if tensor.dtype != self.dtype or tensor.device.type != self.device.type:
                raise CheckpointError(
                    f"weights: {name} is {tensor.dtype} on {tensor.device}, the runner needs "
                    f"{self.dtype} on {self.device} (weights are used in place, never copied)",
                    tensor=name,
                )

    def _layer_weights(self, weights: Mapping[str, torch.Tensor], i: int) -> _LayerWeights:
        p = f"model.layers.{i}."
        bias = self.config.attention_bias
        return _LayerWeights(
            input_norm=weights[p + "input_layernorm.weight"],
            q=weights[p + "self_attn.q_proj.weight"],
            k=weights[p + "self_attn.k_proj.weight"],
            v=weights[p + "self_attn.v_proj.weight"],
            q_bias=weights[p + "self_attn.q_proj.bias"] if bias else None,
            k_bias=weights[p + "self_attn.k_proj.bias"] if bias else None,
            v_bias=weights[p + "self_attn.v_proj.bias"] if bias else None,
            o=weights[p + "self_attn.o_proj.weight"],
            post_norm=weights[p + "post_attention_layernorm.weight"],
            gate=weights[p + "mlp.gate_proj.weight"],
            up=weights[p + "mlp.up_proj.weight"],
            down=weights[p + "mlp.down_proj.weight"],
        )

    # ---------------------------------------------------------------- requests

    def release(self, request_id: str) -> bool:
        """Free the request's KV row (finish, cancel, or migration)."""
        return self.kv.close(request_id)

    def fork(self, parent: str, child: str) -> None:
        """Give ``child`` a KV row with a copy of ``parent``'s (shared prefill of n sequences)."""
        self.kv.fork(parent, child)

    def check_layers(self, layers: tuple[int, int] | None) -> None:
        """Raise :class:`LayersNotReady` unless this runner holds (and has) ``layers``."""
        first, last = layers if layers is not None else (self.first, self.last)
        if not (self.first <= first < last <= self.last):
            raise LayersNotReady(
                f"layers [{first}, {last}) requested; this runner holds "
                f"[{self.first}, {self.last})",
                first=first,
                last=last,
            )
        if self.is_layer_ready is not None:
            missing = [i for i in range(first, last) if not self.is_layer_ready(i)]
            if missing:
                raise LayersNotReady(f"layers {missing} have not arrived yet", missing=missing)

    # ---------------------------------------------------------------- forward

    @torch.inference_mode()
    def forward(
        self,
        chunks: Sequence[Chunk],
        inputs: torch.Tensor,
        *,
        layers: tuple[int, int] | None = None,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """Run the stage over packed ``inputs`` (token ids ``[N]`` or hidden ``[N, hidden]``).

        Returns hidden states ``[N, hidden]``, or on the last stage logits ``[len(chunks), vocab]``
        for each chunk's last token (``[N, vocab]`` with ``all_logits``). All checks happen
        before any state changes, so a refused call leaves the cache as it was.
        """
        started = time.perf_counter()
        self.check_layers(layers)
        first, last = layers if layers is not None else (self.first, self.last)
        total = self._validate(chunks, inputs, first)
        out = self._forward(chunks, inputs, first, last, total, all_logits)
        if self.pacer is not None:
            if out.device.type == "cuda":  # the real compute ends when the device is done
                torch.cuda.synchronize(out.device)
            self.pacer.finish(started, [(c.start, c.length) for c in chunks], first, last)
        return out

    def _forward(self, chunks: Sequence[Chunk], inputs: torch.Tensor, first: int, last: int,
                 total: int, all_logits: bool) -> torch.Tensor:
        plan = self._plan(chunks, total)
        if first == 0:
            if self.embed is None:  # pragma: no cover - check_layers guarantees it
                raise LayersNotReady("this runner has no embeddings")
            x = F.embedding(inputs.to(self.device), self.embed)
        else:
            x = inputs.to(device=self.device, dtype=self.dtype)
        for i in range(first, last):
            x = self._layer(i - self.first, self.layers[i - self.first], x, plan)
        if last < self.config.num_layers:
            return x
        if not all_logits:
            x = x.index_select(0, plan.last_token_index)
        assert self.final_norm is not None and self.lm_head is not None
        x = self._rms_norm(x, self.final_norm)
        return F.linear(x, self.lm_head)

    def _validate(self, chunks: Sequence[Chunk], inputs: torch.Tensor, first: int) -> int:
        if not chunks:
            raise InvalidParameter("a forward pass needs at least one chunk")
        seen: set[str] = set()
        new_rows = 0
        total = 0
        for chunk in chunks:
            if chunk.request_id in seen:
                raise InvalidParameter(f"request {chunk.request_id!r} appears twice in one batch")
            seen.add(chunk.request_id)
            if chunk.length < 1 or chunk.start < 0:
                raise InvalidParameter(f"chunk {chunk} must have start >= 0 and length >= 1")
            stored = self.kv.length_of(chunk.request_id)
            if chunk.request_id not in self.kv.row_of:
                new_rows += 1
            if chunk.start > stored:
                raise EngineError(
                    f"request {chunk.request_id!r}: chunk starts at {chunk.start} but only "
                    f"{stored} positions are cached",
                    request_id=chunk.request_id,
                )
            if chunk.start + chunk.length > self.kv.row_len:
                raise KVCacheFull(
                    f"request {chunk.request_id!r} needs {chunk.start + chunk.length} KV slots; a "
                    f"row holds {self.kv.row_len}",
                    request_id=chunk.request_id,
                )
            total += chunk.length
        if new_rows > self.kv.free_rows:
            raise KVCacheFull(f"{new_rows} new requests but {self.kv.free_rows} free KV rows")
        if first == 0:
            if inputs.dim() != 1 or inputs.dtype not in (torch.int64, torch.int32):
                raise InvalidParameter("the first stage takes token ids: an integer tensor [N]")
            if inputs.numel() and (
                int(inputs.min()) < 0 or int(inputs.max()) >= self.config.vocab_size
            ):
                raise InvalidParameter(f"token ids must be in [0, {self.config.vocab_size})")
        elif inputs.dim() != 2 or inputs.shape[1] != self.config.hidden_size:
            raise InvalidParameter(
                f"a later stage takes hidden states [N, {self.config.hidden_size}]"
            )
        if inputs.shape[0] != total:
            raise InvalidParameter(f"inputs hold {inputs.shape[0]} tokens; the chunks say {total}")
        return total

    def _plan(self, chunks: Sequence[Chunk], total: int) -> _StepPlan:
        """Everything shared by all layers of this step: positions, rope, rows, masks."""
        dev = self.device
        positions_host: list[int] = []
        rows_host: list[int] = []
        last_index: list[int] = []
        decode_tokens: list[int] = []
        decode_rows: list[int] = []
        decode_lens: list[int] = []
        prefills: list[_PrefillPlan] = []
        window = self.config.sliding_window
        dynamic_chunks: list[tuple[int, Chunk]] = []
        offset = 0
        for chunk in chunks:
            row = self.kv.open(chunk.request_id)
            end = chunk.start + chunk.length
            self.kv.lengths[row] = end
            positions_host.extend(range(chunk.start, end))
            rows_host.extend([row] * chunk.length)
            last_index.append(offset + chunk.length - 1)
            if self.rope.needs_per_chunk(end - 1):
                dynamic_chunks.append((offset, chunk))
            if chunk.length == 1:
                decode_tokens.append(offset)
                decode_rows.append(row)
                decode_lens.append(end)
            else:
                prefills.append(
                    _PrefillPlan(
                        token_slice=slice(offset, offset + chunk.length),
                        row=row,
                        start=chunk.start,
                        length=chunk.length,
                        mask=self._prefill_mask(chunk.start, chunk.length, window),
                    )
                )
            offset += chunk.length
        positions = torch.tensor(positions_host, dtype=torch.int64, device=dev)
        cos = self._cos_table.index_select(0, positions)
        sin = self._sin_table.index_select(0, positions)
        for start_index, chunk in dynamic_chunks:
            sl = slice(start_index, start_index + chunk.length)
            c, s = self.rope.chunk_cos_sin(positions[sl], chunk.start + chunk.length - 1)
            cos[sl] = c.to(self.dtype)
            sin[sl] = s.to(self.dtype)
        decode = (
            self._decode_plan(decode_tokens, decode_rows, decode_lens, window)
            if decode_tokens
            else None
        )
        return _StepPlan(
            positions=positions,
            rows_per_token=torch.tensor(rows_host, dtype=torch.int64, device=dev),
            cos=cos.unsqueeze(1),
            sin=sin.unsqueeze(1),
            decode=decode,
            prefills=prefills,
            last_token_index=torch.tensor(last_index, dtype=torch.int64, device=dev),
        )

    def _prefill_mask(self, start: int, length: int, window: int | None) -> torch.Tensor:
        q_pos = torch.arange(start, start + length, device=self.device)[:, None]
        k_pos = self._key_positions[: start + length][None, :]
        mask = k_pos <= q_pos
        if window is not None:
            mask &= k_pos > q_pos - window
        # query rows are folded as [group, length]
        return mask.repeat(self.group, 1)

    def _decode_plan(
        self, tokens: list[int], rows: list[int], lens: list[int], window: int | None
    ) -> _DecodePlan:
        dev = self.device
        lo, hi = min(rows), max(rows) + 1
        max_len = max(lens)
        contiguous = (
            slice(tokens[0], tokens[-1] + 1) if tokens[-1] - tokens[0] == len(tokens) - 1 else None
        )
        in_order = rows == list(range(lo, hi))
        # rows in [lo, hi) that have no decode token this step attend to key 0 only (output unused)
        row_lens = [1] * (hi - lo)
        for row, length in zip(rows, lens, strict=True):
            row_lens[row - lo] = length
        lens_t = torch.tensor(row_lens, dtype=torch.int64, device=dev)
        k_pos = self._key_positions[:max_len][None, :]
        mask = k_pos < lens_t[:, None]
        if window is not None:
            mask &= k_pos > (lens_t[:, None] - 1) - window
        return _DecodePlan(
            token_index=torch.tensor(tokens, dtype=torch.int64, device=dev),
            contiguous=contiguous,
            rows_offset=torch.tensor([r - lo for r in rows], dtype=torch.int64, device=dev),
            in_order=in_order,
            lo=lo,
            hi=hi,
            max_len=max_len,
            mask=mask[:, None, None, :],
            not_mask=~mask[:, None, None, :],
        )

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        eps = self.config.rms_norm_eps
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), weight, eps)
        # as transformers: normalise in fp32, scale in the model dtype
        normed = F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)
        return weight * normed

    def _layer(
        self, index: int, w: _LayerWeights, x: torch.Tensor, plan: _StepPlan
    ) -> torch.Tensor:
        cfg = self.config
        n = x.shape[0]
        h = self._rms_norm(x, w.input_norm)
        q = F.linear(h, w.q, w.q_bias).view(n, cfg.num_heads, cfg.head_dim)
        k = F.linear(h, w.k, w.k_bias).view(n, cfg.num_kv_heads, cfg.head_dim)
        v = F.linear(h, w.v, w.v_bias).view(n, cfg.num_kv_heads, cfg.head_dim)
        q = q * plan.cos + rotate_half(q) * plan.sin
        k = k * plan.cos + rotate_half(k) * plan.sin
        keys, values = self.kv.keys(index), self.kv.values(index)
        # one in-place write of every token's K and V into its row at its position
        keys[plan.rows_per_token, :, plan.positions] = k
        values[plan.rows_per_token, :, plan.positions] = v
        attn = self._attention(q, keys, values, plan)
        x = x + F.linear(attn, w.o)
        h = self._rms_norm(x, w.post_norm)
        return x + F.linear(F.silu(F.linear(h, w.gate)) * F.linear(h, w.up), w.down)

    def _decode_sdpa(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dp: _DecodePlan
    ) -> torch.Tensor:
        """Attention of a few query rows per KV head over padded rows of the slab.

        On CUDA this is ``scaled_dot_product_attention``. On CPU the fused kernels carry a fixed
        cost (buffers, a parallel region) that dominates when each head has one or two query
        rows — measured ~1.5 ms per call vs ~0.1 ms for the two matmuls below at batch 1 — so
        the CPU path is written out: same math, fp32 softmax as in the fused kernels.
        """
        if self.device.type != "cpu":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=dp.mask, scale=self.scale)
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * self.scale
        scores.masked_fill_(dp.not_mask, float("-inf"))
        return torch.matmul(scores.softmax(-1).to(v.dtype), v)

    def _attention(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, plan: _StepPlan
    ) -> torch.Tensor:
        cfg = self.config
        n = q.shape[0]
        kvh, g, d = cfg.num_kv_heads, self.group, cfg.head_dim
        if (
            plan.decode is not None
            and not plan.prefills
            and plan.decode.in_order
            and plan.decode.contiguous is not None
        ):
            # the common decode-only step: no scatter, no gather
            dp = plan.decode
            qd = q.view(n, kvh, g, d)
            out = self._decode_sdpa(
                qd, keys[dp.lo : dp.hi, :, : dp.max_len], values[dp.lo : dp.hi, :, : dp.max_len], dp
            )
            return out.reshape(n, cfg.q_size)
        attn = q.new_empty((n, cfg.q_size))
        if plan.decode is not None:
            dp = plan.decode
            qd = q.view(n, kvh, g, d).index_select(0, dp.token_index)
            if not dp.in_order:
                padded = qd.new_zeros((dp.hi - dp.lo, kvh, g, d))
                padded.index_copy_(0, dp.rows_offset, qd)
                qd = padded
            out = self._decode_sdpa(
                qd, keys[dp.lo : dp.hi, :, : dp.max_len], values[dp.lo : dp.hi, :, : dp.max_len], dp
            )
            if not dp.in_order:
                out = out.index_select(0, dp.rows_offset)
            attn.index_copy_(0, dp.token_index, out.reshape(-1, cfg.q_size))
        for pp in plan.prefills:
            length = pp.length
            qp = q[pp.token_slice].view(length, kvh, g, d).permute(1, 2, 0, 3)
            qp = qp.reshape(1, kvh, g * length, d)
            end = pp.start + length
            out = F.scaled_dot_product_attention(
                qp,
                keys[pp.row : pp.row + 1, :, :end],
                values[pp.row : pp.row + 1, :, :end],
                attn_mask=pp.mask,
                scale=self.scale,
            )
            attn[pp.token_slice] = (
                out.view(kvh, g, length, d).permute(2, 0, 1, 3).reshape(length, cfg.q_size)
            )
        return attn
