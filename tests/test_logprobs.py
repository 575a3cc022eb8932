"""Log-probabilities computed inside the compiled sampling step (SamplingPlan.logprobs) against an independent
path: the full-sequence forward (Model.logits) of the prompt and the generated ids, log-softmaxed on the host."""

from __future__ import annotations

import numpy as np
import pytest

import worker
from tests.conftest import oracles_dir
from worker.sampling import TOP_LOGPROBS, SamplingParams


@pytest.fixture(scope="module")
def model():
    m = worker.load(oracles_dir() / "models" / "qwen2" / "model-q8_0.gguf", device="cpu", slots=256)
    m.decode_steps = 3  # several steps per dispatch, as on a GPU: the scores are stacked per step
    return m


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


PARAMS = SamplingParams(temperature=0.8, top_k=40)  # one plan for both tests: each plan is one more compile


def test_logprobs_equal_the_full_forwards(model):
    check_against_full_forward(model, PARAMS)


@pytest.mark.gpu
def test_logprobs_on_the_gpu():
    gpu_model = worker.load(oracles_dir() / "models" / "qwen2" / "model-q8_0.gguf", device="gpu", slots=256)
    check_against_full_forward(gpu_model, PARAMS, atol=2e-2)  # f16 KV cache on the GPU


def check_against_full_forward(model, params, atol=2e-3):
    prompt = model.tokenizer.encode("The quick brown fox")
    got = []
    ids = list(model.generate_ids(prompt, 6, params, seed=7, stop_at_eos=False, logprobs=got))
    assert len(got) == len(ids) == 6
    expected = _log_softmax(model.logits(prompt + ids[:-1]))[len(prompt) - 1 :]
    for n, (tok, lp) in enumerate(zip(ids, got, strict=True)):
        assert lp.logprob == pytest.approx(expected[n, tok], abs=atol)
        top_ids = [i for i, _ in lp.top]
        assert len(top_ids) == TOP_LOGPROBS
        np.testing.assert_allclose([p for _, p in lp.top], expected[n, top_ids], atol=atol)
        assert [p for _, p in lp.top] == sorted((p for _, p in lp.top), reverse=True)
        assert expected[n, top_ids[-1]] >= np.sort(expected[n])[-TOP_LOGPROBS] - atol


def test_logprobs_do_not_change_the_ids(model):
    prompt = model.tokenizer.encode("The quick brown fox")
    plain = list(model.generate_ids(prompt, 6, PARAMS, seed=3, stop_at_eos=False))
    scored = list(model.generate_ids(prompt, 6, PARAMS, seed=3, stop_at_eos=False, logprobs=[]))
    assert plain == scored
