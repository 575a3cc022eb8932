"""A loaded model: GGUF file -> adapter config -> weights on one device -> compiled runner + tokenizer.
The Python API (`worker.load`) and the engine build on this."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np

from worker import device as devices
from worker import ops
from worker.errors import ErrorCode, WorkerError
from worker.gguf import GGUFFile, open_gguf
from worker.models import adapter_for
from worker.models.base import load_weights
from worker.quant import cpu_layout, quant_kind
from worker.runner import Runner
from worker.sampling import SamplingParams, TokenLogprobs, seed_key
from worker.tokenizer import StreamDecoder, Tokenizer, load_tokenizer

DEFAULT_CPU_SLOTS = 4096
# Decode steps per dispatch. A cancel is checked between dispatches, so one dispatch must stay well under 100 ms.
# The next dispatch is queued before the previous one's ids are read, which hides a dispatch's fixed host cost
# (~2 ms: docs/PERFORMANCE.md, 2026-12-02): on an H200, qwen2.5-0.5b generates 129 ids in 152 ms at 8 steps per
# dispatch and 155 ms at 64, so the count only bounds the cancel latency. The GPU count is the power of two in
# [8, 64] that keeps an estimated dispatch near DISPATCH_TARGET_S, the estimate being the bytes a token reads at
# EFFECTIVE_BANDWIDTH plus a fixed per-step cost. On the CPU a step of the
# 270M model takes 40-90 ms on 2 cores (docs/PERFORMANCE.md) and a dispatch costs next to nothing more (one step per
# dispatch measured within the noise of forward + logits + sample), so two steps would pass the 100 ms bound for no
# gain: one step per dispatch.
DISPATCH_TARGET_S = 0.03
EFFECTIVE_BANDWIDTH = 2.0e12
STEP_OVERHEAD_S = 0.5e-3


def decode_steps_for(device_kind: str, bytes_per_token: int) -> int:
    if device_kind == "cpu":
        return 1
    est = bytes_per_token / EFFECTIVE_BANDWIDTH + STEP_OVERHEAD_S
    steps = 8
    while steps < 64 and 2 * steps * est <= DISPATCH_TARGET_S:
        steps *= 2
    return steps


GREEDY = SamplingParams()


class Generation:
    """The ids of one generation, as an iterator; once exhausted, `stop_reason` is "eos", "max_tokens" or "context"
    (the budget was the room left in the context)."""

    def __init__(self, ids: Generator[int, None, str]):
        self._ids = ids
        self.stop_reason: str | None = None

    def __iter__(self) -> Generation:
        return self

    def __next__(self) -> int:
        try:
            return next(self._ids)
        except StopIteration as end:
            self.stop_reason = end.value
            raise

    def close(self) -> None:
        self._ids.close()


class Model:
    def __init__(self, gf: GGUFFile, tokenizer: Tokenizer, runner: Runner, device_kind: str):
        self.gguf = gf
        self.path = gf.path
        self.tokenizer = tokenizer
        self.runner = runner
        self.cfg = runner.cfg
        self.device_kind = device_kind
        self.decode_steps = decode_steps_for(device_kind, gf.decode_weight_bytes)
        self._cache = None
        self.quant_kind = quant_kind(gf.get("general.file_type"), (t.qtype for t in gf.tensors.values()))

    @property
    def device(self) -> jax.Device:
        return self.runner.device

    def resident(self) -> bool:
        """Every weight array is alive on the model's device (M0-W-1012)."""
        return devices.resident(self.runner.weights, self.device)

    def weight_bytes(self) -> int:
        return devices.tree_bytes(self.runner.weights)

    def device_bytes_used(self) -> int:
        """Bytes in use on the device (allocator's count on a GPU; weights + KV cache on the CPU)."""
        stats = devices.memory_stats(self.device)
        if "bytes_in_use" in stats:
            return stats["bytes_in_use"]
        return self.weight_bytes() + self.runner.cache_bytes()

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
        self._check_fits(len(ids))
        return self.runner.all_logits(ids)

    def _check_fits(self, n_prompt: int) -> None:
        if n_prompt == 0:
            raise WorkerError(ErrorCode.INVALID_REQUEST, "the prompt is empty")
        if n_prompt > self.runner.slots:
            raise WorkerError(
                ErrorCode.INVALID_REQUEST,
                f"prompt has {n_prompt} tokens; the context holds {self.runner.slots}",
            )

    def generate_ids(
        self,
        prompt_or_ids: str | Sequence[int],
        max_tokens: int = 64,
        params: SamplingParams = GREEDY,
        seed: int = 0,
        stop_at_eos: bool = True,
        logprobs: list[TokenLogprobs] | None = None,
    ) -> Generation:
        """Generated ids one by one; stops at max_tokens, an end-of-generation id (if asked; it is not yielded) or
        the end of the context. The returned iterator's `stop_reason` says which, once it is exhausted: the one
        place the end of a sequence is decided (the engine and `stream` read it). With a `logprobs` list, each
        yielded token's TokenLogprobs is appended to it before the token is yielded (computed in the same compiled
        step; params.logprobs need not be set).

        The next decode dispatch is queued before the previous one's ids are read back, so the device never
        waits for the host; only int32 ids (and the asked-for log-probabilities) cross to the host."""
        return Generation(self._generate(prompt_or_ids, max_tokens, params, seed, stop_at_eos, logprobs))

    def _generate(
        self,
        prompt_or_ids: str | Sequence[int],
        max_tokens: int,
        params: SamplingParams,
        seed: int,
        stop_at_eos: bool,
        logprobs: list[TokenLogprobs] | None,
    ) -> Generator[int, None, str]:
        ids = self._ids(prompt_or_ids)
        self._check_fits(len(ids))
        r = self.runner
        budget = min(max_tokens, r.slots - len(ids))
        if logprobs is not None:
            params = dataclasses.replace(params, logprobs=True)
        sp, key, plan = params.arrays(), seed_key(seed), params.plan()
        logits, cache = r.prefill(ids, self._take_cache())
        token, seen, scores = r.sample(logits, sp, key, 0, r.seen_mask(ids), plan)
        position, produced, index = len(ids), 0, 1
        pending = token[:, None]
        pending_scores = jax.tree_util.tree_map(lambda a: a[:, None], scores)
        try:
            while True:
                nxt = None
                steps = min(self.decode_steps, r.slots - position)
                if produced + pending.shape[1] < budget and steps > 0:
                    nxt, cache, seen, nxt_scores = r.decode(
                        pending[:, -1], position, cache, seen, sp, key, index, steps, plan
                    )
                    for a in (nxt, *(nxt_scores or ())):
                        a.copy_to_host_async()
                    position, index = position + steps, index + steps
                # The whole array to the host, then index: a device-side `pending[0]` would be one more computation
                # queued behind the dispatch just launched, so every id would reach the host one dispatch late.
                got = _host_logprobs(pending_scores) if logprobs is not None else None
                for n, t in enumerate(np.asarray(pending)[0].tolist()):
                    if stop_at_eos and t in self.tokenizer.eog_ids:
                        return "eos"
                    if got is not None:
                        logprobs.append(got[n])
                    yield t
                    produced += 1
                    if produced >= budget:
                        break
                if produced >= budget or nxt is None:  # out of budget, or no room left for another step
                    return "max_tokens" if produced >= max_tokens else "context"
                pending, pending_scores = nxt, nxt_scores
        finally:
            self._cache = cache if _alive(cache) else None

    def warm_up(self, params: SamplingParams = GREEDY) -> None:
        """Compile what a first request with a short prompt and `params`' sampling stages runs (the model-sized
        compiles side by side), then run one such request of two tokens."""
        self.runner.compile_first_steps(params.arrays(), seed_key(0), params.plan(), self.decode_steps)
        for _ in self.generate_ids("warm-up", 2, params, stop_at_eos=False):
            pass

    def _take_cache(self):
        """The model's one KV cache (reused across calls: the causal mask hides stale slots)."""
        cache, self._cache = self._cache, None
        return cache if cache is not None else self.runner.new_cache()

    def generate(
        self,
        prompt_or_ids: str | Sequence[int],
        max_tokens: int = 64,
        temperature: float = 0.0,
        seed: int | None = None,
        stop_at_eos: bool = True,
        **sampling,
    ) -> list[int]:
        """Token ids of a completion (without the end-of-generation id). `sampling`: top_k, top_p, min_p,
        repetition_penalty."""
        params = SamplingParams(temperature=temperature, **sampling)
        return list(self.generate_ids(prompt_or_ids, max_tokens, params, seed or 0, stop_at_eos))

    def stream(
        self, prompt: str, max_tokens: int = 64, temperature: float = 0.0, seed: int | None = None
    ) -> Iterator[str]:
        decoder = StreamDecoder(self.tokenizer, continuation=True)
        for t in self.generate_ids(prompt, max_tokens, SamplingParams(temperature=temperature), seed or 0):
            piece = decoder.push(t)
            if piece:
                yield piece
        tail = decoder.flush()
        if tail:
            yield tail


def load_model(
    path: str | Path,
    device: str = "cpu",
    slots: int | None = None,
    tokenizer_json: str | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    gpu_index: int = 0,
    backend: str | None = None,
) -> Model:
    """Open, validate and place a model. `device`: "cpu", "gpu" or "auto". `slots`: KV cache capacity in tokens
    (default: the file's context, capped at 4096 on the CPU). `on_progress(done_bytes, total_bytes)` is called
    after each tensor is on the device. On a GPU, a model that does not fit fails with INSUFFICIENT_VRAM before
    any weight is copied. `backend`: the ops implementation (ops.BACKENDS; default: the device's), carried in the
    model's config; "interpret" runs the GPU kernels in Pallas interpret mode on the CPU (tests)."""
    gf = open_gguf(path)
    adapter = adapter_for(gf.architecture)
    cfg = adapter.config(gf)
    dev = devices.pick_device(device, gpu_index)
    kind = dev.platform
    if backend is None:
        backend = "cpu" if kind == "cpu" else "gpu"
    cfg = dataclasses.replace(cfg, backend=ops.check_backend(backend))
    if slots is None:
        slots = cfg.context_length if kind != "cpu" else min(cfg.context_length, DEFAULT_CPU_SLOTS)
    table = adapter.weight_table(gf, cfg)  # checks the tensors' shapes against cfg before memory is sized from it
    devices.check_fits(devices.estimate(gf, cfg, slots, kind), dev, str(gf.path))
    total, done = gf.tensor_bytes, 0

    def progress(nbytes: int) -> None:
        nonlocal done
        done += nbytes
        if on_progress is not None:
            on_progress(done, total)

    if on_progress is not None:
        on_progress(0, total)
    # The tokenizer is built while the weights load: for Gemma 3's 262,144 tokens that takes ~3 s of Python on a
    # 2-core CPU, and the loading mostly waits on copies that release the GIL.
    with ThreadPoolExecutor(1) as pool:
        building = pool.submit(load_tokenizer, gf if tokenizer_json is None else gf.path, tokenizer_json)
        weights = load_weights(gf, table, lambda a: jax.device_put(a, dev), progress)
        if backend == "cpu":  # the layout XLA's CPU backend computes with well (quant.Int8Blocks); the gpu and
            weights = cpu_layout(weights)  # interpret backends' kernels read the block planes
        tokenizer = building.result()
    runner = Runner(adapter, cfg, weights, dev, slots)
    return Model(gf, tokenizer, runner, kind)


def _host_logprobs(scores) -> list[TokenLogprobs]:
    """Row 0 of the runner's device scores ([1, n] each) as one TokenLogprobs per token (read whole, then indexed:
    see generate_ids)."""
    chosen, top_ids, top_lp = (np.asarray(a)[0] for a in scores)
    return [
        TokenLogprobs(float(c), tuple(zip(i.tolist(), p.tolist(), strict=True)))
        for c, i, p in zip(chosen, top_ids, top_lp, strict=True)
    ]


def _alive(cache) -> bool:
    """False once a donated buffer was consumed by a step that then failed (the cache must be rebuilt)."""
    return cache is not None and not any(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves(cache))
