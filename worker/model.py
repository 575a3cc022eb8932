"""A loaded model: GGUF file -> adapter config -> weights on one device -> compiled runner + tokenizer.
The Python API (`worker.load`) and the engine build on this."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from worker import cpu_kernels, ops, scheduler, sharding
from worker import device as devices
from worker.batch import Batch, key_data
from worker.errors import ErrorCode, WorkerError
from worker.gguf import GGUFFile, open_gguf
from worker.kv_cache import bytes_per_slot, dtype_for, pages_for
from worker.models import adapter_for
from worker.models.base import load_weights
from worker.pallas_kernels import qmatvec
from worker.quant import QuantArray, cpu_layout, quant_kind, widened
from worker.runner import WHEN_IDLE, Compile, Runner
from worker.sampling import SamplingParams, SamplingPlan, TokenLogprobs
from worker.tokenizer import StreamDecoder, Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

DEFAULT_CPU_SLOTS = 4096
DEFAULT_MAX_BATCH = {"cpu": 4, "gpu": 64}  # sequences decoded together (--max-batch)
# Of the device memory left after the weights, for the KV pool (--kv-memory). 0.9 failed on an H200 (gpt-oss-20b:
# the pool's 40 GiB zeros could not be allocated, docs/gpu.md): the allocator, CUDA and the kernels' workspaces take
# more than the estimate leaves.
DEFAULT_KV_MEMORY = 0.5
# Decode steps per dispatch. Jobs join and leave the batch (a cancelled job's row is freed) between dispatches, and
# a stream gets a dispatch's ids together, so one dispatch must stay short: well under 100 ms. The next dispatch is
# queued before the previous one's ids are read, which hides a dispatch's fixed host cost (~2 ms:
# docs/PERFORMANCE.md, 2026-12-02): on an H200, qwen2.5-0.5b generates 129 ids in 152 ms at 8 steps per dispatch
# and 155 ms at 64, so the count costs little speed. The GPU count starts as the power of two in [8, 64] that keeps
# an estimated dispatch near DISPATCH_TARGET_S, the estimate being the bytes a token reads at EFFECTIVE_BANDWIDTH
# plus a fixed per-step cost; the server's warm-up then times a dispatch of its largest row bucket and sizes the
# count from that (Model.calibrate_steps), as 64 rows take several times one row's step. On the CPU a step of the
# 270M model takes ~22 ms at one row on 2 cores and ~40 at four (the CPU's own kernel; docs/PERFORMANCE.md) and 2 or
# 4 steps a dispatch gained 2% or 7% (2026-12-06: 44.4 and 46.6 against 43.5 tok/s), a 4-step dispatch then ~90 ms of
# the 100 ms cancel bound at one row, past it at four, and slower machines are the CPU's usual ones: one step per
# dispatch.
DISPATCH_TARGET_S = 0.03
EFFECTIVE_BANDWIDTH = 2.0e12
STEP_OVERHEAD_S = 0.5e-3


def decode_kernels_for(max_batch: int, deterministic: bool) -> str:
    """The decode kernels (ops.DECODE_KERNELS) of a model decoding up to max_batch rows together. Batch invariant:
    one kind for every call, the tensor-core kernels where a dispatch can hold more rows than one per-row program
    takes (they make one pass over the weights for 64 rows, the per-row ones one per 8, but the per-row ones are
    faster for a few rows: docs/batching.md). Not invariant: each call by its own rows."""
    if not deterministic:
        return "by-rows"
    return "tensor-cores" if max_batch > qmatvec.MAX_ROWS else "per-row"


def quantized_experts(gf: GGUFFile) -> list:
    """The file's quantized MoE experts (3-D tensors in a kernel format): those `with_bf16_experts` widens."""
    return [t for t in gf.tensors.values() if len(t.shape) == 3 and t.qtype in qmatvec.KERNEL_TYPES]


def expert_copy_bytes(gf: GGUFFile) -> int:
    """Bytes of a bf16 copy of the file's quantized MoE experts."""
    return sum(2 * t.n_elements for t in quantized_experts(gf))


def with_bf16_experts(weights: dict) -> dict:
    """Each layer's quantized experts also widened to bf16 (exact for MXFP4: moe_matmul._mxfp4_bf16), under
    `decode_experts`: what a decode step's grouped MoE matmul reads. Why: at 64 or more rows a decode step's pairs
    route to nearly every expert, and dequantizing all of them in registers every step bound gpt-oss-20b's step
    on an H200 (15 of 20 ms at 64 rows, docs/PERFORMANCE.md); reading bf16 costs bytes, which that card has to
    spare (38 GB for gpt-oss-20b's experts). Prefill keeps the stored format: there each expert's tile serves
    hundreds of rows, and in registers it was faster (moe_matmul.PREFILL_TILES)."""
    widen = jax.jit(lambda q: widened(q, jnp.bfloat16))
    for lw in weights["layers"]:
        copies = {
            name: widen(w)
            for name, w in lw.items()
            if isinstance(w, QuantArray) and len(w.shape) == 3 and w.qtype in qmatvec.KERNEL_TYPES
        }
        if copies:
            lw["decode_experts"] = copies
    return weights


def steps_within(per_step_s: float, target_s: float) -> int:
    """The most steps (a power of two in [1, 64]) whose dispatch stays within target_s."""
    steps = 1
    while steps < 64 and 2 * steps * per_step_s <= target_s:
        steps *= 2
    return steps


def decode_steps_for(device_kind: str, bytes_per_token: int) -> int:
    if device_kind == "cpu":
        return 1
    est = bytes_per_token / EFFECTIVE_BANDWIDTH + STEP_OVERHEAD_S
    return max(8, steps_within(est, DISPATCH_TARGET_S))


# Prompt tokens prefilled between two decode dispatches. On a GPU, 8 chunks: at one chunk (512 tokens) a step, 64
# streams of 128-token prompts joined 4 a dispatch while each lived 4 dispatches (128 tokens at 32 steps), so the
# batch never grew past ~16 rows (docs/PERFORMANCE.md, 2026-12-02); 4096 tokens of a 0.5-3B model are milliseconds
# there. On the CPU a 512-token chunk of Gemma 3 270M takes ~2 s: one chunk a step (the default) keeps the running
# streams going.
PREFILL_TOKENS_PER_STEP = {"gpu": 4096}

GREEDY = SamplingParams()


@dataclasses.dataclass
class WarmUp:
    """Where a warm-up's time went: each program's `Compile`; `compile_s`, the wall time of the compiles (side by
    side), and `lowering_s`, of that the time until every program was lowered (Python's part: where it is most of
    compile_s, the tracing is what a start waits for, not XLA); and the whole warm-up's seconds (the compiles, the
    dispatch that sizes the steps, a first request)."""

    compiles: list[Compile]
    compile_s: float
    lowering_s: float
    total_s: float
    decode_steps: int

    def fields(self, slowest: int = 5) -> dict:
        """For the server's `ready` log event."""
        top = sorted(self.compiles, key=lambda c: -(c.lower_s + c.compile_s))[:slowest]
        # the most memory a program allocates beside its arguments: a copy of the KV pool, or a pool not updated in
        # place, would show here (a pool of 22 GiB beside gpt-oss-20b's weights, where XLA's rematerialization
        # warned of 55.6 GiB a program on an H100)
        extra = max(self.compiles, key=lambda c: c.extra_bytes or 0, default=None)
        return {
            "programs": len(self.compiles),
            "compile_ms": round(self.compile_s * 1000.0, 1),
            "lowering_ms": round(self.lowering_s * 1000.0, 1),
            "compile_sum_ms": round(sum(c.compile_s for c in self.compiles) * 1000.0, 1),
            "slowest": {c.name: [round(c.lower_s * 1000.0, 1), round(c.compile_s * 1000.0, 1)] for c in top},
            "most_extra_bytes": {extra.name: extra.extra_bytes} if extra and extra.extra_bytes is not None else None,
            "warm_up_ms": round(self.total_s * 1000.0, 1),
            "decode_steps_per_dispatch": self.decode_steps,
        }


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
    def __init__(self, gf: GGUFFile, tokenizer: Tokenizer, runner: Runner, device_kind: str,
                 prefill_tokens: int | None = None):  # fmt: skip
        self.gguf = gf
        self.path = gf.path
        self.tokenizer = tokenizer
        self.runner = runner
        self.cfg = runner.cfg
        self.device_kind = device_kind
        # The model's continuous batch over its KV pool (the pool is allocated at its first step); the engine and
        # generate_ids share it.
        steps = decode_steps_for(device_kind, gf.decode_weight_bytes)
        self.batch = Batch(runner, tokenizer, steps, prefill_tokens or PREFILL_TOKENS_PER_STEP.get(device_kind))
        self.quant_kind = quant_kind(gf.get("general.file_type"), (t.qtype for t in gf.tensors.values()))
        self.warmed: WarmUp | None = None  # the last warm_up's times

    @property
    def bf16_experts(self) -> bool:
        """Whether the MoE experts have a bf16 copy for decode (`with_bf16_experts`)."""
        return any("decode_experts" in lw for lw in self.runner.weights.get("layers", ()))

    @property
    def device(self) -> jax.Device:
        return self.runner.device

    @property
    def devices(self) -> list[jax.Device]:
        """The devices the model is on: one, or the tensor-parallel mesh's."""
        return sharding.mesh_devices(self.runner.mesh) if self.runner.mesh is not None else [self.device]

    @property
    def cpu_kernel(self) -> bool:
        """Whether the CPU layout's decode products run on the CPU's own kernel (worker/cpu_kernels), which builds
        on first use; False on the GPU and where it did not build (then XLA's tile walk, logged why)."""
        return self.cfg.backend == "cpu" and cpu_kernels.available()

    @property
    def layout(self) -> str:
        """How the model is spread over its devices: "one-device", "tensor-parallel" or "head-parallel"."""
        mesh = self.runner.mesh
        if mesh is None:
            return "one-device"
        return "head-parallel" if sharding.HEAD in mesh.axis_names else "tensor-parallel"

    def resident(self) -> bool:
        """Every weight array is alive on the model's devices (M0-W-1012)."""
        return devices.resident(self.runner.weights, set(self.devices))

    def weight_bytes(self) -> int:
        return devices.tree_bytes(self.runner.weights)

    def device_bytes_used(self) -> int:
        """Bytes in use on the model's devices together (allocator's count on a GPU; weights + KV cache on the
        CPU)."""
        return sum(self.device_bytes().values())

    def device_report(self) -> list[dict]:
        """Per device: id, bytes in use (the allocator's count; on the CPU, this device's shards of the weights
        and the KV pool), bytes limit (None on the CPU) and whether every weight still has its shard there."""
        report = []
        for d in self.devices:
            stats = devices.memory_stats(d)
            used, resident = self._bytes_in_use(d, stats), devices.resident(self.runner.weights, {d}, shard=True)
            report.append(
                {"id": d.id, "bytes_in_use": used, "bytes_limit": stats.get("bytes_limit"), "resident": resident}
            )
        return report

    def device_bytes(self) -> dict[int, int]:
        """Bytes in use per device id, without device_report's residency check of every weight (cheap on a GPU:
        the allocator's counter)."""
        return {d.id: self._bytes_in_use(d, devices.memory_stats(d)) for d in self.devices}

    def _bytes_in_use(self, d: jax.Device, stats: dict[str, int]) -> int:
        used = stats.get("bytes_in_use")
        if used is None:
            used = devices.tree_bytes(self.runner.weights, d) + self.runner.cache_bytes() // self.runner.kv_split
        return used

    @property
    def architecture(self) -> str:
        return self.gguf.architecture

    @property
    def context_length(self) -> int:
        return self.runner.context

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
        if n_prompt > self.context_length:
            raise WorkerError(
                ErrorCode.INVALID_REQUEST,
                f"prompt has {n_prompt} tokens; the context holds {self.context_length}",
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
        the end of the context. The returned iterator's `stop_reason` says which, once it is exhausted (decided in
        worker/batch.py, the one place a sequence's end is decided). With a `logprobs` list, each yielded token's
        TokenLogprobs is appended to it before the token is yielded (computed in the same compiled step;
        params.logprobs need not be set).

        The sequence runs through the same batched steps as the server's jobs (one row of a batch), so its ids
        are the ones the server gives for the same request, whoever else it serves. Not thread-safe: while an
        Engine serves this model, use the engine."""
        return Generation(self._generate(prompt_or_ids, max_tokens, params, seed, stop_at_eos, logprobs))

    def sequence(self, ids: list[int], max_tokens: int, params: SamplingParams, seed: int, stop_at_eos: bool = True,
                 owner: object = None) -> scheduler.Sequence:  # fmt: skip
        """A sequence for `self.batch`: the prompt `ids` and a budget of max_tokens or the room left in the
        context."""
        self._check_fits(len(ids))
        budget = min(max_tokens, self.context_length - len(ids))
        return scheduler.Sequence(ids, budget, max_tokens, params, key_data(seed), stop_at_eos, owner)

    def _generate(
        self,
        prompt_or_ids: str | Sequence[int],
        max_tokens: int,
        params: SamplingParams,
        seed: int,
        stop_at_eos: bool,
        logprobs: list[TokenLogprobs] | None,
    ) -> Generator[int, None, str]:
        if logprobs is not None:
            params = dataclasses.replace(params, logprobs=True)
        seq = self.sequence(self._ids(prompt_or_ids), max_tokens, params, seed, stop_at_eos)
        batch = self.batch
        batch.add(seq)
        try:
            while True:
                for d in batch.step():
                    if d.seq is not seq:
                        continue
                    if d.error is not None:
                        raise d.error
                    for n, t in enumerate(d.tokens):
                        if logprobs is not None:
                            logprobs.append(d.logprobs[n])
                        yield t
                    if d.finished is not None:
                        return d.finished
        finally:
            batch.release(seq)

    @property
    def decode_steps(self) -> int:
        """Decode steps per dispatch."""
        return self.batch.steps

    def warm_up(self, params: SamplingParams = GREEDY, all_rows: bool = False,
                dispatch_s: float = DISPATCH_TARGET_S) -> WarmUp:  # fmt: skip
        """Compile what a first request with a short prompt and `params`' sampling stages runs (the model-sized
        compiles side by side), with `all_rows` the decode at every row bucket and the prefill of every group size
        (what a growing load reaches; on the CPU, compiling ahead, the row buckets past the first are asked for when
        idle after it), then run one such request of two tokens. With `all_rows` on a GPU, the steps
        of a dispatch are first sized from a timed dispatch of the largest bucket (`calibrate_steps`, to
        `dispatch_s` seconds), and greedy decoding's stages are compiled beside `params`': a program is compiled per
        set of stages, and on an H200 each compile of gpt-oss-20b's took ~15 s, which a greedy load's streams waited
        through on every row bucket's first use (docs/PERFORMANCE.md, sixth session). Returns where its time went."""
        t0, compiles, walls, lowering = time.perf_counter(), [], [], []

        def compile_steps(*args, **kwargs) -> None:
            t = time.perf_counter()
            done = self.runner.compile_first_steps(*args, **kwargs)
            compiles.extend(done)
            walls.append(time.perf_counter() - t)
            lowering.append(max((c.lowered for c in done), default=t) - t)  # until every program was lowered

        seq = self.sequence([0], 1, params, 0)
        inputs, plan, rows = self.batch.row_inputs([(0, seq)], 1, 1), params.plan(), self.runner.row_buckets()
        rows, compiled, plans = rows if all_rows else rows[:1], False, (plan,)
        # The CPU compiles the first row bucket before `ready`, the others after it (below): each is a whole-model
        # compile, and on 2 cores the three of Gemma 3 270M's default --max-batch 4 side by side took the README's
        # `just serve` from ~17 s to ~27-29 s to `ready` (docs/PERFORMANCE.md, CPU, thirty-eighth entry). A second
        # job meanwhile waits for its bucket's compile on the background thread while the first streams on
        # (Batch._join_ready).
        rows, later = (rows[:1], rows[1:]) if self.device_kind == "cpu" and self.runner.compile_ahead else (rows, ())
        if all_rows and self.device_kind != "cpu":
            plans = tuple(dict.fromkeys((plan, GREEDY.plan())))
            compile_steps(inputs, plans, self.decode_steps, rows[-1:])
            before, compiled = self.decode_steps, True
            if self.calibrate_steps(plan, dispatch_s) == before:
                rows = rows[:-1]  # compiled at these steps already
        groups = tuple(self.runner.group_buckets()) if all_rows else ()
        # A prompt alone in its dispatch, at every chunk bucket above the first (compiled beside the decode): on a
        # GPU, where each is one more compile in parallel. On the 2-core CPU each would add ~4-15 s to the start, so
        # there they are compiled after it, smallest first, on the runner's background thread (Runner.prefill_soon).
        buckets = tuple(self.runner.chunk_buckets()[1:])
        lone = buckets if compiled else ()
        compile_steps(inputs, plans, self.decode_steps, tuple(rows), prefill=not compiled, groups=groups, lone=lone)
        for _ in self.generate_ids("warm-up", 2, params, stop_at_eos=False):
            pass
        # The CPU: those chunk buckets once the batch is idle, then the decode's other row buckets, the largest first
        # (it covers the smaller ones meanwhile, Runner.decode_cover). (Greedy decoding's program is not among them: a
        # greedy job decodes on the sampled one until its own compiles.)
        for b in buckets if all_rows and not compiled else ():
            self.runner.prefill_soon(b, self.runner.table_width(b), WHEN_IDLE)
        for r in reversed(later):
            self.runner.decode_soon(r, self.runner.table_width(1), self.decode_steps, plan, WHEN_IDLE)
        self.warmed = WarmUp(compiles, sum(walls), sum(lowering), time.perf_counter() - t0, self.decode_steps)
        return self.warmed

    def calibrate_steps(self, plan: SamplingPlan, target_s: float = DISPATCH_TARGET_S) -> int:
        """Set the decode steps of a dispatch from a timed dispatch of the largest row bucket: the most (a power of
        two, at most 64) that keep it within `target_s` at full load. The byte-count estimate the model starts with
        misses by 6x once 64 rows share a dispatch (phi3-mini on an H200: 16 steps of 64 rows took 165 ms)."""
        per_step = self.batch.time_decode(self.runner.row_buckets()[-1], plan) / self.batch.steps
        self.batch.steps = steps_within(per_step, target_s)
        return self.batch.steps

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
    max_batch: int | None = None,
    kv_memory: float = DEFAULT_KV_MEMORY,
    kv_tokens: int | None = None,
    deterministic: bool = True,
    tensor_parallel: int = 1,
    head_parallel: int = 1,
    cpu_devices: int | None = 1,
    bf16_experts: bool | None = None,
    prefill_tokens: int | None = None,
    int8_x: bool = False,
) -> Model:
    """Open, validate and place a model. `device`: "cpu", "gpu" or "auto". `slots`: the most positions of one
    sequence (default: the file's context, capped at 4096 on the CPU). `max_batch`: sequences decoded together
    (default DEFAULT_MAX_BATCH). The KV pool holds max_batch * slots positions, or `kv_memory` of the device
    memory left after the weights where that is less (but at least one whole context), or exactly `kv_tokens`
    positions where given; a sequence's context is then at most the pool. `deterministic`: a job's ids do not
    depend on the jobs sharing its batch (docs/batching.md; off, the CPU computes rows together, faster).
    `on_progress(done_bytes, total_bytes)` is called after each tensor is on the device. On a GPU, a model that
    does not fit fails with INSUFFICIENT_VRAM before any weight is copied. `backend`: the ops implementation
    (ops.BACKENDS; default: the device's), carried in the model's config; "interpret" runs the GPU kernels in
    Pallas interpret mode on the CPU (tests). `tensor_parallel`: split the model over that many devices of the
    kind (from `gpu_index` on; docs/tensor-parallel.md); a split the model cannot take (heads, kv heads,
    vocabulary, experts, quantized blocks) fails with MODEL_LOAD_FAILED before any weight is copied, and the
    pre-flight counts what each device holds. `head_parallel`: on the CPU, only the vocabulary's rows (the output
    head, the embedding) split over that many host devices, the rest whole on each and held once, a prefill chunk's
    tokens split over them (worker/sharding.py). `cpu_devices`: on the CPU, over that many host devices in the
    faster layout the model takes: tensor parallelism, else head parallelism (over as many of them as divide the
    vocabulary), else one device; None: every host device JAX has (the CLI's default). `bf16_experts`: also hold
    the quantized MoE experts widened to bf16, which decode steps read (`with_bf16_experts`); None: where it helps
    and fits (a GPU, decode steps on the grouped MoE kernel: the tensor-core decode kernels, or more than 8 rows
    without determinism; its dot unswapped on an expert format, WORKER_TC_SWAP; one device, and room for the copy
    beside one whole context).
    `prefill_tokens`: prompt tokens prefilled an engine step, at least one chunk (default PREFILL_TOKENS_PER_STEP:
    4096 on a GPU, one chunk on the CPU): more finishes a burst of prompts sooner, and stalls the running streams
    longer each step.
    `int8_x`: decode's matvecs (dense and routed experts) on x rounded to int8 where the weight's format has that
    kernel (ops' "per-row-int8" decode kernels: another precision of x, ~0.5% of a product; batch invariant;
    docs/kernels.md), with max_batch by default qmatvec.MAX_ROWS (8): one stream's fastest decode on a GPU
    (docs/PERFORMANCE.md)."""
    gf = open_gguf(path)
    adapter = adapter_for(gf.architecture)
    cfg = adapter.config(gf)
    dev = devices.pick_device(device, gpu_index)
    kind = dev.platform
    if backend is None:
        backend = "cpu" if kind == "cpu" else "gpu"
    cfg = dataclasses.replace(cfg, backend=ops.check_backend(backend))
    mesh = sharding.mesh_for(cfg, kind, tensor_parallel, gpu_index) if tensor_parallel != 1 else None
    cpu = kind == "cpu" and backend == "cpu"
    for ask, name in ((head_parallel, "head parallelism"), (cpu_devices, "cpu_devices")):
        if ask != 1 and ask is not None and (mesh is not None or not cpu):
            raise WorkerError(ErrorCode.INVALID_REQUEST, f"{name} over {ask} devices is a layout of the CPU backend "
                              "on one machine's host devices: not with a GPU, the interpret backend or tensor "
                              "parallelism")  # fmt: skip
    if head_parallel != 1:
        mesh = sharding.head_mesh(cfg, head_parallel)
    cfg = dataclasses.replace(cfg, mesh=mesh)  # the kernel backends' ops wrap their kernels in shard_map over it
    if slots is None:
        slots = cfg.context_length if kind != "cpu" else min(cfg.context_length, DEFAULT_CPU_SLOTS)
    if not 0.0 < kv_memory <= 1.0:
        raise WorkerError(ErrorCode.INVALID_REQUEST, f"kv_memory must lie in (0, 1], got {kv_memory}")
    if prefill_tokens is not None and prefill_tokens < 1:
        raise WorkerError(ErrorCode.INVALID_REQUEST, f"prefill_tokens must be at least 1, got {prefill_tokens}")
    if max_batch is None and int8_x:  # the per-row kernel's rows (timed); beyond them the int8-x dot (untimed)
        max_batch = qmatvec.MAX_ROWS
    max_batch = max_batch or DEFAULT_MAX_BATCH["cpu" if kind == "cpu" else "gpu"]
    if max_batch < 1:
        raise WorkerError(ErrorCode.INVALID_REQUEST, f"max_batch must be at least 1, got {max_batch}")
    if deterministic and backend != "cpu" and max_batch > qmatvec.MAX_BATCH:
        raise WorkerError(ErrorCode.INVALID_REQUEST, f"max_batch {max_batch}: the batch-invariant kernels take "
                          f"at most {qmatvec.MAX_BATCH} decode rows; ask for that many or fewer, or turn determinism "
                          "off")  # fmt: skip
    if int8_x and (backend == "cpu" or mesh is not None):
        raise WorkerError(ErrorCode.INVALID_REQUEST, "int8_x (--int8-x) needs a kernel backend (a GPU, or interpret) "
                          "and one device (no --tensor-parallel)")  # fmt: skip
    kernels = "per-row-int8" if int8_x else decode_kernels_for(max_batch, deterministic)
    cfg = dataclasses.replace(cfg, decode_kernels=kernels)
    table = adapter.weight_table(gf, cfg)  # checks the tensors' shapes against cfg before memory is sized from it
    if cpu and mesh is None and cpu_devices != 1:
        n = len(jax.devices("cpu")) if cpu_devices is None else cpu_devices
        mesh = sharding.cpu_mesh(gf, table, cfg, n)
        cfg = dataclasses.replace(cfg, mesh=mesh)
    per_token = bytes_per_slot(cfg, dtype_for(kind))
    if mesh is not None:  # each device holds its shards: the pre-flight counts those, on every device
        sharding.check_splits(gf, table, cfg, mesh)
        per_token //= sharding.kv_split(mesh)
    targets = sharding.mesh_devices(mesh) if mesh is not None else [dev]

    copy_bytes = expert_copy_bytes(gf)
    if bf16_experts and (backend == "cpu" or mesh is not None or not copy_bytes):
        raise WorkerError(ErrorCode.INVALID_REQUEST, "bf16 experts need a kernel backend (gpu or interpret), one "
                          "device and a file with quantized MoE experts")  # fmt: skip
    # The decode steps whose MoE takes the grouped kernel: every one on the tensor cores, those of more than
    # qmatvec.MAX_ROWS rows "by-rows" (--no-deterministic: gpt-oss-20b 3,135.6 tok/s at 64 streams without the copy
    # against 3,220.6 with it, H100s, 2026-12-07; the copy's gain grows with the rows, docs/PERFORMANCE.md)
    grouped = cfg.decode_kernels == "tensor-cores" or (cfg.decode_kernels == "by-rows" and max_batch > qmatvec.MAX_ROWS)
    # ... and only where that kernel's decode dot is unswapped on the experts' format (WORKER_TC_SWAP): swapped, the
    # stored experts dequantized in registers are the faster read. gpt-oss-20b at 64 streams: 3,705.7 and 3,835.1
    # tok/s on the stored MXFP4 against 3,368.0 and 3,291.5 on the copy (two rounds, one stream the same; an H100,
    # 2026-12-07, docs/PERFORMANCE.md), and the copy's 38 GB go to the KV pool (3.7x its pages) instead.
    unswapped = any(not ops.tc_swapped(t.qtype) for t in quantized_experts(gf))
    auto = bf16_experts is None and backend == "gpu" and mesh is None and grouped and unswapped
    copies = copy_bytes if bf16_experts or auto else 0

    def on_each(need: devices.MemoryEstimate) -> devices.MemoryEstimate:
        need = dataclasses.replace(need, weights=need.weights + copies)
        return sharding.per_device(need, gf, table, mesh) if mesh is not None else need

    def check_fits(tokens: int) -> None:
        for d in targets:
            devices.check_fits(on_each(devices.estimate(gf, cfg, tokens, kind)), d, str(gf.path))

    if copies and auto:
        try:  # the copy only where it leaves room for the pool the checks below ask for
            check_fits(slots if kv_tokens is None else kv_tokens)
        except WorkerError:
            copies = 0

    if kv_tokens is None:
        # At least one sequence of the whole context must fit (M0-W-1020's pre-flight check); the pool then takes
        # `kv_memory` of what is left, up to max_batch such sequences.
        check_fits(slots)
        need = on_each(devices.estimate(gf, cfg, 0, kind))
        share = len(targets) if cpu else 1  # host devices share the host's memory
        available = devices.host_memory_available() if cpu else None
        pool = min(devices.kv_pool_tokens(need, per_token, max_batch * slots, d, kv_memory, available, share)
                   for d in targets)  # fmt: skip
        one_context = share * (need.weights + need.working + slots * per_token)
        if available is not None and one_context > available:
            log.warning(
                "host memory is tight: %s holds %.1f GB of weights and %.1f GB of KV cache for one %d-token "
                "context, and the OS has %.1f GB to give; the host may swap (a smaller context: --kv-cache-size-mb "
                "or --max-tokens-in; or a smaller model)", gf.path.name, need.weights * share / 1e9,
                slots * per_token * share / 1e9, slots, available / 1e9)  # fmt: skip
        kv_tokens = max(slots, pool)
    else:
        check_fits(kv_tokens)
    if kv_tokens < 1:
        raise WorkerError(ErrorCode.INVALID_REQUEST, f"a KV pool must hold at least one position, got {kv_tokens}")
    slots = min(slots, kv_tokens)
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
    with ThreadPoolExecutor(1) as pool, devices.host_memory_returned():
        building = pool.submit(load_tokenizer, gf if tokenizer_json is None else gf.path, tokenizer_json)
        place = sharding.placer(cfg, mesh) if mesh is not None else None
        fuse = backend != "cpu" and place is None
        weights = load_weights(gf, table, lambda a: jax.device_put(a, dev), progress, place, fuse)
        if backend == "cpu":  # the layout XLA's CPU backend computes with well (quant.Int8Blocks); the gpu and
            # interpret backends' kernels read the block planes
            weights = cpu_layout(weights, devices.held_once if mesh is not None else lambda m: m)
            cpu_kernels.available()  # built now (~3 s the first time on a machine), not inside the first compile
            if mesh is not None:
                weights = devices.held_once(weights)  # the vectors and float matrices
        if copies:
            weights = with_bf16_experts(weights)
        tokenizer = building.result()
    runner = Runner(adapter, cfg, weights, targets[0], slots, pages_for(kv_tokens) + 1, max_batch,
                    deterministic=deterministic, mesh=mesh)  # fmt: skip
    return Model(gf, tokenizer, runner, kind, prefill_tokens)
