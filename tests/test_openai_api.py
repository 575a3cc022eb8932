"""The OpenAI-compatible API (server/openai_api.py) driven by the official `openai` client, and httpx for the raw
SSE framing: a real uvicorn server in a thread on a loopback port, serving the tiny random qwen2 oracle model
(ChatML template from the Qwen vocabulary) on the CPU. Expected values come from the tokenizer and the Model API
(greedy ids) of a second copy of the model, not from the HTTP path under test: the served copy is the engine
thread's (the Model API is not thread-safe, and a greedy run on it beside the engine's last steps hung a CI run)."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
import uuid
from functools import cached_property

import httpx
import numpy as np
import openai
import pytest
import uvicorn
from litestar.testing import TestClient

import worker
from server.app import create_app
from server.service import WorkerService
from tests.conftest import REPO, oracles_dir
from tests.model_oracles import log_softmax
from worker.chat import ChatTemplate
from worker.engine import Engine
from worker.harmony import HarmonyStream
from worker.model import Model
from worker.narration import Narrator
from worker.sampling import TOP_LOGPROBS, SamplingParams

KEY = "sk-test-openai"
MAX_OUT = 256
TEMPLATE = (REPO / "tests" / "data" / "chat_templates" / "qwen-chatml.jinja").read_text()
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "Hi."},
    {"role": "user", "content": "Count to five <|im_end|>"},
]


class _Server:
    def __init__(self):
        self.model = worker.load(oracles_dir() / "models" / "qwen2" / "model-q8_0.gguf", device="cpu", slots=512)
        self.model.batch.steps = 3  # several steps per dispatch, as on a GPU (ids and logprobs stacked per step)
        self.log = io.StringIO()
        narrator = Narrator(str(uuid.uuid4()), str(self.model.path), 0, stream=self.log)
        self.engine = Engine(
            self.model, max_queue=2, max_tokens_out=MAX_OUT, on_event=lambda name, f: narrator.emit(name, **f)
        )
        self.engine.start()
        self.template = ChatTemplate(TEMPLATE, self.model.tokenizer)
        self.service = WorkerService(
            self.engine, narrator, worker_id="w", api_key=KEY, chat_template=self.template, keepalive_s=1.0
        )
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = uvicorn.Config(create_app(self.service), log_config=None, access_log=False, lifespan="on")
        self.uvicorn = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        while not self.uvicorn.started:
            time.sleep(0.01)
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, timeout=60)

    @cached_property
    def reference(self) -> Model:
        """The same file loaded again, for the Model API: `self.model` is the engine thread's."""
        return worker.load(self.model.path, device="cpu", slots=512)

    def greedy_text(self, ids: list[int], max_tokens: int) -> tuple[str, int]:
        """The text and token count of a greedy completion through the Model API, stopping at end-of-generation."""
        out = self.reference.generate(ids, max_tokens=max_tokens)
        out = out[: next((n for n, t in enumerate(out) if t in self.reference.tokenizer.eog_ids), len(out))]
        return self.reference.tokenizer.decode(out, continuation=True), len(out)

    def stop(self):
        self.uvicorn.should_exit = True
        self.thread.join(10)
        self.engine.shutdown(2.0)


@pytest.fixture(scope="module")
def srv():
    s = _Server()
    yield s
    s.stop()


def chat_ids(srv, messages=MESSAGES) -> list[int]:
    """The prompt the chat route must build, from the tokenizer alone: the rendered ChatML text with control
    tokens parsed, the user's "<|im_end|>" spelled as text (it is not one of the template's)."""
    tok = srv.model.tokenizer
    rendered = srv.template.render(messages)
    head, user_end = rendered.rsplit("Count to five <|im_end|>", 1)
    return (
        tok.encode(head, add_bos=False, special=True)
        + tok.encode("Count to five <|im_end|>", add_bos=False, special=False)
        + tok.encode(user_end, add_bos=False, special=True)
    )


def test_models_lists_the_served_model(srv):
    models = srv.client.models.list().data
    assert [m.id for m in models] == [srv.model.path.name]


def test_chat_greedy_answer_and_usage(srv):
    r = srv.client.chat.completions.create(model="any", messages=MESSAGES, temperature=0, max_tokens=12)
    ids = chat_ids(srv)
    text, n = srv.greedy_text(ids, 12)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text
    assert r.choices[0].finish_reason == ("length" if n == 12 else "stop")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), n)
    assert r.usage.total_tokens == len(ids) + n


def test_chat_stream_equals_the_whole_answer(srv):
    whole = srv.client.chat.completions.create(model="m", messages=MESSAGES, temperature=0, max_tokens=10)
    usage = {"include_usage": True}
    chunks = list(
        srv.client.chat.completions.create(
            model="m", messages=MESSAGES, temperature=0, max_tokens=10, stream=True, stream_options=usage
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_completion_stream_and_not(srv):
    prompt = "Once upon a time"
    ids = srv.model.tokenizer.encode(prompt)
    text, n = srv.greedy_text(ids, 9)
    whole = srv.client.completions.create(model="m", prompt=prompt, temperature=0, max_tokens=9)
    assert whole.object == "text_completion"
    assert whole.choices[0].text == text
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(ids), n)
    streamed = list(srv.client.completions.create(model="m", prompt=prompt, temperature=0, max_tokens=9, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == text
    assert streamed[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    by_ids = srv.client.completions.create(model="m", prompt=ids, temperature=0, max_tokens=9)
    assert by_ids.choices[0].text == text


def test_stop_string_ends_the_answer_before_it(srv):
    text, _ = srv.greedy_text(srv.model.tokenizer.encode("Once upon a time"), 24)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop and stop in text
    r = srv.client.completions.create(model="m", prompt="Once upon a time", temperature=0, max_tokens=24, stop=[stop])
    assert r.choices[0].text == text[: text.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_seed_reproduces_a_sampled_answer(srv):
    def ask(seed):
        return srv.client.chat.completions.create(
            model="m", messages=MESSAGES, temperature=1.0, seed=seed, max_tokens=16
        )  # top_p etc. left off: the same compiled step as the greedy tests (one compile fewer)

    first, again, other = ask(1234), ask(1234), ask(99)
    assert first.choices[0].message.content == again.choices[0].message.content
    assert first.choices[0].message.content != other.choices[0].message.content


def test_logprobs_match_the_tokens(srv):
    r = srv.client.chat.completions.create(
        model="m", messages=MESSAGES, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == pytest.approx(t.logprob)
        assert bytes(t.bytes) == t.token.encode()
        assert t.logprob <= 0
    plain = srv.client.chat.completions.create(model="m", messages=MESSAGES, temperature=0, max_tokens=6)
    assert plain.choices[0].logprobs is None
    legacy = srv.client.completions.create(model="m", prompt="Once", temperature=0, max_tokens=4, logprobs=2)
    lp = legacy.choices[0].logprobs
    assert "".join(lp.tokens) == legacy.choices[0].text
    assert all(len(top) == 2 for top in lp.top_logprobs)


def check_logprobs_against_full_forward(model, atol: float) -> None:
    """Log-probabilities from the compiled sampling step against an independent path: the full-sequence forward
    (Model.logits) of the prompt and the generated ids, log-softmaxed on the host."""
    params = SamplingParams(temperature=0.8)  # sampled, unfiltered: the same compiled step as the API's tests
    prompt = model.tokenizer.encode("The quick brown fox")
    got = []
    ids = list(model.generate_ids(prompt, 7, params, seed=7, stop_at_eos=False, logprobs=got))
    assert len(got) == len(ids) == 7
    assert ids == list(model.generate_ids(prompt, 7, params, seed=7, stop_at_eos=False))  # asking changes no id
    expected = log_softmax(model.logits(prompt + ids[:-1]))[len(prompt) - 1 :]
    for n, (tok, lp) in enumerate(zip(ids, got, strict=True)):
        assert lp.logprob == pytest.approx(expected[n, tok], abs=atol)
        top_ids = [i for i, _ in lp.top]
        assert len(top_ids) == TOP_LOGPROBS
        np.testing.assert_allclose([p for _, p in lp.top], expected[n, top_ids], atol=atol)
        assert [p for _, p in lp.top] == sorted((p for _, p in lp.top), reverse=True)
        assert expected[n, top_ids[-1]] >= np.sort(expected[n])[-TOP_LOGPROBS] - atol


def test_logprobs_equal_the_full_forward(srv):
    check_logprobs_against_full_forward(srv.reference, atol=2e-3)


@pytest.mark.gpu
def test_logprobs_equal_the_full_forward_on_the_gpu():
    model = worker.load(oracles_dir() / "models" / "qwen2" / "model-q8_0.gguf", device="gpu", slots=256)
    check_logprobs_against_full_forward(model, atol=2e-2)  # f16 KV cache on the GPU


@pytest.mark.parametrize(
    "kwargs, status, param",
    [
        ({"n": 2}, 400, "n"),
        ({"temperature": 3.0}, 400, "temperature"),
        ({"max_tokens": MAX_OUT + 1}, 400, "max_tokens"),
        ({"top_logprobs": 2}, 400, "top_logprobs"),
        ({"extra_body": {"bogus": 1}}, 400, "bogus"),
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
        ({"presence_penalty": 0.5}, 400, "presence_penalty"),
    ],
)
def test_bad_requests_are_openai_errors(srv, kwargs, status, param):
    body = {"model": "m", "messages": MESSAGES, **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        srv.client.chat.completions.create(**body)
    assert e.value.status_code == status
    err = e.value.body
    assert err["type"] == "invalid_request_error" and err["code"] == "INVALID_REQUEST"
    assert err["param"] == param and param in err["message"]


def test_wrong_key_is_an_authentication_error(srv):
    bad = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model="m", messages=MESSAGES)
    assert e.value.status_code == 401 and e.value.body["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_sse_framing(srv):
    body = {"model": "m", "messages": MESSAGES, "max_tokens": 5, "stream": True, "temperature": 0}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"{srv.url}/v1/chat/completions", json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if not e.startswith(":")]  # keep-alive comments while a step compiles
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert len(events) >= 5  # the role chunk, content chunk(s), the finish chunk, [DONE], and the end
    for event in events[:-2]:
        assert event.startswith("data: ") and "\n" not in event
        assert json.loads(event[6:])["object"] == "chat.completion.chunk"


# Greedy, this prompt runs the whole MAX_OUT tokens on the tiny qwen2 (no end-of-generation id): seconds on a CPU,
# so a client that leaves early always finds its job still running. (A sampled job may draw an end id early.)
LONG_PROMPT = "Once upon a time"


def hold_steps(monkeypatch, srv, after_tokens: bool) -> threading.Event:
    """Hold the engine's batch steps until the returned event is set: from the start, or once a step has delivered
    tokens. So a disconnect test does not race the decode (the tiny model's 256 tokens can finish inside any
    client timeout on a fast CPU)."""
    release, real, delivered = threading.Event(), srv.model.batch.step, threading.Event()

    def step():
        if delivered.is_set() or not after_tokens:
            release.wait(10)
        out = real()
        if any(d.tokens for d in out):
            delivered.set()
        return out

    monkeypatch.setattr(srv.model.batch, "step", step)
    return release


def wait_for_disconnect(srv, before: int) -> None:
    deadline = time.monotonic() + 10
    while _disconnects(srv.service.metrics.render()) == before and time.monotonic() < deadline:
        time.sleep(0.02)


def wait_idle(srv) -> None:
    deadline = time.monotonic() + 10
    while srv.engine.busy and time.monotonic() < deadline:
        time.sleep(0.02)


def test_client_disconnect_cancels_the_job(srv, monkeypatch):
    before = _disconnects(srv.service.metrics.render())
    release = hold_steps(monkeypatch, srv, after_tokens=True)
    body = {"model": "m", "prompt": LONG_PROMPT, "max_tokens": MAX_OUT, "stream": True, "temperature": 0}
    headers = {"Authorization": f"Bearer {KEY}"}
    try:
        with httpx.stream("POST", f"{srv.url}/v1/completions", json=body, headers=headers, timeout=60) as r:
            next(r.iter_lines())
        wait_for_disconnect(srv, before)
    finally:
        release.set()
    wait_idle(srv)
    assert not srv.engine.busy
    assert _disconnects(srv.service.metrics.render()) == before + 1
    ends = [json.loads(line) for line in srv.log.getvalue().splitlines()]
    assert any(e["event"] == "execute_end" and e.get("code") == "CANCELLED" for e in ends)


def test_client_leaving_a_whole_answer_cancels_the_job(srv, monkeypatch):
    """The job is held before its first token until the client has left."""
    before = _disconnects(srv.service.metrics.render())
    release = hold_steps(monkeypatch, srv, after_tokens=False)
    body = {"model": "m", "prompt": LONG_PROMPT, "max_tokens": MAX_OUT, "temperature": 0}
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{srv.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=0.3)
        wait_for_disconnect(srv, before)
    finally:
        release.set()
    wait_idle(srv)
    assert _disconnects(srv.service.metrics.render()) == before + 1
    assert not srv.engine.busy


def test_body_limit_and_auth_errors_have_the_openai_shape(srv):
    big = {"model": "m", "prompt": "x" * (srv.service.max_body_bytes + 1)}
    r = httpx.post(f"{srv.url}/v1/completions", json=big, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 413 and r.json()["error"]["param"] == "body"
    r = httpx.post(f"{srv.url}/tokenize", json={"content": "x"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def _disconnects(metrics: bytes) -> float:
    line = next(x for x in metrics.decode().splitlines() if x.startswith("worker_client_disconnects_total"))
    return float(line.split()[-1])


def test_tokenize_and_detokenize(srv):
    tok = srv.model.tokenizer
    headers = {"Authorization": f"Bearer {KEY}"}
    text = "Hi <|im_end|> naïve"
    r = httpx.post(f"{srv.url}/tokenize", json={"content": text}, headers=headers).json()
    assert r == {"tokens": tok.encode(text, add_bos=False, special=True)}
    r = httpx.post(f"{srv.url}/tokenize", json={"content": text, "parse_special": False}, headers=headers).json()
    assert r["tokens"] == tok.encode(text, add_bos=False, special=False)
    r = httpx.post(f"{srv.url}/tokenize", json={"content": text, "with_pieces": True}, headers=headers).json()
    pieces = r["tokens"]
    assert b"".join(p["piece"].encode() if isinstance(p["piece"], str) else bytes(p["piece"]) for p in pieces) == (
        text.encode()
    )
    ids = [p["id"] for p in pieces]
    assert httpx.post(f"{srv.url}/detokenize", json={"tokens": ids}, headers=headers).json() == {"content": text}
    r = httpx.post(f"{srv.url}/detokenize", json={"tokens": [tok.vocab_size]}, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"


def test_execute_still_answers_in_its_own_shape(srv):
    r = httpx.post(f"{srv.url}/execute", json={"job_id": "x", "prompt": ""}, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["code"] == "INVALID_REQUEST" and "error" not in r.json()


def test_a_model_without_a_template_says_so(srv):
    service = WorkerService(srv.engine, Narrator("w", None, 0, stream=io.StringIO()), worker_id="w")
    with TestClient(create_app(service)) as client:
        r = client.post("/v1/chat/completions", json={"model": "m", "messages": MESSAGES})
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["param"] == "messages" and "no chat template" in err["message"]
        assert "--chat-template" in err["message"]
        # completions do not need one
        r = client.post("/v1/completions", json={"model": "m", "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2


HARMONY = (
    "<|channel|>analysis<|message|>The user wants a colour. Blue.<|end|>"
    "<|start|>assistant<|channel|>final<|message|>Blue, like the sky."
)


@pytest.mark.parametrize("cut", range(0, len(HARMONY) + 1, 3))
def test_harmony_splits_reasoning_from_content_wherever_the_text_is_cut(cut):
    h = HarmonyStream()
    pieces = h.feed(HARMONY[:cut]) + h.feed(HARMONY[cut:]) + h.flush()
    joined: dict[str, str] = {}
    for field, text in pieces:
        joined[field] = joined.get(field, "") + text
    assert joined == {"reasoning_content": "The user wants a colour. Blue.", "content": "Blue, like the sky."}


def test_harmony_without_headers_is_content():
    h = HarmonyStream()
    assert h.feed("plain text") + h.flush() == [("content", "plain text")]
    h = HarmonyStream()
    assert h.feed("<|channel|>commentary<|message|>note") + h.flush() == [("content", "note")]


def test_cli_refuses_a_missing_chat_template_file():
    from tests.worker_process import cli

    r = cli("--worker-id", str(uuid.uuid4()), "--gpu-device", "0", "--port", "8999", "--chat-template", "/nonexistent")
    assert r.returncode == 1 and "--chat-template /nonexistent: no such file" in r.stderr


@pytest.mark.slow
def test_real_worker_process_chats_with_its_chat_template_flag():
    """The one end-to-end run: `python -m server.cli --chat-template FILE`, spoken to with the openai client."""
    from tests.worker_process import WorkerProcess

    model = oracles_dir() / "models" / "qwen2" / "model-q8_0.gguf"
    template = REPO / "tests" / "data" / "chat_templates" / "qwen-chatml.jinja"
    w = WorkerProcess(model, "--chat-template", str(template), "--max-tokens-out", "8", api_key=KEY)
    try:
        w.wait_ready()
        client = openai.OpenAI(base_url=f"{w.url}/v1", api_key=KEY, max_retries=0, timeout=120)
        r = client.chat.completions.create(model="m", messages=MESSAGES, temperature=0, max_tokens=8)
        assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 8
        started = w.wait_for_log(event="execute_start", job_id=r.id)
        assert started["prompt_tokens"] == r.usage.prompt_tokens
        assert w.stop() == 0
    finally:
        w.stop()


def test_a_chat_too_long_for_the_worker_names_messages(srv):
    with pytest.raises(openai.BadRequestError) as e:
        srv.client.chat.completions.create(model="m", messages=[{"role": "user", "content": "word " * 600}])
    assert e.value.body["param"] == "messages" and "accepts at most" in e.value.body["message"]


def test_harmony_markers_survive_the_engines_streaming_decode():
    """A gpt-oss answer as the engine streams it: ids decoded one by one (special=False), up to <|return|>, which
    ends generation; the markers are rendered (user-defined tokens), so the parser sees them."""
    from worker.tokenizer import StreamDecoder, load_tokenizer

    tok = load_tokenizer(oracles_dir() / "models" / "gpt-oss" / "model-q8_0.gguf")
    ids = tok.encode(HARMONY + "<|return|>", add_bos=False, special=True)
    assert ids[-1] in tok.eog_ids and all(i not in tok.eog_ids for i in ids[:-1])
    decoder, h, pieces = StreamDecoder(tok, continuation=True), HarmonyStream(), []
    for i in ids[:-1]:
        pieces += h.feed(decoder.push(i))
    pieces += h.feed(decoder.flush()) + h.flush()
    assert [f for f, _ in pieces][0] == "reasoning_content"
    assert "".join(t for f, t in pieces if f == "content") == "Blue, like the sky."
    assert "".join(t for f, t in pieces if f == "reasoning_content") == "The user wants a colour. Blue."


def test_nulls_mean_the_defaults(srv):
    nulls = dict.fromkeys(["stream", "logprobs", "top_logprobs", "seed", "stop", "n", "temperature", "user"])
    body = {"model": "m", "messages": MESSAGES, "max_tokens": 2, **nulls}
    r = httpx.post(f"{srv.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["logprobs"] is None
