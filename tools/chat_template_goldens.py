"""Make tests/data/chat_templates/goldens.json: each template in that folder rendered by HF transformers'
`apply_chat_template(tokenize=False)` for each conversation in conversations.json. Run once, by hand, in a venv with
transformers (not a dependency of the worker):

    python -m venv /tmp/tf && /tmp/tf/bin/pip install transformers jinja2
    /tmp/tf/bin/python tools/chat_template_goldens.py      # made with transformers 5.24.0, jinja2 3.1.6

The tokenizer object only carries the template and the family's bos/eos token texts (from each family's
tokenizer_config.json); rendering needs no vocabulary. strftime_now (gpt-oss writes today's date) is pinned to
FIXED_NOW, which tests/test_chat_template.py passes to the worker's renderer too.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import transformers
import transformers.utils.chat_template_utils as ctu
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / "chat_templates"
FIXED_NOW = datetime(2026, 12, 2, 1, 0, 0)
# template file -> (bos_token, eos_token) as the family's tokenizer_config.json names them
SPECIAL = {
    "qwen-chatml.jinja": (None, "<|im_end|>"),
    "phi-3.jinja": ("<s>", "<|endoftext|>"),
    "llama3.1.jinja": ("<|begin_of_text|>", "<|eot_id|>"),
    "gemma3.jinja": ("<bos>", "<end_of_turn>"),
    "gpt-oss.jinja": ("<|startoftext|>", "<|return|>"),
}


class _FixedClock(datetime):
    @classmethod
    def now(cls, tz=None):
        return FIXED_NOW


def main() -> None:
    ctu.datetime = _FixedClock  # strftime_now reads the module's datetime when it is called
    conversations = json.loads((DATA / "conversations.json").read_text())
    goldens = []
    for name, (bos, eos) in SPECIAL.items():
        source = (DATA / name).read_text()
        tok = PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer(WordLevel({"<unk>": 0}, unk_token="<unk>")),
            bos_token=bos,
            eos_token=eos,
            chat_template=source,
        )
        for conv in conversations:
            if name in conv.get("skip", []):
                continue
            text = tok.apply_chat_template(
                conv["messages"], tokenize=False, add_generation_prompt=conv["add_generation_prompt"]
            )
            goldens.append({"template": name, "conversation": conv["name"], "bos": bos, "eos": eos, "text": text})
    out = {"transformers": transformers.__version__, "now": FIXED_NOW.isoformat(), "goldens": goldens}
    (DATA / "goldens.json").write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n")
    print(f"{len(goldens)} goldens written")


if __name__ == "__main__":
    main()
