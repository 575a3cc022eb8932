"""The real Gemma 3 270M Q4_K_M file (the embedded default) against llama.cpp's exact-math run on its exactly
dequantized weights (../shared/oracles/gemma3-270m/exact_math.json, exact_first_logits_<name>.npy)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from model_oracles import rel_err

import worker

pytestmark = pytest.mark.slow
MARGIN = 0.01  # below this top1-top2 gap, float32 rounding differences may legitimately flip the argmax


@pytest.fixture(scope="module")
def gemma():
    return worker.load(worker.default_model_path(), device="cpu")


@pytest.fixture(scope="module")
def exact(oracles):
    data = json.loads((oracles / "gemma3-270m" / "exact_math.json").read_text())
    goldens = json.loads((oracles / "gemma3-270m" / "goldens.json").read_text())
    prompts = {p["name"]: p for p in goldens["prompts"]}
    return [(p, prompts[p["name"]]) for p in data["prompts"]]


@pytest.fixture(scope="module")
def forced(gemma, exact) -> list[np.ndarray]:
    """Per prompt, the logits after the prompt and each of the golden greedy ids but the last (one forward pass
    serves the first-step and the teacher-forced checks: row 0 is the first step)."""
    return [gemma.logits(g["ids"] + p["golden_greedy_ids"][:-1])[len(g["ids"]) - 1 :] for p, g in exact]


def test_prompt_ids_match_llamacpp(gemma, exact):
    for _, golden in exact:
        assert gemma.tokenizer.encode(golden["text"]) == golden["ids"]


def test_first_step_logits(forced, exact, oracles):
    for (p, _), logits in zip(exact, forced, strict=True):
        ours = logits[0]
        ref = np.load(oracles / "gemma3-270m" / f"exact_first_logits_{p['name']}.npy")
        err = rel_err(ours, ref)
        print(f"{p['name']}: first-step relative error vs exact math {err:.2e}")
        assert err <= 5e-3


def test_greedy_matches_exact_math(gemma, exact):
    for p, golden in exact:
        ref = p["greedy_exact"]
        # Compare up to (and including) the first step whose exact-math margin is below MARGIN.
        n = min(len(ref["ids"]), next((i for i, m in enumerate(ref["margins"]) if m < MARGIN), 32) + 1)
        ours = gemma.generate(golden["ids"], max_tokens=n, stop_at_eos=False)
        assert ours == ref["ids"][:n], p["name"]


def test_teacher_forced_argmax(forced, exact):
    for (p, _), logits in zip(exact, forced, strict=True):
        for i, step in enumerate(p["teacher_forced"]):
            if step["values"][0] - step["values"][1] > MARGIN:
                assert int(logits[i].argmax()) == step["ids"][0], (p["name"], i)
