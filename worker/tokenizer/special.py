"""Which tokens are special and how: llama.cpp's load-time rules for a vocabulary (src/llama-vocab.cpp,
`llama_vocab::impl::load`, at commit 0c1e5709, the one the tokenizer oracles were made with).

A GGUF file stores one type per token; llama.cpp turns it into attribute flags and then adjusts them by token
text: end-of-turn and fill-in-the-middle tokens become control tokens, a fixed list of texts marks
end-of-generation, and gpt-oss's harmony tokens are made user-defined so that they are always rendered. The
same rules decide which tokens are split out of raw text (control and unknown only with special=True,
user-defined always), which are rendered by decode, and when generation stops.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

# GGUF token types (gguf.TokenType) and llama.cpp's attribute bits (llama_token_attr).
TYPE_NORMAL, TYPE_UNKNOWN, TYPE_CONTROL, TYPE_USER_DEFINED, TYPE_UNUSED, TYPE_BYTE = 1, 2, 3, 4, 5, 6
UNKNOWN, UNUSED, NORMAL, CONTROL, USER_DEFINED, BYTE = 1 << 0, 1 << 1, 1 << 2, 1 << 3, 1 << 4, 1 << 5
LSTRIP, RSTRIP = 1 << 7, 1 << 8
ATTR_OF_TYPE = {
    TYPE_NORMAL: NORMAL,
    TYPE_UNKNOWN: UNKNOWN,
    TYPE_CONTROL: CONTROL,
    TYPE_USER_DEFINED: USER_DEFINED,
    TYPE_UNUSED: UNUSED,
    TYPE_BYTE: BYTE,
}
# Rendered only when asked for (decode(special=True)) and split out of text only with encode(special=True).
HIDDEN = CONTROL | UNKNOWN
# Split out of raw text before the BPE/SentencePiece model sees it.
SPLIT = CONTROL | UNKNOWN | USER_DEFINED

# Texts llama.cpp recognises when the file names no id. Where several match, llama.cpp takes whichever its hash
# map yields first; here the first text in list order that the vocabulary has.
EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>",
             "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>")  # fmt: skip
EOM_TEXTS = ("<|eom_id|>",)
FIM_TEXTS = {
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
                "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
                "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
                "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}  # fmt: skip
EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
             "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
             "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
             "<｜end▁of▁sentence｜>", "[e~[")  # fmt: skip
# gpt-oss: the harmony parser downstream needs these in the text, so llama.cpp makes them user-defined.
HARMONY_RENDERED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")


def apply_llama_rules(
    texts: Sequence[str],
    attrs: list[int],
    index: Mapping[str, int],
    ids: Mapping[str, int | None],
    model_name: str = "",
) -> frozenset[int]:
    """Adjust `attrs` (one per token, from the token types) in place as llama.cpp does at load, and return
    the end-of-generation ids. `index` maps text -> id; `ids` holds the ids the file names ("eos", "eot",
    "eom" and the FIM keys of FIM_TEXTS), None where it names none."""

    def find(candidates: Sequence[str]) -> int | None:
        return next((index[t] for t in candidates if t in index), None)

    found: dict[str, int | None] = {}
    for key, candidates in (("eot", EOT_TEXTS), ("eom", EOM_TEXTS), *FIM_TEXTS.items()):
        found[key] = ids.get(key)
        if found[key] is None:
            found[key] = find(candidates)
            if found[key] is not None:
                attrs[found[key]] |= CONTROL

    eog = {found[k] for k in ("fim_pad", "fim_rep", "fim_sep") if found[k] is not None}
    for text in EOG_TEXTS:
        if text in index:
            eog.add(index[text])
            attrs[index[text]] |= CONTROL
    for text in HARMONY_RENDERED:
        if text in index:
            attrs[index[text]] = USER_DEFINED
    eog.update(i for i in (ids.get("eos"), found["eot"], found["eom"]) if i is not None)

    eog_texts = {texts[i] for i in eog}
    # o200k_harmony (and solar-open): <|end|> ends a message, not the generation, when <|return|>/<|call|> exist.
    has_call = bool(eog_texts & {"<|call|>", "<|calls|>"})
    if "<|end|>" in eog_texts and has_call and eog_texts & {"<|return|>", "<|flush|>"}:
        end = next(i for i in eog if texts[i] == "<|end|>")
        eog.discard(end)
        attrs[end] = USER_DEFINED
    # Gemma 4 and PLaMo 2 have an ordinary </s>.
    if eog_texts & {"<|tool_response>", "<|plamo:eos|>"} and "</s>" in eog_texts:
        s = next(i for i in eog if texts[i] == "</s>")
        eog.discard(s)
        attrs[s] = NORMAL

    name = model_name.lower()
    if "phi-3" in name or "phi3" in name:
        # Phi-3's special tokens swallow the whitespace after them (its tokenizer.json has rstrip=true).
        for i, a in enumerate(attrs):
            if a & SPLIT:
                attrs[i] |= RSTRIP
        for text, on in (("</s>", True), ("<unk>", False), ("<s>", False), ("<|endoftext|>", False)):
            if text in index:
                attrs[index[text]] = attrs[index[text]] | RSTRIP if on else attrs[index[text]] & ~RSTRIP
    return frozenset(eog)
