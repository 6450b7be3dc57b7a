"""Tokenizers: diyllm's BPE / char tokenizers <-> a Hugging Face `tokenizer.json` (the `tokenizers` library).

The file is written and read as plain JSON, so diyllm needs neither `tokenizers` nor `transformers`
installed; the tests load what we write with both libraries and compare ids.

BPE (byte-level) maps one to one:
- vocab: our token bytes go through GPT-2's bytes->unicode table (`encode_token`), exactly how byte-level
  BPE files spell tokens; merges likewise, one "a b" string per merge in priority order;
- pre-tokenizer: Split(our regex, "Isolated") then ByteLevel(use_regex=False) -- the regex cuts words,
  ByteLevel only maps bytes to characters; the decoder is ByteLevel;
- special tokens: `added_tokens` with their ids (special, never normalized or stripped), so both sides
  cut them out of the text before BPE.
Char tokenizers become a WordLevel model over single characters, with a pre-tokenizer that makes every
character its own word and a Fuse decoder (join without spaces). A character outside the vocabulary is an
error on both sides (ours raises ValueError; tokenizers finds no unk token).
"""

from __future__ import annotations

from typing import Any

from diyllm.errors import UserError
from diyllm.tokenizers import BPETokenizer, CharTokenizer
from diyllm.tokenizers.gpt2_bytes import decode_token, encode_token
from diyllm.tokenizers.pretokenize import GPT2_PATTERN

EOT = "<|endoftext|>"
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
# One match per character, newline included (Oniguruma's "." skips "\n" unless in multiline mode).
EVERY_CHAR_REGEX = r"[\s\S]"
# A unk token that is not in the vocabulary: encoding an unknown character fails loudly, as ours does.
_CHAR_UNK = "<unk>"


# ---------------------------------------------------------------------------------------------- export
def _added_token(token_id: int, content: str) -> dict[str, Any]:
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}


def _byte_level(use_regex: bool) -> dict[str, Any]:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


def to_hf_tokenizer_json(tok: BPETokenizer | CharTokenizer) -> dict[str, Any]:
    """The `tokenizer.json` dict equivalent to `tok` (same ids for every text, special tokens included)."""
    if isinstance(tok, CharTokenizer):
        return _char_to_hf(tok)
    if not isinstance(tok, BPETokenizer):
        raise UserError(f"cannot export a tokenizer of type {type(tok).__name__} to the Hugging Face format")
    special_ids = {tok.special_token_id(s): s for s in tok.special_tokens}
    vocab: dict[str, int] = {}
    for i in sorted(tok.vocab):
        if i not in special_ids:
            vocab.setdefault(encode_token(tok.vocab[i]), i)  # duplicates: the lowest id wins, as in our encoder
    # Special tokens also go into the model's vocab (as GPT-2's file has them): `tokenizers` gives an added
    # token the id the model knows for its text, and otherwise the next free id, ignoring the id written
    # in added_tokens -- which would renumber them whenever our ids have a gap.
    for i, s in special_ids.items():
        vocab[s] = i
    merges = [f"{encode_token(a)} {encode_token(b)}" for a, b in tok.merges]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [_added_token(i, s) for i, s in sorted(special_ids.items())],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": tok.pattern}, "behavior": "Isolated", "invert": False},
                _byte_level(use_regex=False),
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": vocab, "merges": merges,
        },
    }


def _char_to_hf(tok: CharTokenizer) -> dict[str, Any]:
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": EVERY_CHAR_REGEX}, "behavior": "Isolated",
                          "invert": False},
        "post_processor": None,
        "decoder": {"type": "Fuse"},
        "model": {"type": "WordLevel", "vocab": {c: i for i, c in enumerate(tok.chars)}, "unk_token": _CHAR_UNK},
    }


def has_chat_tokens(tok: Any) -> bool:
    """True when the tokenizer knows the SFT chat markers (<|im_start|>, <|im_end|>) as special tokens."""
    return all(t in getattr(tok, "special_tokens", ()) for t in CHAT_TOKENS)


def to_hf_tokenizer_config(
    tok: BPETokenizer | CharTokenizer, model_max_length: int, chat_template: str | None = None
) -> dict[str, Any]:
    """tokenizer_config.json: lets AutoTokenizer build a PreTrainedTokenizerFast around tokenizer.json."""
    eot = EOT if EOT in getattr(tok, "special_tokens", ()) else None
    cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eot,
        "eos_token": eot,
        "pad_token": eot,
        "unk_token": None,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,  # decode must return exactly the text, as ours does
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
    }
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    return cfg


# ---------------------------------------------------------------------------------------------- import
def from_hf_tokenizer_json(data: dict[str, Any], where: str = "tokenizer.json") -> tuple[BPETokenizer | CharTokenizer,
                                                                                        list[str]]:
    """Our tokenizer for a `tokenizer.json` dict, plus notes about behaviour that could not be carried over.

    Supported: byte-level BPE (GPT-2 / Llama 3 / Qwen style) and the WordLevel char tokenizer written by
    `to_hf_tokenizer_json`. Anything else (SentencePiece-style BPE with a normalizer or byte fallback,
    WordPiece, Unigram) raises UserError naming the field.
    """
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise UserError(f"{where}: not a Hugging Face tokenizers file (no 'model' object)")
    kind = data["model"].get("type")
    if kind == "WordLevel":
        return _char_from_hf(data, where), []
    if kind != "BPE":
        raise UserError(
            f"{where}: model.type={kind!r} is not supported (only byte-level BPE and diyllm's char WordLevel)"
        )
    model = data["model"]
    if data.get("normalizer") is not None:
        raise UserError(
            f"{where}: normalizer={data['normalizer'].get('type')!r} is not supported; diyllm's byte-level BPE "
            "does not normalize text (SentencePiece-style tokenizers such as Llama 2's cannot be converted)"
        )
    if model.get("byte_fallback"):
        raise UserError(f"{where}: model.byte_fallback=true (SentencePiece-style BPE) is not supported")
    for field in ("continuing_subword_prefix", "end_of_word_suffix", "dropout"):
        if model.get(field):
            raise UserError(f"{where}: model.{field}={model[field]!r} is not supported by diyllm's BPE")
    pattern = _pattern_from_pre_tokenizer(data.get("pre_tokenizer"), where)
    decoder = data.get("decoder")
    if not isinstance(decoder, dict) or decoder.get("type") != "ByteLevel":
        raise UserError(f"{where}: decoder must be ByteLevel for a byte-level BPE, got {decoder!r}")

    specials: dict[int, str] = {}
    for entry in data.get("added_tokens") or []:
        specials[int(entry["id"])] = entry["content"]
    vocab: dict[int, bytes] = {i: s.encode("utf-8") for i, s in specials.items()}
    try:
        for token, i in model["vocab"].items():
            if int(i) not in specials:
                vocab[int(i)] = decode_token(token)
        merges = [_split_merge(m) for m in model.get("merges", [])]
        merges_bytes = [(decode_token(a), decode_token(b)) for a, b in merges]
    except KeyError as exc:
        raise UserError(f"{where}: token with character {exc.args[0]!r} is outside the byte-level alphabet; "
                        "this is not a byte-level BPE") from None
    tok = BPETokenizer(vocab, merges_bytes, [specials[i] for i in sorted(specials)], pattern)
    notes = []
    post = data.get("post_processor")
    if post is not None and post.get("type") not in ("ByteLevel",):
        notes.append(f"{where}: post_processor {post.get('type')!r} (e.g. adding a BOS token) is not reproduced; "
                     "diyllm's encode adds no tokens")
    return tok, notes


def _split_merge(merge: Any) -> tuple[str, str]:
    if isinstance(merge, str):
        a, _, b = merge.partition(" ")
        return a, b
    a, b = merge
    return a, b


def _pattern_from_pre_tokenizer(pre: Any, where: str) -> str:
    """Our pre-tokenizer regex from ByteLevel(use_regex=True) or Sequence[Split(regex), ByteLevel]."""
    if not isinstance(pre, dict):
        raise UserError(f"{where}: pre_tokenizer {pre!r} is not supported (need a ByteLevel pre-tokenizer)")
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    pattern = None
    for i, step in enumerate(steps):
        last = i == len(steps) - 1
        if step.get("type") == "ByteLevel" and last:
            if step.get("add_prefix_space"):
                raise UserError(f"{where}: pre_tokenizer ByteLevel.add_prefix_space=true is not supported")
            if step.get("use_regex", True):
                if pattern is not None:
                    raise UserError(f"{where}: pre_tokenizer splits twice (Split and ByteLevel.use_regex=true)")
                pattern = GPT2_PATTERN
            if pattern is None:
                raise UserError(f"{where}: pre_tokenizer ByteLevel(use_regex=false) without a Split before it")
            return pattern
        if step.get("type") == "Split" and pattern is None and step.get("behavior") == "Isolated" \
                and not step.get("invert") and "Regex" in (step.get("pattern") or {}):
            pattern = step["pattern"]["Regex"]
            continue
        raise UserError(f"{where}: pre_tokenizer step {step.get('type')!r} ({step}) is not supported; expected "
                        "Split(regex, Isolated) followed by ByteLevel, or ByteLevel alone")
    raise UserError(f"{where}: pre_tokenizer has no ByteLevel step; this is not a byte-level BPE")


def _char_from_hf(data: dict[str, Any], where: str) -> CharTokenizer:
    vocab = data["model"].get("vocab") or {}
    chars = sorted(vocab, key=lambda c: vocab[c])
    pre = data.get("pre_tokenizer") or {}
    ids_in_order = [vocab[c] for c in chars] == list(range(len(chars)))
    if (any(len(c) != 1 for c in chars) or chars != sorted(chars) or not ids_in_order
            or (pre.get("pattern") or {}).get("Regex") != EVERY_CHAR_REGEX):
        raise UserError(f"{where}: only diyllm's own character-level WordLevel tokenizer can be imported "
                        "(single characters with ids in code-point order, split per character)")
    return CharTokenizer(chars)
