"""`worker-orcd` / `python -m server.cli` arguments and start-up failures: exit 2 for usage errors, exit 1 with one
line naming the argument for invalid values, exit 1 with the error code for a failed start-up, exit 0 when stopped
while starting. Value checks run in-process (they end before any model work); exit codes through real processes."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import uuid

import pytest

from server.cli import main
from tests.conftest import oracles_dir
from tests.worker_process import REPO, cli, free_port

WORKER_ID = str(uuid.uuid4())


def base(**override) -> list[str]:
    opts = {"--worker-id": WORKER_ID, "--gpu-device": "0", "--port": str(free_port()), "--device": "cpu"}
    opts.update(override)
    return [x for k, v in opts.items() if v is not None for x in (k, v)]


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


@pytest.mark.parametrize(
    "argv, named",
    [
        (base(**{"--worker-id": None}), "--worker-id"),
        (base(**{"--port": None}), "--port"),
        (base(**{"--gpu-device": None}), "--gpu-device"),
        (base(**{"--port": "eighty"}), "--port"),
        (base(**{"--device": "tpu"}), "--device"),
        ([*base(), "--colour", "blue"], "--colour"),
    ],
    ids=["no-worker-id", "no-port", "no-gpu-device", "port-not-int", "device-choice", "unknown-option"],
)
def test_usage_errors_exit_2_with_one_line(capsys, argv, named):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("worker-orcd: error:") and named in line


@pytest.mark.parametrize(
    "override, named",
    [
        ({"--worker-id": "worker-7"}, "--worker-id"),
        ({"--port": "80"}, "--port"),
        ({"--port": "70000"}, "--port"),
        ({"--gpu-device": "-1"}, "--gpu-device"),
        ({"--model": "/nonexistent/model.gguf"}, "--model"),
        ({"--model": "/"}, "--model"),
        ({"--tokenizer-json": "/nonexistent/tokenizer.json"}, "--tokenizer-json"),
        ({"--max-tokens-out": "0"}, "--max-tokens-out"),
        ({"--max-tokens-out": "4096"}, "--max-tokens-out"),
        ({"--max-tokens-in": "0"}, "--max-tokens-in"),
        ({"--kv-cache-size-mb": "0"}, "--kv-cache-size-mb"),
        ({"--inference-timeout-sec": "0"}, "--inference-timeout-sec"),
        ({"--shutdown-deadline": "-1"}, "--shutdown-deadline"),
        ({"--max-queue": "-1"}, "--max-queue"),
        ({"--dispatch-ms": "0"}, "--dispatch-ms"),
        ({"--prefill-tokens": "0"}, "--prefill-tokens"),
        ({"--dispatch-ms": "5000"}, "--dispatch-ms"),
        ({"--max-body-bytes": "10"}, "--max-body-bytes"),
        ({"--callback-url": "ftp://orchestrator/ready"}, "--callback-url"),
        ({"--api-key": ""}, "--api-key"),
        ({"--host": "no-such-host.invalid"}, "--host"),
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={x}" for k, x in v.items()),
)
def test_invalid_values_exit_1_naming_the_argument(capsys, override, named):
    assert main(base(**override)) == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"worker-orcd: error: {named} ")


def test_port_in_use_exits_1(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(base(**{"--port": str(port)})) == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"worker-orcd: error: --port {port}:") and "in use" in line


def test_exit_codes_of_the_real_process():
    usage = cli(*base(**{"--worker-id": None}))
    assert usage.returncode == 2 and "--worker-id" in one_line(usage.stderr)
    invalid = cli(*base(**{"--worker-id": "x"}))
    assert invalid.returncode == 1 and "--worker-id" in one_line(invalid.stderr)
    help_ = cli("--help")
    assert help_.returncode == 0 and "--callback-url" in help_.stdout
    console = subprocess.run([sys.executable, "-c", "import server.cli; print(server.cli.main)"], cwd=REPO)
    assert console.returncode == 0  # the console script's entry point (pyproject: server.cli:main) imports


def test_corrupt_model_fails_start_up_with_its_code(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    out = cli(*base(**{"--model": str(bad)}))
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("worker-orcd: error: MODEL_LOAD_FAILED:")
    events = [json.loads(line) for line in lines[:-1]]
    error = next(e for e in events if e["event"] == "error")
    assert error["code"] == "MODEL_LOAD_FAILED" and error["model_path"] == str(bad) and error["gpu_device"] == 0
    assert [e["event"] for e in events if e["event"] != "log"][0] == "startup"


def test_int8_x_on_the_cpu_fails_start_up_naming_the_flag():
    model = oracles_dir() / "models" / "qwen2" / "model-q8_0.gguf"
    out = cli(*base(**{"--model": str(model)}), "--int8-x")
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("worker-orcd: error: INVALID_REQUEST:") and "--int8-x" in last


def test_gpu_index_out_of_range_or_no_gpu_fails_start_up(tmp_path):
    model = oracles_dir() / "models" / "qwen2" / "model-q4_k_m.gguf"
    out = cli(*base(**{"--device": "gpu", "--gpu-device": "99", "--model": str(model)}))
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("worker-orcd: error:") and ("GPU" in last or "--gpu-device 99" in last)


def test_sigterm_while_starting_exits_0():
    """A SIGTERM during the model's load ends the process with exit 0 and a last `shutdown` line. If it has not ended
    120 s later, SIGABRT makes it print every thread's stack (faulthandler) into the failure: a fresh-clone CI run
    of 2026-12-06 hung here until pytest's 900 s limit, once in six, with nothing to say where."""
    model = oracles_dir() / "models" / "qwen2" / "model-q4_k_m.gguf"
    proc = subprocess.Popen(
        [sys.executable, "-X", "faulthandler", "-m", "server.cli", *base(**{"--model": str(model)})],
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for line in proc.stderr:
            if json.loads(line)["event"] == "model_load_start":
                proc.send_signal(signal.SIGTERM)
                break
        out: list[str] = []  # the rest of stderr, read on a thread so that a hang can be timed out
        reader = threading.Thread(target=lambda: out.append(proc.stderr.read()), daemon=True)
        reader.start()
        reader.join(120)
        if reader.is_alive():
            proc.send_signal(signal.SIGABRT)
            reader.join(30)
            pytest.fail(f"still running 120 s after SIGTERM during start-up; its threads:\n{''.join(out)[-8000:]}")
        rest = out[0]
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    last = json.loads(rest.strip().splitlines()[-1])
    assert last["event"] == "shutdown" and last["reason"] == "SIGTERM during start-up"


def test_a_sigterm_whose_raise_is_lost_while_starting_still_ends_the_start(monkeypatch, capsys):
    """A SIGTERM while starting raises _Stop wherever the main thread is; where that is code that swallows it (a
    finalizer, a callback: Python only reports the exception there), the recorded signal still ends the start: the
    engine is shut down without its thread ever starting, main returns 0 with the `shutdown` line, and nothing is
    served (a fresh-clone CI run of 2026-12-07 loaded on and served after a SIGTERM at model_load_start)."""
    import logging

    from server import cli as cli_module

    calls = []

    class Engine:
        compiling = False

        def shutdown(self, deadline_s: float) -> None:
            calls.append("shutdown")

        def start(self) -> None:
            calls.append("start")

    def start_engine(args, narrator):
        try:
            signal.raise_signal(signal.SIGTERM)  # the handler raises _Stop here...
        except BaseException:  # ...and this swallows it, as a finalizer would
            calls.append("swallowed")
        return Engine(), None

    monkeypatch.setattr(cli_module, "start_engine", start_engine)
    monkeypatch.setattr(cli_module, "serve", lambda *a: calls.append("serve") or 0)
    monkeypatch.setattr(cli_module, "host_devices", lambda n: None)  # this process's XLA_FLAGS stay as they are
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    root = logging.getLogger()
    logging_state = (root.handlers[:], root.level, logging.getLogger("worker").level)
    try:
        assert main(base()) == 0
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        root.handlers[:], level, worker_level = logging_state
        root.setLevel(level)
        logging.getLogger("worker").setLevel(worker_level)
        logging.captureWarnings(False)
    assert calls == ["swallowed", "shutdown"]
    last = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert last["event"] == "shutdown" and last["reason"] == "SIGTERM during start-up"


def test_a_signal_before_the_servers_handlers_starts_its_graceful_shutdown():
    """A SIGTERM recorded after the start but before uvicorn's handlers were in place (main's `stops`, passed as
    run_http's early_stops) shuts the server down as uvicorn's handler would: the reason is the signal, no `ready`
    line is written, and the engine is stopped."""
    import io

    from server.cli import build_parser, run_http
    from tests.tiny_worker import tiny_model
    from worker.engine import Engine, JobRequest, ShuttingDown
    from worker.narration import Narrator

    args = build_parser().parse_args(base(**{"--port": "0"}))
    engine = Engine(tiny_model())
    engine.start()
    out = io.StringIO()
    narrator = Narrator(WORKER_ID, "tiny", 0, stream=out)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        # were the early stop not taken, the server would serve on: a SIGINT 60 s later ends it with that reason
        backstop = threading.Timer(60, signal.raise_signal, (signal.SIGINT,))
        backstop.start()
        try:
            reason = run_http(args, sock, engine, None, narrator, 0.0, early_stops=["SIGTERM"])
        finally:
            backstop.cancel()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
    assert reason == "SIGTERM"
    assert '"ready"' not in out.getvalue()
    with pytest.raises(ShuttingDown):  # the engine was drained: it takes no job
        engine.submit(JobRequest("after", "Hello", max_tokens=1), lambda event: None)


def test_python_warnings_become_narration_lines():
    """A `warnings.warn` (JAX's compile cache reports a lock it could not take so) comes out as a JSON log event,
    not bare text among the narration."""
    import io
    import logging
    import warnings

    from server import cli as server_cli
    from worker.narration import Narrator

    out, root = io.StringIO(), logging.getLogger()
    saved = root.handlers[:], root.level
    logging.captureWarnings(False)  # a worker run in-process earlier may have left it on; then True does nothing
    try:
        server_cli._route_python_logging(Narrator(WORKER_ID, None, None, stream=out))
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn(
                "Error writing persistent compilation cache entry: lock not acquired", UserWarning, stacklevel=1
            )
    finally:
        logging.captureWarnings(False)
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(e["event"], e["level"], e["logger"]) for e in events] == [("log", "warning", "py.warnings")]
    assert "persistent compilation cache entry: lock not acquired" in events[0]["message"]


@pytest.mark.parametrize("affinity", [True, False])
def test_cpu_devices_default_on_a_system_with_or_without_cpu_affinity(monkeypatch, affinity: bool):
    """--cpu-devices' default is a host device a usable core, at most MAX_CPU_DEVICES, also where Python's os module
    has no sched_getaffinity (macOS, a laptop's first run: it raised AttributeError there)."""
    import os

    from server import cli as cli_module

    if affinity:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
        assert cli_module.default_cpu_devices() == 1
    else:
        monkeypatch.delattr(os, "sched_getaffinity", raising=False)
        monkeypatch.setattr(os, "cpu_count", lambda: 8)
        assert cli_module.default_cpu_devices() == cli_module.MAX_CPU_DEVICES
        monkeypatch.setattr(os, "cpu_count", lambda: None)
        assert cli_module.default_cpu_devices() == 1
