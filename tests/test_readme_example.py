"""The README's first five minutes, end to end on the CPU: the worker started as `just serve` starts it (no
--model: the embedded Gemma 3 270M) and the README's own client command, read from README.md, streaming a
completion and printing its one-line summary. Cut to a few tokens (--max-tokens appended: the last one wins) so the
test stays cheap; the README's full example is timed in docs/PERFORMANCE.md, not here."""

from __future__ import annotations

import re
import shlex

import pytest

from tests.worker_process import REPO, WorkerProcess
from worker import client

pytestmark = pytest.mark.slow

TOKENS = 16


def readme_client_args() -> list[str]:
    """The arguments of the README's first `python -m worker.client "..."` command."""
    for line in (REPO / "README.md").read_text().splitlines():
        if "-m worker.client " in line:
            words = shlex.split(line, comments=True)
            args = words[words.index("worker.client") + 1 :]
            if args and not args[0].startswith("-"):
                return args
    raise AssertionError('README.md has no `python -m worker.client "PROMPT" ...` example')


@pytest.fixture(scope="module")
def server():
    w = WorkerProcess(None)
    try:
        yield w.wait_ready()
    finally:
        w.stop()


def test_readme_client_example_streams_a_continuation(server, capsys):
    args = readme_client_args()
    assert "--seed" in args  # the README promises the same text on every run
    assert client.main([*args, "--url", server.url, "--max-tokens", str(TOKENS)]) == 0
    out, err = capsys.readouterr()
    words = re.findall(r"[A-Za-z]+", out)
    assert len(words) >= TOKENS // 3, out  # text, not ids or bytes
    seed = args[args.index("--seed") + 1]
    summary = err.strip().splitlines()[-1]
    pattern = rf"\[(\d+) tokens, [\d.]+ tok/s, first token after [\d.]+ s, stop (max_tokens|eos), seed {seed}\]"
    match = re.fullmatch(pattern, summary)
    assert match, summary
    assert int(match[1]) == TOKENS or match[2] == "eos"
