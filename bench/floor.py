"""The memory-bandwidth floor of batch-1 decode: the fewest bytes one decoded token must read from device memory.

Per token, every weight matrix is read once, except the token embedding (one row is gathered, unless the
embedding doubles as the output matrix) and the expert tensors of a mixture-of-experts layer (only the
`expert_used_count` experts the router picks are read). The KV cache adds, for each layer, the keys and values
of every position the new token attends to (at most the window on a sliding-window layer). Activations are a
few kilobytes and are left out. Dividing a measured copy bandwidth by this count gives the fastest decode any
engine could reach on that device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

from worker.gguf import GGUFFile

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


def sliding_layers(gf: GGUFFile) -> Callable[[int], bool]:
    """Which layers attend within a window: llama.cpp's rule for each architecture that has windows."""
    arch = gf.architecture
    if not int(gf.arch_key("attention.sliding_window", 0) or 0):
        return lambda layer: False
    if arch == "gemma3":
        pattern = gf.arch_key("attention.sliding_window_pattern")
        if pattern is None:
            return lambda layer: layer % 6 < 5
        return lambda layer: bool(pattern[layer % len(pattern)])
    if arch == "gpt-oss":
        return lambda layer: layer % 2 == 0
    return lambda layer: True  # phi3 and llama-style files: a non-zero window applies to every layer


def kv_bytes_per_token(gf: GGUFFile, first_context: int, n_tokens: int) -> float:
    """KV bytes read per decode step, averaged over steps whose contexts are first_context .. +n_tokens-1."""
    n_layers = int(gf.arch_key("block_count"))
    n_heads = int(gf.arch_key("attention.head_count"))
    n_kv = int(gf.arch_key("attention.head_count_kv", n_heads))
    d_model = int(gf.arch_key("embedding_length"))
    k_dim = int(gf.arch_key("attention.key_length", d_model // n_heads))
    v_dim = int(gf.arch_key("attention.value_length", k_dim))
    window = int(gf.arch_key("attention.sliding_window", 0) or 0)
    sliding = sliding_layers(gf)
    per_position = n_kv * (k_dim + v_dim) * KV_BYTES_PER_VALUE
    positions = 0
    for step in range(n_tokens):
        context = first_context + step
        positions += sum(min(context, window) if sliding(i) else context for i in range(n_layers))
    return positions * per_position / n_tokens


def decode_bytes(gf: GGUFFile, prompt_tokens: int, decode_tokens: int) -> DecodeBytes:
    """Bytes per decoded token for `decode_tokens` steps after a prompt of `prompt_tokens`."""
    weights, experts = weight_bytes_per_token(gf)
    # Step j reads the prompt, the j tokens decoded before it and its own key/value.
    return DecodeBytes(weights, kv_bytes_per_token(gf, prompt_tokens + 1, decode_tokens), experts)
