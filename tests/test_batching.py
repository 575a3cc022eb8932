"""Continuous batching on the CPU: the scheduler's bookkeeping, batch invariance (a seeded job's ids are the same
alone and among 1, 7 and 31 others arriving at random times, with mixed sampling parameters), a KV pool too small
for everyone (later jobs wait, nobody is corrupted), and many concurrent engine jobs that end independently."""

from __future__ import annotations

import queue
import random
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import oracles_dir

import worker
from worker import ops
from worker.engine import End, Engine, ErrorEvent, JobRequest, TokenEvent
from worker.errors import ErrorCode
from worker.kv_cache import KVCache, pages_for, table_row
from worker.models.base import live_tokens
from worker.pallas_kernels import rms_norm as rms_norm_kernel
from worker.sampling import SamplingParams
from worker.scheduler import PagePool, Scheduler, Sequence

# -- the scheduler (no device) ----------------------------------------------------------------------------------


def test_page_pool_never_hands_out_the_null_page_and_takes_back_what_it_gave():
    pool = PagePool(9)
    got = pool.take(8)
    assert sorted(got) == list(range(1, 9)) and pool.free == 0 and pool.take(1) is None
    pool.give(got[:3])
    assert pool.free == 3 and pool.used == 5 and set(pool.take(3)) == set(got[:3])


def test_admission_is_first_come_first_served_and_reserves_every_page_up_front():
    s = Scheduler(max_batch=2, pages=1 + 6, page_size=16)
    big, small, tiny = (Sequence(list(range(n)), budget=b, max_tokens=b) for n, b in ((40, 25), (10, 6), (3, 2)))
    for seq in (big, small, tiny):
        s.add(seq)
    assert s.admit() == [big, small]  # 64 positions: 4 pages, and 15: 1; `tiny` waits for a row
    assert len(big.pages) == 4 and len(small.pages) == 1 and tiny.row is None and s.pool.free == 1
    s.release(big)
    assert s.pool.free == 5 and big.row is None and s.admit() == [tiny] and tiny.row == 0


def test_live_tokens_are_those_with_a_page_of_their_own():
    """base.live_tokens: a decode bucket's empty row (null pages) and a prefill chunk's padding (positions past the
    table) are not live; the MoE kernel skips their experts."""
    cache = KVCache(jnp.zeros((1, 8, 16, 1, 4)), jnp.zeros((1, 8, 16, 1, 4)))  # 8 pages of 16 positions
    table = jnp.asarray(np.stack([table_row([3, 5], 4), table_row([], 4), table_row([2], 4)]))
    positions = jnp.asarray([[0, 31], [0, 1], [15, 64]])  # row 1: no pages; 64: past the 4-page table
    live = np.asarray(live_tokens(cache, table, positions))
    np.testing.assert_array_equal(live, [[True, True], [False, False], [True, False]])
    assert not live_tokens(cache, table, jnp.asarray([[32, 0], [0, 0], [16, 0]]))[:, 0].any()  # unallocated pages


def test_a_sequence_larger_than_the_whole_pool_is_refused():
    s = Scheduler(max_batch=4, pages=1 + 2, page_size=16)
    with pytest.raises(ValueError, match="exceeds the whole KV pool"):
        s.add(Sequence(list(range(30)), budget=10, max_tokens=10))


def test_the_head_of_the_line_is_not_overtaken():
    s = Scheduler(max_batch=4, pages=1 + 4, page_size=16)
    first, second, third = (Sequence([1] * n, budget=1, max_tokens=1) for n in (48, 33, 16))
    for seq in (first, second, third):
        s.add(seq)
    assert s.admit() == [first]  # 3 pages; `second` needs 3 of the 1 left, and `third` (1 page) must not jump it
    assert s.admit() == [] and third.row is None
    s.release(first)
    assert s.admit() == [second, third]


# -- batch invariance -------------------------------------------------------------------------------------------


def model_path(arch: str):
    return oracles_dir() / "models" / arch / ("model-mxfp4_moe.gguf" if arch == "gpt-oss" else "model-q8_0.gguf")


OTHERS = [
    SamplingParams(),
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=20, top_p=0.9),
    SamplingParams(temperature=1.2, min_p=0.05, repetition_penalty=1.3),
    SamplingParams(temperature=0.9, logprobs=True),
]


def run_batch(model, jobs: list[tuple[list[int], SamplingParams, int, int]], arrivals: list[int]) -> list[list[int]]:
    """Run (prompt ids, params, seed, max_tokens) jobs through the model's batch, job i joining at step
    arrivals[i]; returns each job's ids."""
    batch, out = model.batch, [[] for _ in jobs]
    seqs = [model.sequence(ids, n, p, seed, stop_at_eos=False, owner=i) for i, (ids, p, seed, n) in enumerate(jobs)]
    step, done = 0, 0
    while done < len(jobs):
        for i, at in enumerate(arrivals):
            if at == step:
                batch.add(seqs[i])
        for d in batch.step():
            assert d.error is None, d.error
            out[d.seq.owner].extend(d.tokens)
            done += d.finished is not None
        step += 1
    return out


@pytest.mark.parametrize("device", ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("arch", ["qwen2", "gpt-oss"])
def test_a_seeded_job_gives_the_same_ids_whoever_shares_its_batch(arch, device):
    # On a GPU each (row bucket, page-table width, union of sampling plans) is a program of its own, compiled on
    # first use (seconds each): with 32 rows and every plan the run did not finish in 330 s on an H200 (seventh
    # session, docs/gpu.md). There it takes 16 rows (still the tensor-core kernels, and the MoE's bf16 copy) and
    # leaves out the log-probabilities' plan; the penalty and filter stages still join the targets' plan.
    max_batch, others_params = (32, OTHERS) if device == "cpu" else (16, OTHERS[:4])
    model = worker.load(model_path(arch), device=device, slots=256, max_batch=max_batch)
    vocab, rng = model.cfg.vocab_size, random.Random(7)
    prompt = [rng.randrange(vocab) for _ in range(21)]
    targets = [(prompt, SamplingParams(temperature=0.8, top_p=0.9), 1234, 24), (prompt, SamplingParams(), 0, 24)]
    alone = [run_batch(model, [job], [0])[0] for job in targets]
    assert alone[1] == model.generate(prompt, max_tokens=24, stop_at_eos=False)  # the Python API is the same path
    for n_others in (1, 7, 31):
        others = [([rng.randrange(vocab) for _ in range(rng.randrange(1, 40))], others_params[i % len(others_params)],
                   rng.randrange(2**32), rng.randrange(1, 30)) for i in range(n_others)]  # fmt: skip
        jobs = targets + others
        arrivals = [rng.randrange(4), rng.randrange(4)] + [rng.randrange(12) for _ in others]
        got = run_batch(model, jobs, arrivals)
        assert got[:2] == alone, f"{n_others} others changed a job's ids"


def test_without_determinism_the_cpu_computes_the_rows_together_and_every_job_still_ends():
    model = worker.load(model_path("qwen2"), device="cpu", slots=256, max_batch=4, deterministic=False)
    rng = random.Random(5)
    jobs = [([rng.randrange(model.cfg.vocab_size) for _ in range(9 + i)], OTHERS[i], i, 6 + i) for i in range(4)]
    got = run_batch(model, jobs, [0, 0, 1, 2])
    assert [len(ids) for ids in got] == [6, 7, 8, 9]
    assert got[0] == model.generate(jobs[0][0], max_tokens=6, stop_at_eos=False)  # greedy: the same argmax here


def test_when_the_pool_is_short_later_jobs_wait_and_nobody_is_corrupted():
    model = worker.load(model_path("qwen2"), device="cpu", slots=64, max_batch=2)  # a pool of 128 positions
    rng = random.Random(3)
    jobs = [([rng.randrange(model.cfg.vocab_size) for _ in range(40)], SamplingParams(), 0, 20) for _ in range(3)]
    alone = [run_batch(model, [job], [0])[0] for job in jobs]
    batch = model.batch
    seqs = [model.sequence(ids, n, p, seed, stop_at_eos=False, owner=i) for i, (ids, p, seed, n) in enumerate(jobs)]
    for seq in seqs:
        batch.add(seq)
    first = batch.step()
    assert [s.row is not None for s in seqs] == [True, True, False]  # 4 pages each, 8 in the pool
    assert batch.scheduler.pool.free == 0
    out = {i: [] for i in range(3)}
    for d in first:
        out[d.seq.owner].extend(d.tokens)
    finished = 0
    while finished < 3:
        for d in batch.step():
            out[d.seq.owner].extend(d.tokens)
            finished += d.finished is not None
    assert [out[i] for i in range(3)] == alone


# -- the engine: many jobs at once ------------------------------------------------------------------------------


class Collector:
    def __init__(self):
        self.events: queue.Queue = queue.Queue()

    def __call__(self, ev) -> None:
        self.events.put(ev)

    def until_end(self, timeout: float = 120.0) -> list:
        out = []
        while True:
            ev = self.events.get(timeout=timeout)
            out.append(ev)
            if isinstance(ev, End | ErrorEvent):
                return out


def test_many_engine_jobs_run_together_end_on_their_own_and_a_cancel_touches_only_its_job():
    model = worker.load(model_path("qwen2"), device="cpu", slots=256, max_batch=4)
    engine = Engine(model, max_queue=8)
    engine.start()
    try:
        sinks = {f"j{i}": Collector() for i in range(8)}
        for i, (job_id, sink) in enumerate(sinks.items()):
            max_tokens = 200 if job_id == "j1" else 12 + i
            engine.submit(JobRequest(job_id, "Once upon a time", max_tokens=max_tokens, temperature=0.0), sink)
        most, deadline = 0, time.monotonic() + 120
        while "j1" not in engine.running and time.monotonic() < deadline:
            most = max(most, len(engine.running))
            time.sleep(0.005)
        assert most <= 4  # max_batch run at once, the rest wait in the queue
        engine.cancel("j1")
        results = {job_id: sink.until_end() for job_id, sink in sinks.items()}
    finally:
        engine.shutdown(2.0)
    assert results["j1"][-1].code == ErrorCode.CANCELLED
    alone = model.generate("Once upon a time", max_tokens=20)
    for job_id, events in results.items():
        if job_id == "j1":
            continue
        end = events[-1]
        assert isinstance(end, End), end
        text = "".join(e.text for e in events if isinstance(e, TokenEvent))
        assert end.stop_reason in ("max_tokens", "eos")
        expected = model.tokenizer.decode(alone[: end.tokens_out], continuation=True)
        assert text == expected, job_id  # the same greedy text as alone, whoever shared the batch


# -- paged attention (the CPU path) ------------------------------------------------------------------------------


@pytest.mark.parametrize("window, sinks", [(None, False), (24, True)])
def test_paged_decode_attention_equals_dense_attention_whatever_the_table_width(window, sinks):
    """Rows of different lengths on shuffled pages against ops.attention over the same keys laid out densely; and a
    row's result is bitwise the same for a wider table (a longer row elsewhere in the batch)."""
    import jax.numpy as jnp
    import numpy as np

    from worker import ops
    from worker.kv_cache import KVCache

    rng = np.random.default_rng(0)
    layers, pages, ps, kh, g, d = 2, 40, 16, 2, 3, 32
    k = rng.standard_normal((layers, pages, ps, kh, d)).astype(np.float32)
    v = rng.standard_normal((layers, pages, ps, kh, d)).astype(np.float32)
    cache = KVCache(jnp.asarray(k), jnp.asarray(v))
    lengths = [1, 16, 17, 100, 300]
    order = rng.permutation(np.arange(1, pages))
    tables, at = np.zeros((len(lengths), 32), np.int32), 0
    for b, n in enumerate(lengths):
        need = -(-n // ps)
        tables[b, :need] = order[at : at + need]
        at += need
    q = jnp.asarray(rng.standard_normal((len(lengths), 1, kh * g, d)).astype(np.float32))
    pos = jnp.asarray(np.asarray(lengths, np.int32) - 1)[:, None]
    sink = jnp.asarray(rng.standard_normal(kh * g).astype(np.float32)) if sinks else None
    got = ops.paged_attention(q, cache, 1, jnp.asarray(tables[:, :20]), pos, 0.2, window, sink)
    wider = ops.paged_attention(q, cache, 1, jnp.asarray(tables), pos, 0.2, window, sink)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(wider))
    for b in range(len(lengths)):
        kd = k[1][tables[b]].reshape(1, -1, kh, d)
        vd = v[1][tables[b]].reshape(1, -1, kh, d)
        ref = ops.attention(q[b : b + 1], jnp.asarray(kd), jnp.asarray(vd), pos[b : b + 1], 0.2, window, sink)
        np.testing.assert_allclose(np.asarray(got[b : b + 1]), np.asarray(ref), rtol=2e-5, atol=2e-6)


def test_a_failing_prefill_ends_only_its_own_job(monkeypatch):
    """Out of device memory in one job's prefill (simulated; the KV pool survives): that job ends with VRAM_OOM,
    the others stream on and end normally, with the ids they would have had alone. The three prompts share a
    prefill dispatch (the kernels in interpret mode group them), which is then tried again one sequence at a time."""
    model = worker.load(model_path("qwen2"), device="cpu", backend="interpret", slots=256, max_batch=4)
    prompt = "Once upon a time"
    alone = model.generate(prompt, max_tokens=10, stop_at_eos=False)
    real, oom_text = model.runner.prefill_group, " ".join(["x"] * 6)
    oom_len = len(model.tokenizer.encode(oom_text))
    assert oom_len != len(model.tokenizer.encode(prompt))
    groups = []

    def failing(chunks, cache):
        groups.append(len(chunks))
        if any(len(ids) == oom_len for ids, _, _ in chunks):
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB")
        return real(chunks, cache)

    monkeypatch.setattr(model.runner, "prefill_group", failing)
    engine = Engine(model, max_queue=4)
    try:
        sinks = {name: Collector() for name in ("a", "oom", "b")}
        for name, sink in sinks.items():
            text = oom_text if name == "oom" else prompt
            engine.submit(JobRequest(name, text, max_tokens=10, temperature=0.0), sink)
        engine.start()  # after the three are queued: they join the batch, and the prefill, together
        results = {name: sink.until_end() for name, sink in sinks.items()}
    finally:
        engine.shutdown(2.0)
    assert results["oom"][-1].code == ErrorCode.VRAM_OOM
    assert max(groups) > 1 and groups.count(1) >= 3, groups
    for name in ("a", "b"):
        assert isinstance(results[name][-1], End) and results[name][-1].tokens_out == 10
        text = "".join(e.text for e in results[name] if isinstance(e, TokenEvent))
        assert text == model.tokenizer.decode(alone, continuation=True)


def test_more_rows_than_the_invariant_kernels_take_is_refused_at_load():
    from worker.errors import WorkerError
    from worker.pallas_kernels.qmatvec import MAX_BATCH

    too_many = MAX_BATCH + 1
    with pytest.raises(WorkerError, match=f"at most {MAX_BATCH} decode rows") as err:
        worker.load(model_path("qwen2"), device="cpu", backend="interpret", max_batch=too_many)
    assert err.value.code == ErrorCode.INVALID_REQUEST
    worker.load(model_path("qwen2"), device="cpu", backend="interpret", max_batch=too_many, deterministic=False)
    worker.load(model_path("qwen2"), device="cpu", backend="interpret", max_batch=MAX_BATCH)


@pytest.mark.parametrize("device", ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("arch", ["qwen2", "gpt-oss"])
def test_a_prefill_dispatch_of_several_sequences_gives_each_the_bits_it_gets_alone(arch, device):
    """Several sequences' prompt chunks in one prefill dispatch (Runner.prefill_group): each sequence's logits and
    KV pages are the bits of its chunk prefilled alone (on the CPU: the kernels in interpret mode)."""
    backend = "interpret" if device == "cpu" else None
    model = worker.load(model_path(arch), device=device, backend=backend, slots=1024, max_batch=8)
    r, rng = model.runner, random.Random(11)
    prompts = [[rng.randrange(model.cfg.vocab_size) for _ in range(n)] for n in (21, 5, 128, 64)]
    pages, first = [], 1
    for p in prompts:
        n = pages_for(len(p), r.page_size)
        pages.append(list(range(first, first + n)))
        first += n
    assert r.group_limit(128) >= len(prompts) and r.group_limit(129) == 1 and r.group_buckets() == [4, 8]
    together, cache = r.prefill_group([(p, pg, 0) for p, pg in zip(prompts, pages, strict=True)], r.new_cache())
    diffs = []  # every sequence's differences, so that a failure says where they start (layers) and end (logits)
    for i, (p, pg) in enumerate(zip(prompts, pages, strict=True)):
        alone, own = r.prefill_group([(p, pg, 0)], r.new_cache())
        logits = np.abs(np.asarray(together[i]) - np.asarray(alone[0])).max()
        k = np.abs(np.asarray(cache.k[:, pg], np.float32) - np.asarray(own.k[:, pg], np.float32))
        v = np.abs(np.asarray(cache.v[:, pg], np.float32) - np.asarray(own.v[:, pg], np.float32))
        per_layer = k.reshape(k.shape[0], -1).max(1)
        if logits or k.max() or v.max():
            diffs.append(f"sequence {i} ({len(p)} ids): logits {logits:.3g}, k by layer {per_layer}, v {v.max():.3g}")
    assert not diffs, "; ".join(diffs)


@pytest.mark.parametrize("device", ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("d", [64, 896, 2880])
def test_a_norm_gives_a_row_its_bits_whatever_the_rows_around_it(device, d):
    """ops.rms_norm (jax.numpy's fixed order, and its kernel) and ops.layer_norm on rows alone and among 512: the
    same bits. Printed beside: whether XLA's own mean (jnp.mean) would have kept them (it did not on an H200,
    2026-12-02)."""
    dev = jax.devices(device)[0]
    rng = np.random.default_rng(d)
    x = jax.device_put(rng.standard_normal((512, d)).astype(np.float32), dev)
    w, b = (jax.device_put(rng.standard_normal(d).astype(np.float32), dev) for _ in range(2))
    norms = {
        "rms": jax.jit(lambda x: ops.rms_norm(x, w, 1e-6)),
        "rms kernel": jax.jit(lambda x: rms_norm_kernel.rms_norm(x, w, 1e-6, interpret=device != "gpu")),
        "layer": jax.jit(lambda x: ops.layer_norm(x, w, b, 1e-5)),
        "xla mean": jax.jit(lambda x: x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)),
    }
    for name, norm in norms.items():
        together = np.asarray(norm(x))
        same = all(np.array_equal(np.asarray(norm(x[a : a + n])), together[a : a + n])
                   for a, n in ((0, 1), (0, 16), (0, 64), (384, 64), (256, 128)))  # fmt: skip
        print(f"{device} d={d} {name}: rows alone {'equal' if same else 'DIFFER'} among 512")
        assert same or name == "xla mean"
    for name in ("rms", "rms kernel"):
        np.testing.assert_allclose(np.asarray(norms[name](x)), np.asarray(norms["xla mean"](x)) * np.asarray(w),
                                   rtol=1e-5)  # fmt: skip


def test_prefill_groups_follow_the_token_budget_and_can_be_switched_off(monkeypatch):
    """WORKER_PREFILL_GROUP_TOKENS (runner.PREFILL_GROUP_TOKENS) bounds a group's padded positions; 0 gives every
    chunk a dispatch of its own. The CPU backend never groups."""
    from worker import runner

    model = worker.load(model_path("qwen2"), device="cpu", backend="interpret", slots=256, max_batch=64)
    assert model.runner.group_limit(16) == 32 and model.runner.group_buckets() == [4, 16, 32]
    assert model.runner.group_bucket(1) == 1 and model.runner.group_bucket(5) == 16
    monkeypatch.setattr(runner, "PREFILL_GROUP_TOKENS", 0)
    assert model.runner.group_limit(16) == 1 and model.runner.group_buckets() == []
    monkeypatch.undo()
    assert worker.load(model_path("qwen2"), device="cpu", slots=256, max_batch=64).runner.group_limit(16) == 1


@pytest.mark.parametrize(("prefill_tokens", "fed"), [(1, [10, 0, 0]), (20, [10, 10, 0]), (None, [10, 10, 10])])
def test_an_engine_step_prefills_up_to_its_token_budget(prefill_tokens, fed):
    """`prefill_tokens` (worker-orcd --prefill-tokens): a step feeds prompt chunks, oldest first, while the budget
    is not spent (a chunk that starts inside it is fed whole); the CPU's default is one 256-position chunk here."""
    model = worker.load(model_path("qwen2"), device="cpu", slots=256, max_batch=4, prefill_tokens=prefill_tokens)
    seqs = [model.sequence(list(range(5 + i, 15 + i)), 4, SamplingParams(temperature=0.0), i) for i in range(3)]
    for s in seqs:
        model.batch.add(s)
    model.batch.step()
    assert [s.prefilled for s in seqs] == fed
