"""The peer: llama.cpp's `llama-bench` on the same file and device (tools/llamacpp-src.sh and
tools/llamacpp-build.sh make the binary). Runs `llama-bench -m FILE -p 512 -n 128 -fa 1 -ngl 99 -o json` and
reads its JSON: one record per test, `avg_ts` the mean tokens/s over its repetitions."""

from __future__ import annotations

import json
import subprocess
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
