"""The memory-bandwidth floor of batch-1 decode: the fewest bytes one decoded token must read from device memory.

Per token, every weight matrix is read once, except the token embedding (one row is gathered, unless the
embedding doubles as the output matrix) and the expert tensors of a mixture-of-experts layer (only the
`expert_used_count` experts the router picks are read). The KV cache adds, for each layer, the keys and values
of every position the new token attends to (at most the window on a sliding-window layer). Activations are a
few kilobytes and are left out. Dividing a measured copy bandwidth by this count gives the fastest decode any
engine could reach on that device.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from worker.gguf import GGUFFile
from worker.models import adapter_for

KV_BYTES_PER_VALUE = 2  # the floor counts an f16 KV cache (llama.cpp's default and the worker's GPU cache)


@dataclass(frozen=True)
class DecodeBytes:
    weights: int  # weight bytes read per token
    kv_cache: float  # KV bytes read per token, averaged over the decoded positions
    experts_active: str  # "4/32" for a mixture of experts, "" otherwise

    @property
    def total(self) -> float:
        return self.weights + self.kv_cache

    def as_dict(self) -> dict:
        return asdict(self) | {"total": self.total}


def weight_bytes_per_token(gf: GGUFFile) -> tuple[int, str]:
    """Weight bytes one decode step reads, and the active-expert fraction as text ("" for a dense model)."""
    n_experts = int(gf.arch_key("expert_count", 0) or 0)
    n_used = int(gf.arch_key("expert_used_count", 0) or 0)
    return gf.decode_weight_bytes, (f"{n_used}/{n_experts}" if n_experts else "")


def kv_bytes_per_token(gf: GGUFFile, first_context: int, n_tokens: int) -> float:
    """KV bytes read per decode step, averaged over steps whose contexts are first_context .. +n_tokens-1."""
    cfg = adapter_for(gf.architecture).config(gf)  # the adapter owns the head sizes and which layers slide
    v_dim = int(gf.arch_key("attention.value_length", cfg.head_dim))
    windows = [cfg.window(i) for i in range(cfg.n_layers)]
    per_position = cfg.n_kv_heads * (cfg.head_dim + v_dim) * KV_BYTES_PER_VALUE
    positions = 0
    for step in range(n_tokens):
        context = first_context + step
        positions += sum(context if w is None else min(context, w) for w in windows)
    return positions * per_position / n_tokens


def decode_bytes(gf: GGUFFile, prompt_tokens: int, decode_tokens: int) -> DecodeBytes:
    """Bytes per decoded token for `decode_tokens` steps after a prompt of `prompt_tokens`."""
    weights, experts = weight_bytes_per_token(gf)
    # Step j reads the prompt, the j tokens decoded before it and its own key/value.
    return DecodeBytes(weights, kv_bytes_per_token(gf, prompt_tokens + 1, decode_tokens), experts)
