"""SFT conversations from Parquet, compressed JSONL and the Hub (MiniMind's SFT file through a fake cache)."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
from test_prepare_shards import _fake_hub  # the fake Hugging Face cache layout, shared

from diyllm.data.chat_template import add_chat_tokens
from diyllm.data.sft import SFTSource, read_split_conversations
from diyllm.errors import UserError
from diyllm.training.config import TrainConfig

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
zstd = pytest.importorskip("zstandard")

pytestmark = pytest.mark.usefixtures("one_thread")

MINIMIND = "jingyaogong/minimind_dataset"


def _convs(n: int) -> list[list[dict]]:
    out = []
    for i in range(n):
        conv = [{"role": "user", "content": f"what is {i} + {i}?"}, {"role": "assistant", "content": str(2 * i)}]
        if i % 3 == 0:
            conv = [{"role": "system", "content": "Answer with a number."}, *conv,
                    {"role": "user", "content": "and doubled?"}, {"role": "assistant", "content": str(4 * i)}]
        out.append(conv)
    return out


def _jsonl(convs, key="conversations") -> bytes:
    return "".join(json.dumps({key: c}, ensure_ascii=False) + "\n" for c in convs).encode()


def _tokenizer_file(tmp_path):
    from diyllm.tokenizers import BPETokenizer

    tok = BPETokenizer({i: bytes([i]) for i in range(256)}, [], special_tokens=["<|endoftext|>"])
    add_chat_tokens(tok)
    tok.save(tmp_path / "tok.json")
    return tmp_path / "tok.json"


def _rows(data, tok, **kw):
    cfg = TrainConfig(data_dir=str(data), tokenizer_path=str(tok), context_length=64, data_format="sft", **kw)
    src = SFTSource.from_config(cfg)
    return {s: r.padded(range(len(r))) for s, r in src.rows.items()}


def test_parquet_and_compressed_jsonl_give_the_same_rows_as_jsonl(tmp_path):
    convs = _convs(300)
    (tmp_path / "chats.jsonl").write_bytes(_jsonl(convs))
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "chats.jsonl.zst").write_bytes(zstd.ZstdCompressor().compress(_jsonl(convs)))
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "chats.jsonl.gz").write_bytes(gzip.compress(_jsonl(convs)))
    (tmp_path / "p").mkdir()
    # the conversations column is a list<struct<role, content>> column; several row groups
    pq.write_table(pa.table({"id": list(range(300)), "conversations": convs}), tmp_path / "p" / "chats.parquet",
                   row_group_size=70)
    (tmp_path / "m").mkdir()  # another column name, and the messages stored as JSON text
    pq.write_table(pa.table({"messages": [json.dumps(c) for c in convs]}), tmp_path / "m" / "chats.parquet")
    tok = _tokenizer_file(tmp_path)

    ref = read_split_conversations(tmp_path / "chats.jsonl")
    assert len(ref["val"]) > 0 and len(ref["train"]) + len(ref["val"]) == 300 and ref["train"][0] == convs[0]
    for spec in (tmp_path / "z", tmp_path / "g" / "chats.jsonl.gz", tmp_path / "p", str(tmp_path / "p" / "*.parquet")):
        assert read_split_conversations(spec) == ref, spec  # same conversations, same (file stem, row) split
    assert read_split_conversations(tmp_path / "m", field="messages") == ref

    expected = _rows(tmp_path / "chats.jsonl", tok)
    for data, kw in ((tmp_path / "p" / "chats.parquet", {}), (tmp_path / "z", {}),
                     (tmp_path / "m", {"conversations_field": "messages"})):
        got = _rows(data, tok, **kw)
        for split in ("train", "val"):
            for a, b in zip(expected[split], got[split]):
                np.testing.assert_array_equal(a, b)


def test_parquet_without_the_conversations_column_names_file_and_columns(tmp_path):
    pq.write_table(pa.table({"id": [1], "messages": [json.dumps(_convs(1)[0])]}), tmp_path / "c.parquet")
    with pytest.raises(UserError, match=r"c\.parquet has no column 'conversations'; its columns are "
                                        r"\['id', 'messages'\]: pick one with --conversations_field"):
        read_split_conversations(tmp_path / "c.parquet")
    bad = [[{"role": "bot", "content": "x"}]]
    pq.write_table(pa.table({"conversations": _convs(2) + bad}), tmp_path / "d.parquet")
    with pytest.raises(UserError, match=r"d\.parquet:row 3: message 0 has role 'bot'"):
        read_split_conversations(tmp_path / "d.parquet")
    (tmp_path / "e.jsonl.zst").write_bytes(zstd.ZstdCompressor().compress(b'{"text": "no chat"}\n'))
    with pytest.raises(UserError, match=r'e\.jsonl\.zst:1: .*"conversations" field.*--conversations_field'):
        read_split_conversations(tmp_path / "e.jsonl.zst")


def test_minimind_sft_config_resolves_through_the_hub_cache_offline_and_online(tmp_path, monkeypatch):
    import huggingface_hub as hf
    from huggingface_hub import constants

    from diyllm.training.config import load_config

    convs = _convs(120)
    snap = _fake_hub(tmp_path / "hub", MINIMIND, {"sft_mini_512.jsonl": _jsonl(convs),
                                                  "pretrain_hq.jsonl": b'{"text": "x"}\n', "README.md": b"#"})
    data_dir = load_config("sft_minimind").data_dir  # the shipped config names the Hub file
    assert data_dir == f"hf:{MINIMIND}/sft_mini_512.jsonl"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    got = read_split_conversations(data_dir)
    assert got == read_split_conversations(snap / "sft_mini_512.jsonl")  # same file, same split
    assert len(got["train"]) + len(got["val"]) == 120

    # online: the real huggingface_hub calls, the network replaced at list_repo_files / hf_hub_download
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf.HfApi, "list_repo_files", lambda self, repo, repo_type=None:
                        ["README.md", "pretrain_hq.jsonl", "sft_mini_512.jsonl"] if repo == MINIMIND else [])
    fetched = []
    monkeypatch.setattr(hf, "hf_hub_download", lambda repo, name, repo_type=None: fetched.append((repo, name))
                        or str(snap / name))
    assert read_split_conversations(data_dir) == got and fetched == [(MINIMIND, "sft_mini_512.jsonl")]

    # offline with an empty cache: one clear line on how to point at local copies
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(UserError, match="HF_HUB_OFFLINE=1, or pass the local files"):
        read_split_conversations(data_dir)


def test_sft_command_trains_on_a_hub_source_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from diyllm.cli import main
    from diyllm.model import DIYConfig, DIYForCausalLM
    from diyllm.tokenizers import BPETokenizer
    from diyllm.training.checkpoint import save_checkpoint

    tok = BPETokenizer({i: bytes([i]) for i in range(256)}, [], special_tokens=["<|endoftext|>"])
    tok.save(tmp_path / "base_tok.json")
    model = DIYForCausalLM(DIYConfig(vocab_size=257, context_length=64, d_model=32, num_layers=1, num_heads=2))
    save_checkpoint(model, None, 0, tmp_path / "pre.pt", model_config=model.config.to_dict(),
                    tokenizer=(tmp_path / "base_tok.json").read_text())
    _fake_hub(tmp_path / "hub", MINIMIND, {"sft_mini_512.jsonl": _jsonl(_convs(120))})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    args = ["sft", "sft_minimind", f"--init_from={tmp_path / 'pre.pt'}", "--device=cpu", "--batch_size=4",
            "--max_iters=2", "--eval_interval=2", "--eval_iters=1", "--warmup_iters=0", "--progress=false",
            "--compile=false", "--dtype=float32", f"--out_dir={tmp_path / 'sft'}"]
    assert main(args) == 0
    assert (tmp_path / "sft" / "latest.pt").exists()


def test_packed_rows_are_the_plain_padded_rows_and_a_fraction_of_their_bytes(tmp_path):
    """SFTSource keeps conversations packed (diyllm/data/packed_rows.py) and pads them per batch; every row
    it builds must equal encode_rows' plain layout (truncation, padding, dropped conversations alike)."""
    from diyllm.data.chat_template import encode_chat
    from diyllm.data.packed_rows import PackedRows
    from diyllm.data.sft import encode_rows
    from diyllm.tokenizers import load_tokenizer

    tok = load_tokenizer(_tokenizer_file(tmp_path))
    convs = _convs(120)
    convs[5] = [{"role": "user", "content": "q" * 300}, {"role": "assistant", "content": "cut off"}]  # dropped
    T = 48  # shorter than many conversations: rows are truncated at T + 1 tokens
    x, y, m, dropped = encode_rows(tok, convs, T)
    packed = PackedRows(T, tok.vocab_size)
    kept = [packed.add(*encode_chat(tok, c)) for c in convs]
    packed.finish()
    assert dropped == packed.dropped >= 1 and kept[5] is False and len(packed) == len(x)
    assert packed.ids.dtype == np.uint16 and packed.trained_tokens == int(m.sum())
    order = np.random.default_rng(0).permutation(len(x))[:37]
    for a, b in zip((x[order], y[order], m[order]), packed.padded(order), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    assert packed.ids.nbytes + packed.mask.nbytes + packed.offsets.nbytes < (x.nbytes + y.nbytes + m.nbytes) / 4
