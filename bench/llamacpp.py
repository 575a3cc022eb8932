"""The peer: llama.cpp on the same file and device (tools/llamacpp-src.sh and tools/llamacpp-build.sh make the
binaries). Batch 1: `llama-bench -m FILE -p 512 -n 128 -fa 1 -ngl 99 -o json`, whose JSON holds one record per test,
`avg_ts` the mean tokens/s over its repetitions. Under load (bench/load.py): `llama-batched-bench` (its markdown
table) and `llama-server -np N --cont-batching` (started and stopped here; bench/load.py's client drives it)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path


def command(binary: str, model: str, device: str, prompt_tokens: int, decode_tokens: int, threads: int | None):
    cmd = [binary, "-m", model, "-p", str(prompt_tokens), "-n", str(decode_tokens), "-fa", "1", "-o", "json"]
    cmd += ["-ngl", "99" if device == "gpu" else "0"]
    if threads:
        cmd += ["-t", str(threads)]
    return cmd


def parse(records: list[dict], prompt_tokens: int, decode_tokens: int) -> dict:
    """Prefill (the pp test: n_prompt tokens, no generation) and decode (the tg test) tokens/s from llama-bench's
    JSON records."""

    def pick(n_prompt: int, n_gen: int) -> dict:
        found = [r for r in records if r.get("n_prompt") == n_prompt and r.get("n_gen") == n_gen]
        if len(found) != 1:
            raise ValueError(f"llama-bench output has {len(found)} records for n_prompt={n_prompt} n_gen={n_gen}")
        return found[0]

    pp, tg = pick(prompt_tokens, 0), pick(0, decode_tokens)
    return {
        "engine": "llama.cpp",
        "prefill_tok_s": float(pp["avg_ts"]),
        "prefill_tok_s_stddev": float(pp.get("stddev_ts", 0.0)),
        "decode_tok_s": float(tg["avg_ts"]),
        "decode_tok_s_stddev": float(tg.get("stddev_ts", 0.0)),
        "build_commit": tg.get("build_commit"),
        "build_number": tg.get("build_number"),
        "backends": tg.get("backends"),
        "gpu_info": tg.get("gpu_info"),
        "cpu_info": tg.get("cpu_info"),
        "n_threads": tg.get("n_threads"),
        "n_gpu_layers": tg.get("n_gpu_layers"),
        "flash_attn": tg.get("flash_attn"),
        "type_k": tg.get("type_k"),
        "model_type": tg.get("model_type"),
        "model_size": tg.get("model_size"),
        "repetitions": len(tg.get("samples_ts") or []),
    }


def run(
    binary: str,
    model: str,
    device: str,
    log: Path,
    prompt_tokens: int = 512,
    decode_tokens: int = 128,
    threads: int | None = None,
    timeout: float = 900,
) -> dict:
    cmd = command(binary, model, device, prompt_tokens, decode_tokens, threads)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    log.write_text(f"$ {' '.join(cmd)}\n{proc.stderr}\n{proc.stdout}")
    if proc.returncode != 0:
        raise RuntimeError(f"llama-bench exited with {proc.returncode}: {proc.stderr[-500:]}")
    result = parse(json.loads(proc.stdout), prompt_tokens, decode_tokens)
    return result | {"command": " ".join(cmd)}


# --- the peers under load: llama-batched-bench and llama-server (bench/load.py) ----------------------------------


def batched_bench_command(
    binary: str | Path, model: str, device: str, levels: list[int], prompt_tokens: int, decode_tokens: int, threads: int
) -> list[str]:
    """`llama-batched-bench` with every sequence its own prompt (no -pps), flash attention, and a context that holds
    the largest level's prompts and outputs."""
    ctx = max(levels) * (prompt_tokens + decode_tokens)
    cmd = [
        str(binary),
        "-m",
        model,
        "-c",
        str(ctx),
        "-b",
        "2048",
        "-ub",
        "512",
        "-npp",
        str(prompt_tokens),
        "-ntg",
        str(decode_tokens),
        "-npl",
        ",".join(map(str, levels)),
        "-fa",
        "on",
    ]
    return cmd + (["-ngl", "99"] if device == "gpu" else ["-ngl", "0", "-t", str(threads)])


BATCHED_BENCH_COLUMNS = ("PP", "TG", "B", "N_KV", "T_PP s", "S_PP t/s", "T_TG s", "S_TG t/s", "T s", "S t/s")


def parse_batched_bench(text: str) -> list[dict]:
    """llama-batched-bench's markdown table: one row per level B (sequences), PP prompt and TG generated tokens a
    sequence, N_KV cells used, then prefill (T_PP, S_PP = B*PP/T_PP), decode (T_TG, S_TG = B*TG/T_TG) and the
    whole (T, S) in seconds and tokens/s. Lines that are not table rows (its log) are skipped; a table whose
    header is not the one this parser knows is an error, so a changed format fails loudly."""
    rows, header = [], None
    for line in text.splitlines():
        line = line.strip()
        if not (line.startswith("|") and line.endswith("|")):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if header is None:
            if tuple(cells) != BATCHED_BENCH_COLUMNS:
                raise ValueError(f"llama-batched-bench table header {cells}, expected {list(BATCHED_BENCH_COLUMNS)}")
            header = cells
        elif not set(line) <= set("|-: "):
            v = dict(zip(header, cells, strict=True))
            rows.append(
                {
                    "pp": int(v["PP"]),
                    "tg": int(v["TG"]),
                    "pl": int(v["B"]),
                    "n_kv": int(v["N_KV"]),
                    "t_pp": float(v["T_PP s"]),
                    "s_pp": float(v["S_PP t/s"]),
                    "t_tg": float(v["T_TG s"]),
                    "s_tg": float(v["S_TG t/s"]),
                    "t": float(v["T s"]),
                    "s": float(v["S t/s"]),
                }
            )
    if not rows:
        raise ValueError("no llama-batched-bench table in the output")
    return rows


def batched_bench(
    binary: str | Path,
    model: str,
    device: str,
    levels: list[int],
    prompt_tokens: int,
    decode_tokens: int,
    threads: int,
    log: Path,
    timeout: float,
) -> dict:
    cmd = batched_bench_command(binary, model, device, levels, prompt_tokens, decode_tokens, threads)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    log.write_text(f"$ {' '.join(cmd)}\n{proc.stderr}\n{proc.stdout}")
    if proc.returncode != 0:
        raise RuntimeError(f"llama-batched-bench exited with {proc.returncode}: {proc.stderr[-500:]}")
    return {"command": " ".join([Path(cmd[0]).name, *cmd[1:]]), "rows": parse_batched_bench(proc.stdout)}


def server_command(
    binary: str | Path, model: str, device: str, port: int, slots: int, ctx: int, threads: int
) -> list[str]:
    """`llama-server` with `slots` parallel sequences under continuous batching, `ctx` KV cells shared among them,
    flash attention, all layers on the GPU (or `threads` CPU threads)."""
    cmd = [
        str(binary),
        "-m",
        model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-np",
        str(slots),
        "-c",
        str(ctx),
        "--cont-batching",
        "-fa",
        "on",
    ]
    return cmd + (["-ngl", "99"] if device == "gpu" else ["-ngl", "0", "-t", str(threads)])


class LlamaServer:
    """A running llama-server for one concurrency level: `with LlamaServer(...) as url:`; ready when /health answers
    200 (it answers 503 while the model loads), stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(
        self, binary, model: str, device: str, slots: int, ctx: int, threads: int, log: Path, ready_timeout: float = 300
    ):
        from bench.ttft import free_port

        self.port = free_port()
        self.cmd = server_command(binary, model, device, self.port, slots, ctx, threads)
        self.log, self.ready_timeout, self.proc = log, ready_timeout, None

    def __enter__(self) -> str:
        import httpx

        url = f"http://127.0.0.1:{self.port}"
        with self.log.open("wb") as out:
            out.write(f"$ {' '.join(self.cmd)}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode}: {self._tail()}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.__exit__()
        raise TimeoutError(f"llama-server not ready in {self.ready_timeout} s: {self._tail()}")

    def __exit__(self, *exc) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def _tail(self) -> str:
        return self.log.read_text(errors="replace")[-600:].replace("\n", " | ")
