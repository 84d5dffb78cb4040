"""Rotary position embedding frequencies, plain and scaled for context extension.

``rope_frequencies`` gives the inverse frequencies (float64) and the factor cos / sin are
multiplied by, for ``RopeScaling.type``:

- ``none``: theta ** (-2i / d);
- ``linear``: positions interpolated by ``factor`` (every frequency / factor);
- ``dynamic``: NTK-aware: theta raised for the context the model runs at (``context_len``) against
  ``original_max_len``; transformers recomputes this per input length at inference, lctrain fixes
  it at the training context;
- ``yarn``: NTK-by-parts: high frequencies kept, low ones interpolated by ``factor``, a linear ramp
  between the dimensions that rotate ``beta_fast`` and ``beta_slow`` times over
  ``original_max_len``; cos / sin scaled by ``attention_factor`` (default 0.1 ln(factor) + 1);
- ``llama3``: Llama 3.1's: wavelengths above ``original_max_len / low_freq_factor`` divided by
  ``factor``, below ``original_max_len / high_freq_factor`` kept, smoothly blended between.

Each matches transformers' ``ROPE_INIT_FUNCTIONS`` for the same parameters; everything is
computed in float64 (angles too, in ``rope_cos_sin``) and cast at the end, so positions in the
millions keep their precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ROPE_TYPES = ("none", "linear", "dynamic", "yarn", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    type: str = "none"
    factor: float = 1.0
    original_max_len: int = 0  # the context the model was pretrained at (yarn, llama3, dynamic)
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float = 0.0  # yarn; 0: 0.1 ln(factor) + 1
    truncate: bool = True  # yarn: round the ramp's ends to whole dimensions

    def check(self) -> None:
        """ValueError naming the field when the parameters cannot describe this scaling."""
        if self.type not in ROPE_TYPES:
            raise ValueError(f"model.rope_scaling.type={self.type!r}; choose one of {', '.join(ROPE_TYPES)}")
        if self.type == "none":
            return
        if not self.factor > 0:
            raise ValueError(f"model.rope_scaling.factor={self.factor} must be > 0 for type={self.type}")
        if self.type in ("dynamic", "yarn", "llama3") and self.original_max_len <= 0:
            raise ValueError(f"model.rope_scaling.type={self.type} needs model.rope_scaling.original_max_len "
                             f"(the context length the model was pretrained at)")
        if self.type == "llama3" and not self.high_freq_factor > self.low_freq_factor > 0:
            raise ValueError(f"model.rope_scaling: llama3 needs high_freq_factor ({self.high_freq_factor}) > "
                             f"low_freq_factor ({self.low_freq_factor}) > 0")


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None,
                     context_len: int = 0) -> tuple[torch.Tensor, float]:
    """(inverse frequencies, float64 of shape (head_dim / 2,), cos / sin scale)."""
    scaling = scaling or RopeScaling()
    scaling.check()
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    base = float(theta)
    if scaling.type == "dynamic":
        length = max(context_len, scaling.original_max_len)
        ratio = scaling.factor * length / scaling.original_max_len - (scaling.factor - 1)
        base = base * ratio ** (head_dim / (head_dim - 2))
    inv_freq = 1.0 / base ** exponents
    if scaling.type == "linear":
        return inv_freq / scaling.factor, 1.0
    if scaling.type == "yarn":
        return _yarn(inv_freq, head_dim, base, scaling)
    if scaling.type == "llama3":
        return _llama3(inv_freq, scaling), 1.0
    return inv_freq, 1.0


def _yarn(inv_freq: torch.Tensor, dim: int, base: float, s: RopeScaling) -> tuple[torch.Tensor, float]:
    def dimension_of(rotations: float) -> float:  # the dimension that turns ``rotations`` times
        return dim * math.log(s.original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dimension_of(s.beta_fast), dimension_of(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a ramp of zero width
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (high frequencies), 0: interpolate by factor
    scaled = inv_freq / s.factor * (1 - keep) + inv_freq * keep
    attention = s.attention_factor or (0.1 * math.log(s.factor) + 1.0 if s.factor > 1 else 1.0)
    return scaled, float(attention)


def _llama3(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    low_wavelen = s.original_max_len / s.low_freq_factor
    high_wavelen = s.original_max_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype, scale: float = 1.0):
    """cos / sin of shape (batch, seq, 1, head_dim) for explicit per-token positions (angles in
    float64). Positions are in-document positions supplied by the data pipeline, so a packed
    document or a sequence shard sees the same rotation as a lone document would."""
    angles = position_ids.to(torch.float64)[..., None] * inv_freq.to(position_ids.device)  # (b, s, d/2)
    angles = torch.cat([angles, angles], dim=-1)[:, :, None, :]
    cos, sin = angles.cos(), angles.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos.to(dtype), sin.to(dtype)
