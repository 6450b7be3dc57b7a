"""GGUF export: every tensor and metadata key read back with gguf.GGUFReader (llama.cpp's own reader), the
RoPE row layout against llama.cpp's converter, the char tokenizer, and the Ollama Modelfile."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diyllm.data.chat_template import CHAT_TEMPLATE_JINJA, add_chat_tokens
from diyllm.model import DIYConfig, DIYForCausalLM
from diyllm.training.checkpoint import save_checkpoint

gguf = pytest.importorskip("gguf", reason="the gguf package (gguf extra) is not installed")


def _bpe_tokenizer():
    from diyllm.tokenizers import BPETokenizer

    vocab = {i: bytes([i]) for i in range(256)}
    merges = [(b"t", b"h"), (b"th", b"e"), (b" ", b"the")]
    for i, (a, b) in enumerate(merges):
        vocab[256 + i] = a + b
    tok = BPETokenizer(vocab, merges, special_tokens=["<|endoftext|>"])
    add_chat_tokens(tok)
    return tok


def _checkpoint(tmp_path, tokenizer, tie: bool, vocab_size: int, d_model: int = 64):
    torch.manual_seed(0)
    cfg = DIYConfig(vocab_size=vocab_size, context_length=128, d_model=d_model, num_layers=2, num_heads=4,
                    num_kv_heads=2, d_ff=96, tie_embeddings=tie, rope_theta=5000.0, norm_eps=1e-6)
    model = DIYForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # norms are not all ones: a mix-up of tensors would show
    (tmp_path / "tok.json").write_text("")
    tokenizer.save(tmp_path / "tok.json")
    path = tmp_path / "model.pt"
    save_checkpoint(model, None, 0, path, model_config=cfg.to_dict(), tokenizer=(tmp_path / "tok.json").read_text())
    return model, path


def _fields(reader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items()}


def _permute_like_llama_cpp(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf turns HF's halves rows back into interleaved pairs this way."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("tie", [False, True])
def test_f32_export_reads_back_with_every_tensor_and_metadata_key(tmp_path, tie):
    from diyllm.interop.gguf_export import export_gguf

    tok = _bpe_tokenizer()
    model, ckpt = _checkpoint(tmp_path, tok, tie, vocab_size=265)  # 262 tokens, 3 padding rows
    out = export_gguf(ckpt, tmp_path / "m.gguf", dtype="f32")
    reader = gguf.GGUFReader(out)
    f = _fields(reader)
    cfg = model.config
    expected = {
        "general.architecture": "llama", "llama.context_length": 128, "llama.embedding_length": 64,
        "llama.block_count": 2, "llama.feed_forward_length": 96, "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2, "llama.rope.freq_base": 5000.0, "llama.rope.dimension_count": 16,
        "llama.attention.layer_norm_rms_epsilon": pytest.approx(1e-6), "llama.vocab_size": 265,
        "general.file_type": 0, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.bos_token_id": tok.eot_id, "tokenizer.ggml.eos_token_id": tok.special_token_id("<|im_end|>"),
        "tokenizer.ggml.eot_token_id": tok.special_token_id("<|im_end|>"), "tokenizer.ggml.add_bos_token": False,
        "tokenizer.ggml.add_eos_token": False, "tokenizer.chat_template": CHAT_TEMPLATE_JINJA,
        "tokenizer.ggml.merges": ["t h", "th e", "Ġ the"],
    }
    for key, value in expected.items():
        assert f[key] == value, key
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == 265
    assert tokens[ord("A")] == "A" and tokens[ord(" ")] == "Ġ" and tokens[258] == "Ġthe"
    assert tokens[256:262] == ["th", "the", "Ġthe", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert tokens[tok.eot_id] == "<|endoftext|>" and types[tok.eot_id] == 3 and types[ord("A")] == 1
    assert tokens[262:] == ["[PAD262]", "[PAD263]", "[PAD264]"] and types[262:] == [5, 5, 5]
    assert set(f) - set(expected) <= {"tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "general.name",
                                      "GGUF.version", "GGUF.tensor_count", "GGUF.kv_count", "general.alignment"}

    state = model.state_dict()
    want = {"token_embd.weight": state["token_embeddings.weight"], "output_norm.weight": state["ln_final.weight"]}
    if not tie:
        want["output.weight"] = state["lm_head.weight"]
    for i in range(cfg.num_layers):
        for ours, theirs in [("ln1", "attn_norm"), ("attn.q_proj", "attn_q"), ("attn.k_proj", "attn_k"),
                             ("attn.v_proj", "attn_v"), ("attn.output_proj", "attn_output"), ("ln2", "ffn_norm"),
                             ("ffn.w1", "ffn_gate"), ("ffn.w3", "ffn_up"), ("ffn.w2", "ffn_down")]:
            want[f"blk.{i}.{theirs}.weight"] = state[f"layers.{i}.{ours}.weight"]
    got = {t.name: t for t in reader.tensors}
    assert set(got) == set(want)
    for name, t in got.items():
        ref = want[name].numpy()
        assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
        assert list(t.shape) == list(reversed(ref.shape)), name  # GGUF lists dimensions innermost first
        np.testing.assert_array_equal(np.asarray(t.data).reshape(ref.shape), ref, err_msg=name)


def test_rope_rows_are_what_llama_cpp_makes_of_the_hf_export():
    from diyllm.interop.hf_model import interleaved_to_halves

    w = torch.randn(4 * 16, 64)
    torch.testing.assert_close(_permute_like_llama_cpp(interleaved_to_halves(w, 4, 16), 4), w, rtol=0, atol=0)


def test_f16_and_q8_0_are_the_weights_within_their_rounding(tmp_path):
    from diyllm.interop.gguf_export import export_gguf

    model, ckpt = _checkpoint(tmp_path, _bpe_tokenizer(), tie=False, vocab_size=262)
    state = model.state_dict()
    for dtype, file_type in (("f16", 1), ("q8_0", 7)):
        reader = gguf.GGUFReader(export_gguf(ckpt, tmp_path / f"{dtype}.gguf", dtype=dtype))
        assert _fields(reader)["general.file_type"] == file_type
        tensors = {t.name: t for t in reader.tensors}
        norm = tensors["blk.0.attn_norm.weight"]
        assert norm.tensor_type == gguf.GGMLQuantizationType.F32  # 1-D tensors stay f32
        np.testing.assert_array_equal(np.asarray(norm.data), state["layers.0.ln1.weight"].numpy())
        q = tensors["blk.1.ffn_down.weight"]  # rows of 96: a multiple of 32
        ref = state["layers.1.ffn.w2.weight"].numpy()
        if dtype == "f16":
            assert q.tensor_type == gguf.GGMLQuantizationType.F16
            np.testing.assert_array_equal(np.asarray(q.data).reshape(ref.shape), ref.astype(np.float16))
        else:
            assert q.tensor_type == gguf.GGMLQuantizationType.Q8_0
            back = gguf.quants.dequantize(np.asarray(q.data), q.tensor_type).reshape(ref.shape)
            scale = np.abs(ref.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
            error = np.abs(back.reshape(-1, 32) - ref.reshape(-1, 32))
            assert (error <= scale * 0.57).all()  # half a step, plus the rounding of the f16 scale


def test_char_tokenizer_gets_one_token_per_character_and_merges_for_multibyte_ones(tmp_path):
    from diyllm.interop.gguf_export import export_gguf
    from diyllm.tokenizers import CharTokenizer

    tok = CharTokenizer("ab é€\n")
    _, ckpt = _checkpoint(tmp_path, tok, tie=True, vocab_size=tok.vocab_size)
    f = _fields(gguf.GGUFReader(export_gguf(ckpt, tmp_path / "c.gguf")))
    from diyllm.tokenizers.gpt2_bytes import encode_token

    assert f["tokenizer.ggml.tokens"] == [encode_token(c.encode()) for c in tok.chars]
    e_acute, euro = "é".encode(), "€".encode()
    assert f["tokenizer.ggml.merges"] == [f"{encode_token(e_acute[:1])} {encode_token(e_acute[1:])}",
                                          f"{encode_token(euro[:1])} {encode_token(euro[1:2])}",
                                          f"{encode_token(euro[:2])} {encode_token(euro[2:])}"]
    assert "tokenizer.chat_template" not in f and "tokenizer.ggml.bos_token_id" not in f


def test_cli_gguf_and_ollama_modelfile_and_refusals(tmp_path, capsys):
    from diyllm.cli import main

    _, ckpt = _checkpoint(tmp_path, _bpe_tokenizer(), tie=False, vocab_size=262)
    out = tmp_path / "ollama" / "model.gguf"
    assert main(["export", "--format", "ollama", "--ckpt", str(ckpt), "--out", str(out), "--dtype", "q8_0"]) == 0
    modelfile = (out.parent / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model.gguf\n") and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "<|im_start|>{{ .Role }}" in modelfile and "PARAMETER num_ctx 128" in modelfile
    assert _fields(gguf.GGUFReader(out))["general.file_type"] == 7
    assert main(["export", "--format", "gguf", "--ckpt", str(ckpt), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", "--format", "gguf", "--ckpt", str(ckpt), "--out", str(out), "--dtype", "bfloat16"]) == 2
    assert "GGUF takes f32, f16 or q8_0" in capsys.readouterr().err
    assert main(["export", "--format", "gguf", "--ckpt", str(ckpt), "--out", str(out), "--overwrite"]) == 0
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]  # nothing half-written left


def test_llama_cpp_greedy_and_logits_match_when_llama_cpp_python_is_installed(tmp_path):
    """Optional (llama-cpp-python compiles llama.cpp, so CI does not install it)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (optional)")
    from diyllm.generation.generate import generate
    from diyllm.interop.gguf_export import export_gguf

    tok = _bpe_tokenizer()
    model, ckpt = _checkpoint(tmp_path, tok, tie=False, vocab_size=262)
    with torch.no_grad():
        model.lm_head.weight.mul_(10)  # sharp logits: no greedy near-ties
    save_checkpoint(model, None, 0, ckpt, model_config=model.config.to_dict(),
                    tokenizer=(tmp_path / "tok.json").read_text())
    out = export_gguf(ckpt, tmp_path / "m.gguf", dtype="f32")
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=128, logits_all=True, verbose=False)
    prompt = tok.encode("the cat")
    ours = generate(model, prompt, 32, temperature=0)[0]
    theirs = []
    for t in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        theirs.append(t)
        if len(theirs) == 32:
            break
    assert theirs == ours
    llm.reset()
    llm.eval(prompt)
    logits = torch.tensor(np.asarray(llm.scores[len(prompt) - 1]))
    torch.testing.assert_close(logits, model(torch.tensor([prompt])).logits[0, -1], atol=1e-3, rtol=1e-3)
