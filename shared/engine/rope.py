"""Rotary position embeddings of the Llama family, with the scaling types transformers knows.

Supported ``rope_scaling`` types (as Hugging Face ``transformers`` computes them):

- ``default`` (no scaling): ``inv_freq[i] = 1 / theta ** (2i / head_dim)``.
- ``linear``: ``inv_freq / factor`` (position interpolation).
- ``llama3``: Llama 3.1's piecewise rescaling of low/medium/high frequencies.
- ``dynamic`` (dynamic NTK): theta grows with the sequence length once it exceeds
  ``max_position_embeddings``. transformers recomputes ``inv_freq`` from ``max(position_ids)+1``
  of each forward call, and the keys already in the cache keep the rotation they were made with.
  We do the same per request: every chunk of one request's tokens in a forward pass is rotated
  with the frequencies for ``max(its positions) + 1``, so a prefill followed by one-token decode
  steps reproduces ``generate()`` exactly. Within ``max_position_embeddings`` it equals
  ``default``.

The scaling dict may be in the pre-5.0 ``rope_scaling`` form (``type``/``rope_type`` + factor)
or the 5.x ``rope_parameters`` form (which also carries ``rope_theta``); both are read.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from shared.errors import UnsupportedArchitecture
from shared.model.config import ModelConfig

ROPE_TYPES = ("default", "linear", "llama3", "dynamic")


def rope_type_of(cfg: ModelConfig) -> str:
    scaling = cfg.rope_scaling or {}
    rope_type = str(scaling.get("rope_type") or scaling.get("type") or "default")
    if rope_type not in ROPE_TYPES:
        raise UnsupportedArchitecture(
            f"rope_scaling type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})"
        )
    return rope_type


def _theta(cfg: ModelConfig) -> float:
    scaling = cfg.rope_scaling or {}
    return float(scaling.get("rope_theta", cfg.rope_theta))


def _base_inv_freq(theta: float, dim: int, device: torch.device) -> torch.Tensor:
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float32)
    return 1.0 / (theta ** (exponents / dim))


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    old_context_len = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths are divided by the factor, short ones kept, the middle band interpolated
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding:
    """cos/sin for any positions; a table for the usual case, computed on demand for dynamic NTK."""

    def __init__(self, cfg: ModelConfig, max_positions: int, device: torch.device) -> None:
        self.cfg = cfg
        self.rope_type = rope_type_of(cfg)
        self.head_dim = cfg.head_dim
        self.device = device
        self.theta = _theta(cfg)
        scaling = cfg.rope_scaling or {}
        inv_freq = _base_inv_freq(self.theta, self.head_dim, device)
        if self.rope_type == "linear":
            inv_freq = inv_freq / float(scaling["factor"])
        elif self.rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, scaling)
        self.inv_freq = inv_freq
        self.dynamic_factor = float(scaling.get("factor", 1.0))
        # the table covers every position this engine accepts, so a step only indexes it
        self.table_len = max_positions
        positions = torch.arange(max_positions, device=device, dtype=torch.float32)
        self.cos_table, self.sin_table = self._cos_sin(positions, inv_freq)

    @staticmethod
    def _cos_sin(
        positions: torch.Tensor, inv_freq: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def _dynamic_inv_freq(self, seq_len: int) -> torch.Tensor:
        max_pos = self.cfg.max_position_embeddings
        dim = self.head_dim
        base = self.theta * (
            (self.dynamic_factor * seq_len / max_pos) - (self.dynamic_factor - 1)
        ) ** (dim / (dim - 2))
        return _base_inv_freq(base, dim, self.device)

    def needs_per_chunk(self, max_position: int) -> bool:
        """True when a chunk ending at ``max_position`` needs frequencies other than the table's."""
        return self.rope_type == "dynamic" and max_position + 1 > self.cfg.max_position_embeddings

    def chunk_cos_sin(
        self, positions: torch.Tensor, max_position: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for one request's chunk of positions (dynamic NTK beyond the trained length)."""
        inv_freq = self._dynamic_inv_freq(max_position + 1)
        return self._cos_sin(positions.to(torch.float32), inv_freq)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
