"""The decode steps of a dispatch sized from a timed dispatch (Model.calibrate_steps): the arithmetic, and that
timing a dispatch leaves the batch as it was (it decodes idle rows on the null page); and the one kind of decode
kernel a batch-invariant model uses (model.decode_kernels_for)."""

from __future__ import annotations

import pytest
from conftest import oracles_dir

import worker
from worker.model import GREEDY, decode_kernels_for, steps_within
from worker.runner import MIN_BUCKET, bucket
from worker.sampling import SamplingParams


@pytest.mark.parametrize(
    ("per_step", "target", "want"),
    [(0.01, 0.03, 2), (0.0103, 0.03, 2), (0.0077, 0.03, 2), (0.001, 0.03, 16), (1e-5, 0.03, 64), (0.05, 0.03, 1)],
)
def test_steps_within_is_the_largest_power_of_two_that_fits(per_step, target, want):
    assert steps_within(per_step, target) == want
    assert want * per_step <= target or want == 1


def test_calibrating_sets_a_power_of_two_and_leaves_generation_unchanged():
    m = worker.load(oracles_dir() / "models" / "qwen2" / "model-q8_0.gguf", device="cpu", max_batch=4)
    before = m.generate([5, 9, 13], max_tokens=6, stop_at_eos=False)
    steps = m.calibrate_steps(GREEDY.plan())
    assert steps in (1, 2, 4, 8, 16, 32, 64) and m.decode_steps == steps
    assert m.generate([5, 9, 13], max_tokens=6, stop_at_eos=False) == before


def test_a_timed_dispatch_decodes_rows_that_differ(monkeypatch):
    """Each timed row starts from a token of its own, so that a MoE routes them as distinct streams (identical rows
    would all take one token's experts, and the timing would size a dispatch for a fraction of its real cost)."""
    m = worker.load(oracles_dir() / "models" / "gpt-oss" / "model-mxfp4_moe.gguf", device="cpu", max_batch=4)
    seen, decode = [], m.runner.decode
    monkeypatch.setattr(m.runner, "decode", lambda rows, *a, **k: (seen.append(rows.tokens), decode(rows, *a, **k))[1])
    m.batch.time_decode(4, GREEDY.plan(), repeats=1)
    assert len(set(seen[0].tolist())) == 4


def test_timing_a_dispatch_needs_an_idle_batch():
    m = worker.load(oracles_dir() / "models" / "qwen2" / "model-q8_0.gguf", device="cpu", max_batch=2)
    m.batch.add(m.sequence([5, 9], 4, GREEDY, 0))
    with pytest.raises(RuntimeError, match="idle"):
        m.batch.time_decode(2, GREEDY.plan())


@pytest.mark.parametrize(
    ("max_batch", "deterministic", "want"),
    [(64, True, "tensor-cores"), (9, True, "tensor-cores"), (8, True, "per-row"), (1, True, "per-row"),
     (64, False, "by-rows"), (1, False, "by-rows")],
)  # fmt: skip
def test_a_batch_invariant_model_uses_one_kind_of_decode_kernel(max_batch, deterministic, want):
    assert decode_kernels_for(max_batch, deterministic) == want


def test_the_model_config_carries_its_decode_kernels():
    path = oracles_dir() / "models" / "qwen2" / "model-q8_0.gguf"
    assert worker.load(path, device="cpu", backend="interpret", max_batch=16).cfg.decode_kernels == "tensor-cores"
    assert worker.load(path, device="cpu", backend="interpret", max_batch=2).cfg.decode_kernels == "per-row"


@pytest.mark.parametrize("steps_after", [1, 4])
def test_a_calibrating_warm_up_compiles_each_program_once(monkeypatch, steps_after):
    """The GPU warm-up (forced here on the CPU): the largest decode bucket and the prefill first, the steps sized,
    then the other buckets (and the largest again only if its steps changed); prefill and first sample once."""
    m = worker.load(oracles_dir() / "models" / "qwen2" / "model-q8_0.gguf", device="cpu", max_batch=4)
    calls = []
    monkeypatch.setattr(m.runner, "compile_first_steps",
                        lambda inputs, plans, steps, rows, prefill=True, groups=(), lone=():
                        calls.append((plans, steps, tuple(rows), prefill, groups, lone)) or [])  # fmt: skip
    monkeypatch.setattr(m, "calibrate_steps",
                        lambda plan, _target: setattr(m.batch, "steps", steps_after) or steps_after)  # fmt: skip
    monkeypatch.setattr(m, "device_kind", "gpu")
    m.batch.steps = 1
    m.warm_up(SamplingParams(temperature=1.0), all_rows=True)
    buckets = tuple(m.runner.row_buckets())
    again = buckets if steps_after != 1 else buckets[:-1]
    groups = tuple(m.runner.group_buckets())  # prefill dispatches of several sequences: none on the CPU backend
    # Greedy decoding's stages beside the request's (temperature 1): each set of stages is a program of its own.
    plans = (SamplingParams(temperature=1.0).plan(), GREEDY.plan())
    # A prompt alone in its dispatch, at every chunk bucket past the first (compiled with it in the first call).
    lone = tuple(m.runner.chunk_buckets()[1:])
    assert calls == [(plans, 1, buckets[-1:], True, (), ()), (plans, steps_after, again, False, groups, lone)]


def test_a_warm_up_says_what_it_compiled_and_how_long_each_took():
    m = worker.load(oracles_dir() / "models" / "qwen2" / "model-q8_0.gguf", device="cpu", max_batch=4)
    warmed = m.warm_up(SamplingParams(temperature=1.0), all_rows=True)
    assert warmed is m.warmed
    names = [c.name for c in warmed.compiles]
    steps = m.decode_steps
    # the CPU: the first row bucket's decode, the first prefill chunk and its first sample; the other row buckets
    # asked for on the background thread, when idle
    first, *later = m.runner.row_buckets()
    want = [f"decode {first} rows {steps} steps sampled"]
    want += [f"prefill {min(MIN_BUCKET, m.runner.chunk)} tokens", "prefill first sample sampled"]
    assert sorted(names) == sorted(want)
    plan, width = SamplingParams(temperature=1.0).plan(), m.runner.table_width(1)
    assert later and {("decode", r, width, steps, plan) for r in later} <= m.runner._asked
    m.runner.stop_compiling_ahead(wait_s=60)
    assert all(c.lower_s > 0 and c.compile_s > 0 for c in warmed.compiles)
    assert 0 < warmed.lowering_s < warmed.compile_s <= warmed.total_s
    fields = warmed.fields(slowest=2)
    assert fields["programs"] == len(want) and len(fields["slowest"]) == 2
    # each of the slowest as [lower ms, compile ms], the sums over every program at least as much
    lower, compile_ = zip(*fields["slowest"].values(), strict=True)
    assert max(lower) > 0 and fields["compile_sum_ms"] >= max(compile_) > 0
    assert 0 < fields["lowering_ms"] < fields["compile_ms"]
    # XLA:CPU says what each allocates beside its arguments: less than the KV pool (donated, updated in place)
    ((name, extra),) = fields["most_extra_bytes"].items()
    assert name in names and 0 < extra < m.runner.cache_bytes(), fields


def test_chunk_buckets_are_every_bucket_a_prompt_chunk_takes():
    m = worker.load(oracles_dir() / "models" / "qwen2" / "model-q8_0.gguf", device="cpu", max_batch=4)
    assert m.runner.chunk_buckets() == sorted({bucket(n, m.runner.chunk) for n in range(1, m.runner.chunk + 1)})


def test_a_backend_without_memory_analysis_still_warms_up(monkeypatch):
    """XLA's memory figures are a report: where a backend refuses them the warm-up goes on, the figure left out."""
    from jax._src import stages

    def refuse(self):
        raise NotImplementedError("no memory analysis here")

    monkeypatch.setattr(stages.Compiled, "memory_analysis", refuse)
    m = worker.load(oracles_dir() / "models" / "qwen2" / "model-q8_0.gguf", device="cpu", max_batch=2)
    fields = m.warm_up().fields()
    assert fields["programs"] >= 3 and fields["most_extra_bytes"] is None
