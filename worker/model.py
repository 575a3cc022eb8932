"""A loaded model: GGUF file -> adapter config -> weights on one device -> compiled runner + tokenizer.
The Python API (`worker.load`) and the engine build on this."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from worker.errors import ErrorCode, WorkerError
from worker.gguf import GGUFFile, open_gguf
from worker.models import adapter_for
from worker.models.base import load_weights
from worker.quant import quant_kind
from worker.runner import Runner
from worker.tokenizer import StreamDecoder, Tokenizer, load_tokenizer

DEFAULT_CPU_SLOTS = 4096
DECODE_STEPS = 8  # decode steps per dispatch on the Python API path


def pick_device(device: str) -> jax.Device:
    if device == "cpu":
        return jax.devices("cpu")[0]
    if device == "gpu":
        try:
            return jax.devices("gpu")[0]
        except RuntimeError:
            raise WorkerError(ErrorCode.CUDA_ERROR, "no GPU is visible to JAX (use --device cpu to run on the CPU)")
    raise WorkerError(ErrorCode.INVALID_REQUEST, f"unknown device {device!r} (cpu or gpu)")


class Model:
    def __init__(self, gf: GGUFFile, tokenizer: Tokenizer, runner: Runner, device_kind: str):
        self.gguf = gf
        self.path = gf.path
        self.tokenizer = tokenizer
        self.runner = runner
        self.cfg = runner.cfg
        self.device_kind = device_kind
        self.quant_kind = quant_kind(gf.get("general.file_type"), (t.qtype for t in gf.tensors.values()))

    @property
    def architecture(self) -> str:
        return self.gguf.architecture

    @property
    def context_length(self) -> int:
        return self.runner.slots

    def _ids(self, prompt_or_ids: str | Sequence[int]) -> list[int]:
        if isinstance(prompt_or_ids, str):
            return self.tokenizer.encode(prompt_or_ids)
        return [int(i) for i in prompt_or_ids]

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """float32 [len(ids), vocab]: row i = logits after ids[: i + 1]."""
        ids = self._ids(ids)
        self._check_fits(len(ids), 0)
        return self.runner.all_logits(ids)

    def _check_fits(self, n_prompt: int, max_tokens: int) -> None:
        if n_prompt == 0:
            raise WorkerError(ErrorCode.INVALID_REQUEST, "the prompt is empty")
        if n_prompt > self.runner.slots:
            raise WorkerError(
                ErrorCode.INVALID_REQUEST,
                f"prompt has {n_prompt} tokens; the context holds {self.runner.slots}",
            )

    def generate_ids(self, prompt_or_ids: str | Sequence[int], max_tokens: int = 64, stop_at_eos: bool = True
                     ) -> Iterator[int]:  # fmt: skip
        """Greedy ids one by one; stops at max_tokens, EOS/end-of-turn (if asked) or the end of the context."""
        ids = self._ids(prompt_or_ids)
        self._check_fits(len(ids), max_tokens)
        runner = self.runner
        budget = min(max_tokens, runner.slots - len(ids))
        logits, cache = runner.prefill(ids, runner.new_cache())
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        position = len(ids)
        produced = 0
        pending = [int(token[0])]
        while True:
            for t in pending:
                yield t
                produced += 1
                if produced >= budget or (stop_at_eos and t in self.tokenizer.eog_ids):
                    return
            steps = min(DECODE_STEPS, runner.slots - position)
            out, cache = runner.decode(token, jnp.asarray([position], jnp.int32), cache, steps)
            position += steps
            token = out[:, -1]
            pending = [int(t) for t in np.asarray(out[0])]

    def generate(self, prompt_or_ids: str | Sequence[int], max_tokens: int = 64, temperature: float = 0.0,
                 seed: int | None = None, stop_at_eos: bool = True) -> list[int]:  # fmt: skip
        if temperature != 0.0:
            raise WorkerError(ErrorCode.INVALID_REQUEST, "sampling (temperature > 0) goes through worker.engine")
        return list(self.generate_ids(prompt_or_ids, max_tokens, stop_at_eos))

    def stream(self, prompt: str, max_tokens: int = 64, temperature: float = 0.0, seed: int | None = None
               ) -> Iterator[str]:  # fmt: skip
        decoder = StreamDecoder(self.tokenizer)
        for t in self.generate(prompt, max_tokens, temperature, seed):
            if t in self.tokenizer.eog_ids:
                break
            piece = decoder.push(t)
            if piece:
                yield piece
        tail = decoder.flush()
        if tail:
            yield tail


def load_model(path: str | Path, device: str = "cpu", slots: int | None = None, tokenizer_json: str | None = None,
               on_progress: Callable[[int, int], None] | None = None) -> Model:  # fmt: skip
    """Open, validate and place a model. `slots`: KV cache capacity in tokens (default: the file's context,
    capped at 4096 on the CPU). `on_progress(done_bytes, total_bytes)` is called after each tensor."""
    gf = open_gguf(path)
    adapter = adapter_for(gf.architecture)
    cfg = adapter.config(gf)
    dev = pick_device(device)
    tokenizer = load_tokenizer(gf.path, tokenizer_json)
    table = adapter.weight_table(gf, cfg)
    total, done = gf.tensor_bytes, 0

    def progress(nbytes: int) -> None:
        nonlocal done
        done += nbytes
        if on_progress is not None:
            on_progress(done, total)

    weights = load_weights(gf, table, lambda a: jax.device_put(a, dev), progress)
    if slots is None:
        slots = cfg.context_length if device != "cpu" else min(cfg.context_length, DEFAULT_CPU_SLOTS)
    runner = Runner(adapter, cfg, weights, dev, slots)
    return Model(gf, tokenizer, runner, dev.platform)
