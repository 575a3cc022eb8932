"""`worker-orcd` (also `python -m server.cli`): arguments (REQUIREMENTS §4), the start-up order of M0-W-1110 —
device init -> model load -> HTTP server -> ready — and graceful shutdown on SIGTERM, SIGINT or POST /shutdown.

Exit codes: 0 after a graceful shutdown; 1 for an invalid argument or a failed start-up (one line naming the
argument, or the error code and reason); 2 for a usage error (unknown option, missing required argument, a value
that is not a number).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import uvicorn

from worker.cores import usable_cores
from worker.errors import WorkerError
from worker.narration import Narrator

if TYPE_CHECKING:
    import multiprocessing.process

    from server.engine_link import EngineHost, RemoteEngine
    from worker.chat import ChatTemplate
    from worker.engine import Engine

PROG = "worker-orcd"
# --cpu-devices' most by default. Measured on 2 cores (Gemma 3 270M, docs/PERFORMANCE.md "CPU"): 2 devices decode 1.5x
# one (tensor parallel, the CPU kernel), 4 devices on those 2 cores 0.8x (head parallel, before the kernel); since the
# kernel takes XLA's threads on one device (thirty-fifth session), one device decodes as fast as two there (a stream
# over HTTP ~16% faster, 4 streams about even) and prefills ~10% slower. A machine's CPUs may be hyperthreads, and
# more cores are untried (one device would use them all; two use two for the kernel).
MAX_CPU_DEVICES = 2


class ArgumentError(Exception):
    """An argument that parsed but is not acceptable: exit 1 with one line naming it."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's usage errors, kept to one line
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Serve one GGUF model over HTTP/SSE (see docs/http.md).")
    req = p.add_argument_group("required")
    req.add_argument("--worker-id", required=True, help="this worker's UUID (in every log line)")
    req.add_argument("--gpu-device", required=True, type=int, help="GPU index, 0..count-1 (ignored with --device cpu)")
    req.add_argument("--port", required=True, type=int, help="HTTP port, 1024..65535")
    req.add_argument(
        "--model",
        help="path to the .gguf file; required in production, defaults to the embedded Gemma 3 270M (`just serve`)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--device", choices=("cpu", "gpu", "auto"), default="gpu", help="auto = gpu if JAX sees one")
    p.add_argument(
        "--tensor-parallel",
        type=int,
        default=1,
        metavar="N",
        help="split the model over N devices (GPUs from --gpu-device on; see docs/tensor-parallel.md)",
    )
    p.add_argument(
        "--cpu-devices",
        type=int,
        metavar="N",
        help="on the CPU, spread the model over N host devices, one a core: tensor parallelism where the model "
        "takes it, else the output head's vocabulary split (default: the cores this process may use, at most "
        f"{MAX_CPU_DEVICES}; 1: one device; docs/tensor-parallel.md)",
    )
    p.add_argument("--callback-url", help="POST a ready message (worker id, model, vram bytes, port) here once ready")
    p.add_argument("--max-tokens-in", type=int, help="longest prompt in tokens (default: the model's context)")
    p.add_argument("--max-tokens-out", type=int, default=2048, help="largest max_tokens a request may ask (1..2048)")
    p.add_argument("--inference-timeout-sec", type=float, default=300.0, help="a job running longer fails")
    p.add_argument(
        "--kv-cache-size-mb", type=int, help="KV pool size; also caps the context in tokens (default: --kv-memory)"
    )
    p.add_argument("--tokenizer-json", help="use this tokenizer.json (hf-json) instead of the GGUF's tokenizer")
    p.add_argument(
        "--chat-template", help="a Jinja chat template file for /v1/chat/completions instead of the GGUF's own"
    )
    p.add_argument(
        "--compile-cache",
        metavar="DIR",
        help="JAX's persistent compilation cache folder (default: <user cache dir>/worker-orcd/jax)",
    )
    p.add_argument("--no-compile-cache", action="store_true", help="compile everything at start, cache nothing")
    p.add_argument(
        "--max-batch", type=int, help="jobs decoded together (default: 64 on a GPU, 4 on the CPU; 1 = one at a time)"
    )
    p.add_argument(
        "--kv-memory",
        type=float,
        help="fraction of the device memory left after the weights for the KV pool (default 0.5)",
    )
    p.add_argument(
        "--deterministic",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a job's tokens do not depend on the jobs sharing its batch (default on; off: faster with several jobs "
        "on the CPU)",
    )
    p.add_argument(
        "--dispatch-ms",
        type=float,
        help="a GPU decode dispatch's target at full load, in ms: its steps are sized at start to stay within it "
        "(default 30); longer carries more tokens a host round trip (throughput with hundreds of streams), and new "
        "jobs join at dispatch boundaries",
    )
    p.add_argument(
        "--prefill-tokens",
        type=int,
        help="prompt tokens prefilled an engine step, between decode dispatches (default 4096 on a GPU, one 512-token "
        "chunk on the CPU): more finishes a burst of prompts sooner and stalls the running streams longer",
    )
    p.add_argument(
        "--int8-x",
        action="store_true",
        help="decode's quantized matvecs on activations rounded to int8 per block of 32, as llama.cpp does: the "
        "fastest single stream on a GPU (~1.3x), at another precision (docs/kernels.md); --max-batch then defaults "
        "to 8; not on the CPU",
    )
    p.add_argument(
        "--bf16-experts",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also hold MoE experts widened to bf16 for decode steps (default: only where the grouped MoE kernel's "
        "decode dot is unswapped, WORKER_TC_SWAP, on a GPU with --max-batch above 8, where the copy fits: swapped, "
        "the stored experts are the faster read)",
    )
    p.add_argument(
        "--http-process",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the HTTP server in a process of its own, joined to the engine's by a pipe, so that the two do not "
        "share Python's interpreter lock (default: on a GPU, where hundreds of streams need it; docs/batching.md)",
    )
    p.add_argument("--max-queue", type=int, default=4, help="jobs that may wait for a free place (default 4)")
    p.add_argument("--shutdown-deadline", type=float, default=5.0, help="seconds to finish or cancel the running job")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB)")
    p.add_argument("--residency-check-sec", type=float, default=60.0, help="period of the weight residency check")
    p.add_argument(
        "--api-key",
        default=os.environ.get("WORKER_API_KEY"),
        help="require `Authorization: Bearer KEY` on every endpoint but /health (default: env WORKER_API_KEY)",
    )
    return p


def validate(args: argparse.Namespace) -> None:
    """Checks that need no JAX, so a bad command line fails in well under a second."""
    try:
        args.worker_id = str(uuid.UUID(args.worker_id))
    except ValueError:
        raise ArgumentError(f"--worker-id {args.worker_id!r}: not a UUID") from None
    if not 1024 <= args.port <= 65535:
        raise ArgumentError(f"--port {args.port}: must be in 1024..65535")
    if args.gpu_device < 0:
        raise ArgumentError(f"--gpu-device {args.gpu_device}: must be 0 or more")
    for flag, path in (
        ("--model", args.model),
        ("--tokenizer-json", args.tokenizer_json),
        ("--chat-template", args.chat_template),
    ):
        if path is not None:
            _check_readable(flag, Path(path))
    if args.callback_url is not None:
        url = urlparse(args.callback_url)
        if url.scheme not in ("http", "https") or not url.netloc:
            raise ArgumentError(f"--callback-url {args.callback_url!r}: not an http(s) URL")
    positive = [
        ("--max-tokens-in", args.max_tokens_in, 1),
        ("--kv-cache-size-mb", args.kv_cache_size_mb, 1),
        ("--max-body-bytes", args.max_body_bytes, 1024),
        ("--max-queue", args.max_queue, 0),
        ("--max-batch", args.max_batch, 1),
        ("--prefill-tokens", args.prefill_tokens, 1),
        ("--tensor-parallel", args.tensor_parallel, 1),
        ("--cpu-devices", args.cpu_devices, 1),
    ]
    for flag, value, low in positive:
        if value is not None and value < low:
            raise ArgumentError(f"{flag} {value}: must be at least {low}")
    if args.tensor_parallel > 1 and (args.cpu_devices or 1) > 1:
        raise ArgumentError("--cpu-devices and --tensor-parallel are two layouts of the model: ask for one")
    if args.cpu_devices is not None and args.device == "gpu":
        raise ArgumentError("--cpu-devices spreads the model over the CPU's cores: not with --device gpu (on a GPU "
                            "run several GPUs with --tensor-parallel)")  # fmt: skip
    if not 1 <= args.max_tokens_out <= 2048:
        raise ArgumentError(f"--max-tokens-out {args.max_tokens_out}: must be in 1..2048")
    for flag, value in (
        ("--inference-timeout-sec", args.inference_timeout_sec),
        ("--shutdown-deadline", args.shutdown_deadline),
        ("--residency-check-sec", args.residency_check_sec),
    ):
        if not value > 0:
            raise ArgumentError(f"{flag} {value}: must be more than 0")
    if args.kv_memory is not None and not 0.0 < args.kv_memory <= 1.0:
        raise ArgumentError(f"--kv-memory {args.kv_memory}: must be in (0, 1]")
    if args.dispatch_ms is not None and not 0.0 < args.dispatch_ms <= 1000.0:
        raise ArgumentError(f"--dispatch-ms {args.dispatch_ms}: must be in (0, 1000]")
    if args.api_key == "":
        raise ArgumentError("--api-key '': must not be empty")


def _check_readable(flag: str, path: Path) -> None:
    if not path.exists():
        raise ArgumentError(f"{flag} {path}: no such file")
    if not path.is_file():
        raise ArgumentError(f"{flag} {path}: not a file")
    if not os.access(path, os.R_OK):
        raise ArgumentError(f"{flag} {path}: not readable")


def bind(host: str, port: int) -> socket.socket:
    """Bind now (listening starts only when the HTTP server starts, after the model is loaded), so a port in use
    is reported as an argument error before minutes of loading."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        flag = "--host" if isinstance(e, socket.gaierror) else "--port"
        raise ArgumentError(f"{flag} {host if flag == '--host' else port}: cannot bind {host}:{port}: {e}") from None
    return sock


def kv_slots(model_path: str, kv_mb: int, device_kind: str) -> int:
    """--kv-cache-size-mb -> the number of token slots the KV cache holds (capped at the model's context)."""
    from worker.gguf import open_gguf
    from worker.kv_cache import bytes_per_slot, dtype_for
    from worker.models import adapter_for

    gf = open_gguf(model_path)
    cfg = adapter_for(gf.architecture).config(gf)
    per_token = bytes_per_slot(cfg, dtype_for(device_kind))
    slots = min(cfg.context_length, kv_mb * (1 << 20) // per_token)
    if slots < 1:
        raise ArgumentError(f"--kv-cache-size-mb {kv_mb}: holds no token of this model ({per_token} bytes a token)")
    return slots


class _Stop(BaseException):
    """SIGTERM or SIGINT arrived while starting: stop loading and exit 0. A BaseException, so that no `except
    Exception` on the way (a logging handler, a device probe) swallows it when the signal lands inside one."""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        validate(args)
        sock = bind(args.host, args.port)
    except ArgumentError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    if args.tensor_parallel > 1:
        host_devices(args.tensor_parallel)
    elif args.device != "gpu":  # the CPU's head parallelism (on a GPU the host devices go unused)
        host_devices(args.cpu_devices or default_cpu_devices())
    started = time.monotonic()
    narrator = Narrator(args.worker_id, args.model, args.gpu_device)
    _route_python_logging(narrator)
    narrator.emit("startup", pid=os.getpid(), device=args.device, host=args.host, port=args.port)

    # SIGTERM and SIGINT until the server's own handlers take over: each is recorded, and while the model loads it
    # also stops the load at once (_Stop). The record is what counts: where the signal lands in a finalizer or a
    # callback, Python only reports the exception and the load goes on (a fresh-clone CI run of 2026-12-07 served
    # after a SIGTERM at model_load_start, its raise lost).
    stops: list[str] = []

    def record(sig: int, _frame: Any) -> None:
        stops.append(signal.Signals(sig).name)

    def stop_starting(sig: int, frame: Any) -> None:
        record(sig, frame)
        raise _Stop(stops[0])

    def stopped_starting(reason: str) -> int:
        narrator.emit(
            "shutdown", reason=f"{reason} during start-up", uptime_seconds=round(time.monotonic() - started, 3)
        )
        return 0

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop_starting)
    try:
        engine, chat_template = start_engine(args, narrator)
    except _Stop as e:
        return stopped_starting(str(e))
    except ArgumentError as e:
        narrator.emit("error", level="error", code="INVALID_REQUEST", message=str(e), model_path=narrator.model_ref)
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except WorkerError as e:  # M0-W-1111: the code, the reason, the device and the model
        narrator.emit(
            "error",
            level="error",
            code=str(e.code),
            message=e.message,
            device=args.device,
            model_path=narrator.model_ref,
        )
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # a defect of ours: still one line and exit 1, with the traceback in the log
        logging.getLogger(__name__).exception("start-up failed")
        print(f"{PROG}: error: INTERNAL: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, record)  # no raise past here: the engine thread starts below
    if stops:  # a stop whose raise was lost on the way
        engine.shutdown(args.shutdown_deadline)
        code = stopped_starting(stops[0])
        if engine.compiling:  # a thread in an XLA compile ahead: see serve
            os._exit(code)
        return code
    engine.start()
    split = args.http_process if args.http_process is not None else engine.model.device_kind == "gpu"
    if split:
        return serve_split(args, sock, engine, narrator, started, stops)
    return serve(args, sock, engine, chat_template, narrator, started, stops)


def default_cpu_devices() -> int:
    """--cpu-devices' default: a host device for each core this process may use, at most MAX_CPU_DEVICES."""
    return min(usable_cores(), MAX_CPU_DEVICES)


def host_devices(n: int) -> None:
    """--tensor-parallel N or --cpu-devices N on the CPU needs N host devices, which XLA creates only if told before
    JAX starts (here, before anything imports it); on a GPU run the flag changes nothing."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def start_engine(args: argparse.Namespace, narrator: Narrator) -> tuple[Engine, ChatTemplate | None]:
    """Device init -> model load (progress at 0/25/50/75/100 %) and its chat template -> the engine, not yet started
    (`main` starts its thread once a signal can no longer interrupt it half-way)."""
    import worker
    from worker import compile_cache
    from worker.chat import load_chat_template
    from worker.device import pick_device
    from worker.engine import Engine
    from worker.sampling import SamplingParams

    model_path = args.model or worker.default_model_path()
    narrator.model_ref = model_path
    cache_dir = None if args.no_compile_cache else compile_cache.enable(args.compile_cache)
    dev = pick_device(args.device, args.gpu_device)
    slots = kv_slots(model_path, args.kv_cache_size_mb, dev.platform) if args.kv_cache_size_mb else None
    narrator.emit(
        "model_load_start",
        model_path=model_path,
        device=dev.platform,
        device_id=dev.id,
        compile_cache=None if cache_dir is None else str(cache_dir),
    )
    t0 = time.monotonic()
    model = worker.load(
        model_path,
        device=dev.platform,
        compile_cache=cache_dir or False,
        gpu_index=args.gpu_device,
        slots=slots,
        kv_tokens=slots,
        max_batch=args.max_batch,
        **({} if args.kv_memory is None else {"kv_memory": args.kv_memory}),
        deterministic=args.deterministic,
        bf16_experts=args.bf16_experts,
        int8_x=args.int8_x,
        prefill_tokens=args.prefill_tokens,
        tokenizer_json=args.tokenizer_json,
        tensor_parallel=args.tensor_parallel,
        cpu_devices=None if args.tensor_parallel == 1 and dev.platform == "cpu" else 1,
        on_progress=_with_bar(narrator.load_progress()) if sys.stderr.isatty() else narrator.load_progress(),
    )
    narrator.emit(
        "model_load_complete",
        architecture=model.architecture,
        quant_kind=model.quant_kind,
        tokenizer_kind=model.tokenizer.kind,
        context_length=model.context_length,
        max_batch=model.runner.max_batch,
        kv_pool_positions=model.runner.pages * model.runner.page_size,
        bf16_experts=model.bf16_experts,
        layout=model.layout,
        devices=len(model.devices),
        cpu_kernel=model.cpu_kernel,
        vram_bytes_used=model.device_bytes_used(),
        resident=model.resident(),
        load_ms=round((time.monotonic() - t0) * 1000.0, 1),
    )

    template = model.gguf.get("tokenizer.chat_template")
    template = template if isinstance(template, str) else None
    chat_template = load_chat_template(model.tokenizer, template, args.chat_template)

    # Compile the decode step and the smallest prefill bucket now, so the first request does not pay for it: with
    # /execute's default sampling (temperature 1, no filter or penalty), the plan most requests compile to.
    if sys.stderr.isatty():
        cached = f"; kept in {cache_dir} for the next start" if cache_dir else ""
        print(f"compiling the model's steps{cached}...", file=sys.stderr, flush=True)
    # Also the decode at every row bucket a growing load reaches: otherwise the first time N jobs run together every
    # running stream stalls while XLA compiles (~50-90 s a bucket on an H200 host, side by side there). On the CPU the
    # buckets past the first compile after `ready`, on the background thread (Model.warm_up), where a joining job
    # waits for its bucket and the running streams do not. The persistent cache makes later starts skip it.
    dispatch = {} if args.dispatch_ms is None else {"dispatch_s": args.dispatch_ms / 1000.0}
    model.warm_up(SamplingParams(temperature=1.0), all_rows=True, **dispatch)

    def on_event(name: str, fields: dict[str, Any]) -> None:
        narrator.emit(name, level="error" if name == "error" else "info", **fields)

    engine = Engine(
        model,
        max_queue=args.max_queue,
        max_tokens_in=args.max_tokens_in,
        max_tokens_out=args.max_tokens_out,
        inference_timeout_s=args.inference_timeout_sec,
        on_event=on_event,
    )
    return engine, chat_template


def serve(
    args: argparse.Namespace,
    sock: socket.socket,
    engine: Engine,
    chat_template: ChatTemplate | None,
    narrator: Narrator,
    started: float,
    stops: list[str],
) -> int:
    """The HTTP server in this process, until it stops; then the engine's arrays are freed. `stops`: the signals
    recorded before the server's own handlers (each starts the graceful shutdown, as theirs do)."""
    reason = run_http(args, sock, engine, chat_template, narrator, started, early_stops=stops)
    uptime = round(time.monotonic() - started, 3)
    if engine.busy or engine.compiling:
        # The engine thread is stuck where it cannot see its cancel flag (an XLA compile), or a program is being
        # compiled ahead: tearing down the interpreter under it can abort the process, and the deadline has passed,
        # so leave now.
        stuck = {"engine_stopped": False} if engine.busy else {}
        narrator.emit("shutdown", reason=reason, uptime_seconds=uptime, **stuck)
        os._exit(0)
    _free(engine)
    narrator.emit("shutdown", reason=reason, uptime_seconds=uptime)
    return 0


def run_http(
    args: argparse.Namespace,
    sock: socket.socket,
    engine: Engine | RemoteEngine,
    chat_template: ChatTemplate | None,
    narrator: Narrator,
    started: float,
    stop_requests: Callable[[_Server], None] | None = None,
    early_stops: Sequence[str] = (),
) -> str:
    """Serve HTTP on `sock` until a shutdown (or uvicorn's own stop) has drained the engine; returns the reason.
    `stop_requests`: where the server hears it should stop, when not from this process's signals. `early_stops`:
    this process's signals that came before the server's handlers were in place."""
    from server.app import create_app
    from server.service import WorkerService

    service = WorkerService(
        engine,
        narrator,
        worker_id=args.worker_id,
        started=started,
        api_key=args.api_key,
        shutdown_deadline_s=args.shutdown_deadline,
        residency_check_s=args.residency_check_sec,
        max_body_bytes=args.max_body_bytes,
        chat_template=chat_template,
    )
    host, port = sock.getsockname()[:2]
    config = http_config(create_app(service))
    server = _Server(config, service, lambda: _ready(args, service, f"http://{_url_host(host)}:{port}", started))
    server.own_signals = stop_requests is None
    server.early_stops = early_stops
    service.on_stopped = server.stop
    if stop_requests is not None:
        stop_requests(server)
    service.start_monitor()
    server.run(sockets=[sock])
    if service.shutdown_reason is None:  # uvicorn stopped on its own
        service.shutdown_reason = "server stopped"
        service.accepting = False
        engine.shutdown(args.shutdown_deadline)
    return service.shutdown_reason


def serve_split(
    args: argparse.Namespace,
    sock: socket.socket,
    engine: Engine,
    narrator: Narrator,
    started: float,
    signals: list[str],
) -> int:
    """`--http-process`: the HTTP server in a child process (`http_process`), this process's engine serving it over
    a pipe (server/engine_link.py). Signals still come here: they are passed on as a request to stop, those already
    in `signals` (recorded while starting) first. Exits when the child does: 0 after its graceful shutdown."""

    # The handler only records: the loop below passes them on (a handler must not take the pipe's lock)
    def on_signal(sig: int, _frame: Any) -> None:
        signals.append(signal.Signals(sig).name)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    host, child = start_http_process(args, sock, engine, started)
    while child.is_alive():
        child.join(0.05)
        while signals:
            host.stop(signals.pop(0))
    if child.exitcode != 0:
        narrator.emit("error", level="error", code="INTERNAL", message=f"the HTTP process exited with {child.exitcode}")
    engine.shutdown(args.shutdown_deadline)  # already done after a graceful shutdown
    if engine.busy or engine.compiling:  # a thread in an XLA compile: see serve
        os._exit(0 if child.exitcode == 0 else 1)
    _free(engine)
    return 0 if child.exitcode == 0 else 1


def start_http_process(
    args: argparse.Namespace, sock: socket.socket, engine: Engine, started: float
) -> tuple[EngineHost, multiprocessing.process.BaseProcess]:
    """Spawn `http_process` on `sock` (this process's copy is closed), `engine` behind an EngineHost that answers it
    on a thread of its own."""
    import multiprocessing

    from server.engine_link import EngineHost

    ctx = multiprocessing.get_context("spawn")  # not fork: this process runs JAX's threads
    here, there = ctx.Pipe()
    host = EngineHost(engine, here)
    template = engine.model.gguf.get("tokenizer.chat_template")
    child = ctx.Process(
        target=http_process,
        args=(args, sock, there, engine.facts(), template if isinstance(template, str) else None, started),
        name=f"{PROG}-http",
    )
    child.start()
    there.close()
    sock.close()
    threading.Thread(target=host.serve, name="engine-link", daemon=True).start()
    return host, child


def http_process(
    args: argparse.Namespace,
    sock: socket.socket,
    conn: Any,
    facts: dict[str, Any],
    template: str | None,
    started: float,
) -> None:
    """The child process of `--http-process`: the app over a RemoteEngine. Its own signals are ignored: a Ctrl-C
    reaches both processes, and the engine's passes it on as a request to stop."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    import worker
    from server.engine_link import RemoteEngine
    from worker.chat import load_chat_template

    narrator = Narrator(args.worker_id, args.model or worker.default_model_path(), args.gpu_device)
    _route_python_logging(narrator)
    tokenizer = worker.load_tokenizer(narrator.model_ref, args.tokenizer_json)
    engine = RemoteEngine(conn, facts, tokenizer)
    early: list[str] = []  # requests to stop that came before the server existed (a SIGTERM during start-up)
    engine.on_stop = early.append
    engine.on_lost = lambda: early.append("the engine's process ended")

    def stop_requests(server: _Server) -> None:
        engine.on_stop = server.stop_for
        engine.on_lost = lambda: server.stop_for("the engine's process ended")
        for reason in early:
            server.stop_for(reason)

    engine.start()
    chat_template = load_chat_template(tokenizer, template, args.chat_template)
    reason = run_http(args, sock, engine, chat_template, narrator, started, stop_requests)
    uptime = round(time.monotonic() - started, 3)
    stuck = {"engine_stopped": False} if engine.busy else {}
    narrator.emit("shutdown", reason=reason, uptime_seconds=uptime, **stuck)
    engine.close()


def http_config(app: Any) -> uvicorn.Config:
    """uvicorn's settings for the worker's app."""
    from server.app import MAX_HEADER_BYTES

    return uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        lifespan="on",
        server_header=False,
        # h11 bounds the request head (the request line and every header together); httptools, which uvicorn
        # would pick if it were installed, has no such limit.
        http="h11",
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        # the jobs were drained by begin_shutdown already; this only bounds idle keep-alive connections
        timeout_graceful_shutdown=1,
    )


class _Server(uvicorn.Server):
    """uvicorn's server with the worker's signal policy: the first SIGTERM/SIGINT starts a graceful shutdown (stop
    accepting, drain the engine, then stop serving); a second one forces the exit."""

    def __init__(self, config: uvicorn.Config, service, on_ready: Callable[[], None]):
        super().__init__(config)
        self.service, self.on_ready = service, on_ready

    early_stops: Sequence[str] = ()  # signals recorded before this server's handlers (main's `stops`)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn's handlers are in place here (serve's capture_signals): what came before is taken now
        for reason in self.early_stops:
            self.stop_for(reason)
        await super().startup(sockets=sockets)
        if self.started and not self.should_exit and self.service.shutdown_reason is None:  # none draining
            self.on_ready()

    own_signals = True  # False in --http-process's child: the engine's process passes its signals on (stop_for)

    def handle_exit(self, sig: int, frame: Any) -> None:
        # Not recorded in _captured_signals: uvicorn would re-raise it at exit, and the process would die of
        # SIGTERM instead of exiting 0.
        if self.own_signals:
            self.stop_for(signal.Signals(sig).name)

    def stop_for(self, reason: str) -> None:
        """A graceful shutdown; the second request forces the exit."""
        if not self.service.begin_shutdown(reason):
            self.should_exit = self.force_exit = True

    def stop(self) -> None:
        self.should_exit = True


def _ready(args: argparse.Namespace, service, url: str, started: float) -> None:
    health = service.health()
    message = {
        "worker_id": args.worker_id,
        "model": health["model"],
        "vram_bytes": health["vram_bytes_used"],
        "port": args.port,
        "url": url,
        "device": health["device"],
        "quant_kind": health["quant_kind"],
    }
    warmed = service.engine.facts().get("warm_up")  # where the start's compiles went (minutes, cold, on a GPU)
    warm_up = {"warm_up": warmed} if warmed is not None else {}
    service.narrator.emit("ready", **message, startup_ms=round((time.monotonic() - started) * 1000.0, 1), **warm_up)
    if args.callback_url:
        threading.Thread(target=_callback, args=(args.callback_url, message, service.narrator), daemon=True).start()


def _callback(url: str, message: dict[str, Any], narrator: Narrator) -> None:
    import httpx

    try:
        httpx.post(url, json=message, timeout=10.0).raise_for_status()
    except httpx.HTTPError as e:  # the worker still serves; the orchestrator can find it through /health
        narrator.emit("error", level="error", message=f"ready callback to {url} failed: {e}", callback_url=url)


def _with_bar(narrate: Callable[[int, int], None], width: int = 30) -> Callable[[int, int], None]:
    """`narrate` (the load's narration events) plus a progress bar on the bottom line of the terminal: the bar is
    cleared before each call, so the event lines scroll above it."""

    def on_progress(done: int, total: int) -> None:
        sys.stderr.write("\r\033[K")
        narrate(done, total)
        part = 1.0 if total <= 0 else done / total
        bar = "#" * round(width * part) + "." * (width - round(width * part))
        sys.stderr.write(f"loading [{bar}] {100 * part:3.0f}% {done / 2**20:.0f}/{total / 2**20:.0f} MiB")
        sys.stderr.write("\n" if done >= total else "")
        sys.stderr.flush()

    return on_progress


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _free(engine: Engine) -> None:
    """Release the weights and the KV cache now, rather than at interpreter teardown (REQUIREMENTS §1)."""
    import jax

    model = engine.model
    for leaf in jax.tree_util.tree_leaves((model.runner.weights, model.batch.device_state())):
        if isinstance(leaf, jax.Array) and not leaf.is_deleted():
            leaf.delete()


def _route_python_logging(narrator: Narrator) -> None:
    """Warnings and errors of Python loggers (uvicorn, Litestar, JAX, the engine) become narration lines, and so do
    Python's `warnings` (logger "py.warnings"): JAX reports a persistent compile cache entry it could not read or
    write (its folder's lock not acquired within 10 s, seen on a GPU start) as one, which went out as bare text."""
    root = logging.getLogger()
    root.handlers[:] = [narrator.log_handler()]
    root.setLevel(logging.WARNING)
    logging.getLogger("worker").setLevel(logging.INFO)  # its few notes: a program compiled ahead, a trace written
    logging.captureWarnings(True)


if __name__ == "__main__":
    sys.exit(main())
