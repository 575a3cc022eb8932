"""gpt-oss (o200k_harmony): the hf-json backend on gpt-oss's tokenizer.json against tiktoken's ids, and the
gguf-bpe backend on a vocab-only GGUF made from that tokenizer.json the way llama.cpp's convert_hf_to_gguf.py
does (tokenizer.ggml.model "gpt2", pre "gpt-4o", added special tokens CONTROL, ids up to the model's 201,088
padded with UNUSED [PADn]).

Vectors matched as stated, with these exceptions:
- endofprompt_vs_reserved: tiktoken, HF and openai-harmony disagree with each other (README, the vector's note:
  the tokenizer.json has no added tokens above 200018, tiktoken has reserved ones). A tokenizer.json backend can
  only give the tokenizer.json's answer, so there we check the HF oracle ids (ids_hf).
- gguf-bpe with special=False: llama.cpp makes <|start|>, <|channel|>, <|message|>, <|constrain|> and <|end|>
  user-defined for gpt-oss (llama-vocab.cpp: "quick hack for gpt-oss" and the o200k_harmony <|end|> rule), and
  user-defined tokens are split out of plain text too. So where tiktoken's encode_ordinary spells these out, the
  GGUF backend gives the single tokens, as llama.cpp does; we check exactly that.
"""

from __future__ import annotations

import json
import lzma
import re
import shutil
from pathlib import Path

import gguf
import pytest
from conftest import find_oracles, oracles_dir

from worker.tokenizer import StreamDecoder, load_tokenizer

N_VOCAB = 201088  # gpt-oss config.json vocab_size (tiktoken_n_vocab in meta.json)
ALWAYS_SPLIT = ("<|start|>", "<|channel|>", "<|message|>", "<|constrain|>", "<|end|>")


def _vectors() -> list[dict]:
    root = find_oracles()
    if root is None:
        return [None]
    return json.loads((root / "tokenizers" / "gpt-oss" / "vectors.json").read_text(encoding="utf-8"))


VECTORS = _vectors()


def _ids(v):
    return v["name"] if v else "no-oracles"


@pytest.fixture(scope="module")
def gptoss_dir(tmp_path_factory) -> Path:
    src = oracles_dir() / "tokenizers" / "gpt-oss"
    out = tmp_path_factory.mktemp("gpt-oss")
    with lzma.open(src / "tokenizer.json.xz") as f, open(out / "tokenizer.json", "wb") as g:
        shutil.copyfileobj(f, g)
    shutil.copy(src / "tokenizer_config.json", out)
    return out


@pytest.fixture(scope="module")
def hf_tok(gptoss_dir):
    return load_tokenizer(gptoss_dir / "tokenizer.json")


@pytest.fixture(scope="module")
def gguf_tok(gptoss_dir):
    spec = json.loads((gptoss_dir / "tokenizer.json").read_text(encoding="utf-8"))
    config = json.loads((gptoss_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    tokens = [f"[PAD{i}]" for i in range(N_VOCAB)]
    types = [gguf.TokenType.UNUSED] * N_VOCAB
    for text, i in spec["model"]["vocab"].items():
        tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for added in spec["added_tokens"]:
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]

    path = gptoss_dir / "vocab-gpt-oss.gguf"
    w = gguf.GGUFWriter(path, "gpt-oss")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-4o")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index(config["bos_token"]))
    w.add_eos_token_id(tokens.index(config["eos_token"]))
    w.add_pad_token_id(tokens.index(config["pad_token"]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return load_tokenizer(path)


@pytest.mark.parametrize("vec", VECTORS, ids=_ids)
def test_hf_json_matches_tiktoken(hf_tok, vec):
    text = vec["text"]
    assert hf_tok.kind == "hf-json"
    assert hf_tok.encode(text, special=True) == (vec["ids"] if vec["hf_equal"] else vec["ids_hf"])
    assert vec["hf_ordinary_equal"]
    assert hf_tok.encode(text) == vec["ids_ordinary"]
    assert hf_tok.decode(vec["ids_hf"], special=True) == vec["decoded_hf"]
    if vec["roundtrip"]:
        assert hf_tok.decode(vec["ids"], special=True) == vec["decoded"] == text
        assert hf_tok.decode(hf_tok.encode(text)) == text


@pytest.mark.parametrize("vec", VECTORS, ids=_ids)
def test_gguf_from_tokenizer_json_matches(hf_tok, gguf_tok, vec):
    text = vec["text"]
    assert gguf_tok.kind == "gguf-bpe"
    assert gguf_tok.encode(text, special=True) == hf_tok.encode(text, special=True)
    # plain text: llama.cpp's always-split harmony tokens become single tokens, the rest is tiktoken's ordinary
    parts = re.split("(" + "|".join(map(re.escape, ALWAYS_SPLIT)) + ")", text)
    expected = [i for p in parts for i in hf_tok.encode(p, special=p in ALWAYS_SPLIT)]
    assert gguf_tok.encode(text) == expected
    if not any(t in text for t in ALWAYS_SPLIT):
        assert expected == vec["ids_ordinary"]
    for ids in (vec["ids_hf"], vec["ids_hf_ordinary"]):
        for special in (False, True):
            assert gguf_tok.decode(ids, special=special) == hf_tok.decode(ids, special=special)


@pytest.mark.parametrize("vec", VECTORS, ids=_ids)
def test_streaming(hf_tok, gguf_tok, vec):
    for tok in (hf_tok, gguf_tok):
        for special in (False, True):
            ids = tok.encode(vec["text"], special=special)
            stream = StreamDecoder(tok, special=special)
            chunks = [stream.push(i) for i in ids] + [stream.flush()]
            assert "".join(chunks) == tok.decode(ids, special=special)
            assert not any("\ufffd" in c for c in chunks)


def test_special_ids(hf_tok, gguf_tok):
    for tok in (hf_tok, gguf_tok):
        assert (tok.bos_id, tok.eos_id, tok.add_bos) == (199998, 200002, False)
        # <|endoftext|>, <|return|>, <|call|>; <|end|> closes a message, not the generation (llama.cpp's rule)
        assert tok.eog_ids == {199999, 200002, 200012}
        # harmony markers are always rendered, for the parser downstream; other control tokens only on request
        assert tok.decode([200006, 173781, 200008, 200007]) == "<|start|>assistant<|message|><|end|>"
        assert tok.decode([200002]) == "" and tok.decode([200002], special=True) == "<|return|>"
    assert hf_tok.vocab_size == 200019 and gguf_tok.vocab_size == N_VOCAB
