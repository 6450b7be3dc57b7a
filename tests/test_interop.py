"""Hugging Face Llama interop: weights and config (export, import, round trips, bad inputs).

transformers is a test-only dependency: it is imported once here, never by diyllm itself.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

import pytest
import torch

from diyllm.errors import UserError
from diyllm.interop.hf import export_hf, hf_checkpoint_dict, import_hf, load_hf_model
from diyllm.interop.hf_model import halves_to_interleaved, interleaved_to_halves
from diyllm.model import DIYConfig, DIYForCausalLM
from diyllm.model.rope import RotaryEmbedding, apply_rotary
from diyllm.training.checkpoint import load_model, read_checkpoint, save_checkpoint

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

transformers.logging.set_verbosity_error()
with contextlib.suppress(AttributeError):  # no weight-loading progress bars in the test output
    transformers.utils.logging.disable_progress_bar()


def _diy_model(num_kv_heads: int, tie: bool, vocab_size: int = 97) -> DIYForCausalLM:
    cfg = DIYConfig(vocab_size=vocab_size, context_length=48, d_model=64, num_layers=2, num_heads=4,
                    num_kv_heads=num_kv_heads, d_ff=96, rope_theta=500.0, norm_eps=1e-5, tie_embeddings=tie)
    model = DIYForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norm gains, so a swapped norm would show
        for name, p in model.named_parameters():
            if name.endswith(("ln1.weight", "ln2.weight", "ln_final.weight")):
                p.uniform_(0.5, 1.5)
    return model


def _hf_llama(tmp_path: Path, tie: bool = False, **save_kw) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64,
                      rms_norm_eps=1e-5, tie_word_embeddings=tie, rope_theta=2000.0)
    torch.manual_seed(1)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path, **save_kw)
    return model


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


# ---------------------------------------------------------------------------------------------- RoPE layout
def test_rope_row_permutation_turns_interleaved_into_halves_rotation():
    """Permuting the rows of q turns diyllm's pair rotation into transformers' half rotation, exactly."""
    heads, head_dim, T = 3, 8, 5
    x = torch.randn(heads * head_dim, 4)  # (rows, d_in): a q_proj weight
    assert torch.equal(halves_to_interleaved(interleaved_to_halves(x, heads, head_dim), heads, head_dim), x)
    rope = RotaryEmbedding(10000.0, head_dim, T)
    cos, sin = rope.cos_sin(None, T)  # (T, head_dim/2)
    inp = torch.randn(T, 4)
    q_diy = (inp @ x.t()).view(T, heads, head_dim).transpose(0, 1)  # (heads, T, D)
    rotated_diy = apply_rotary(q_diy, cos, sin)
    q_hf = (inp @ interleaved_to_halves(x, heads, head_dim).t()).view(T, heads, head_dim).transpose(0, 1)
    c, s = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)  # transformers' rotate_half formulation
    rotate_half = torch.cat([-q_hf[..., head_dim // 2:], q_hf[..., : head_dim // 2]], -1)
    rotated_hf = q_hf * c + rotate_half * s
    perm = torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])
    torch.testing.assert_close(rotated_hf, rotated_diy[..., perm])


# ---------------------------------------------------------------------------------------------- export
@pytest.mark.parametrize(("num_kv_heads", "tie"), [(4, False), (2, True), (1, False)])
def test_export_loads_in_transformers_with_same_logits_and_greedy_tokens(tmp_path, num_kv_heads, tie):
    from diyllm.generation.generate import generate

    model = _diy_model(num_kv_heads, tie)
    out = export_hf(model, tmp_path / "hf")

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert (config["num_key_value_heads"], config["tie_word_embeddings"], config["head_dim"]) == (num_kv_heads, tie, 16)
    assert config["hidden_act"] == "silu" and config["attention_bias"] is False and config["mlp_bias"] is False
    with safe_open(out / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
    assert ("lm_head.weight" in keys) is (not tie)  # a tied matrix is stored once, as transformers does
    assert "model.layers.1.self_attn.o_proj.weight" in keys and len(keys) == 2 * 9 + 2 + (not tie)

    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.config.tie_word_embeddings is tie and hf.config.rms_norm_eps == 1e-5
    ids = torch.randint(0, 97, (3, 40))
    torch.testing.assert_close(_logits(hf, ids), _logits(model, ids), atol=1e-4, rtol=0)

    prompt = ids[0, :7]
    n_new = 12
    ours = generate(model, prompt.tolist(), n_new, temperature=0.0)[0]
    theirs = hf.generate(prompt[None], max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                         pad_token_id=0)[0, 7:].tolist()
    assert theirs == ours and len(ours) == n_new


def test_export_dtype_and_refuses_non_empty_folder(tmp_path):
    model = _diy_model(2, False)
    out = export_hf(model, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.randint(0, 97, (1, 16))
    # bf16 keeps ~3 significant digits: the function is the same up to that rounding
    assert (_logits(hf, ids) - _logits(model, ids)).abs().max() < 0.1
    with pytest.raises(UserError, match="not empty"):
        export_hf(model, out)
    export_hf(model, out, overwrite=True)  # replaced atomically
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"


def test_export_cli_from_checkpoint(tmp_path, capsys):
    from diyllm.cli import main

    model = _diy_model(2, True)
    ckpt = tmp_path / "run" / "best.pt"
    save_checkpoint(model, None, 7, ckpt, model_config=model.config.to_dict())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = main(["export", "--ckpt", str(ckpt.parent), "--out", str(tmp_path / "hf"), "--format", "hf"])
    assert rc == 0
    assert any("no tokenizer" in str(w.message) for w in caught)
    assert "exported" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors"]
    assert main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "hf")]) == 2  # exists, no --overwrite


# ---------------------------------------------------------------------------------------------- import
@pytest.mark.parametrize("tie", [False, True])
def test_import_transformers_model_same_logits(tmp_path, tie):
    hf = _hf_llama(tmp_path, tie=tie)
    model, tokenizer = load_hf_model(tmp_path)
    assert tokenizer is None
    assert model.config.num_kv_heads == 2 and model.config.rope_theta == 2000.0
    assert model.config.tie_embeddings is tie
    if tie:
        assert model.lm_head.weight is model.token_embeddings.weight
    ids = torch.randint(0, 101, (2, 50))
    torch.testing.assert_close(_logits(model, ids), _logits(hf, ids), atol=1e-4, rtol=0)


def test_import_sharded_checkpoint_then_load_model(tmp_path):
    src = tmp_path / "sharded"
    hf = _hf_llama(src, max_shard_size="40KB")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2  # really sharded
    summary = import_hf(src, tmp_path / "imported.pt")
    ckpt = read_checkpoint(tmp_path / "imported.pt")
    assert ckpt["iteration"] == 0 and ckpt["model_config"]["num_heads"] == 8 and ckpt["tokenizer"] is None
    assert summary["num_params"] == sum(p.numel() for p in hf.parameters())
    model, tok, _ = load_model(tmp_path / "imported.pt")
    ids = torch.randint(0, 101, (2, 33))
    torch.testing.assert_close(_logits(model, ids), _logits(hf, ids), atol=1e-4, rtol=0)
    with pytest.raises(UserError, match="exists"):
        import_hf(src, tmp_path / "imported.pt")


def test_export_then_import_is_exact(tmp_path):
    model = _diy_model(2, False)
    export_hf(model, tmp_path / "hf")
    back, _ = load_hf_model(tmp_path / "hf")
    assert back.config == model.config
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    # the in-memory checkpoint dict (for init_from=hf:DIR) loads like a .pt checkpoint
    ckpt = hf_checkpoint_dict(tmp_path / "hf")
    assert ckpt["iteration"] == 0 and DIYConfig.from_dict(ckpt["model_config"]) == model.config
    fresh = DIYForCausalLM(DIYConfig.from_dict(ckpt["model_config"]))
    fresh.load_state_dict(ckpt["model"])
    assert all(torch.equal(fresh.state_dict()[k], ours[k]) for k in ours)


def test_import_cli(tmp_path, capsys):
    from diyllm.cli import main

    _hf_llama(tmp_path / "hf")
    args = ["import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "x.pt"), "--context_length", "32"]
    assert main(args) == 0
    out = capsys.readouterr()
    assert "imported" in out.out and "no tokenizer.json" in out.err
    assert read_checkpoint(tmp_path / "x.pt")["model_config"]["context_length"] == 32


# ---------------------------------------------------------------------------------------------- bad inputs
def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hf_src")
    _hf_llama(folder)
    return folder


@pytest.mark.parametrize(("changes", "field"), [
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_type"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "rope_parameters"),
    ({"model_type": "mistral"}, "model_type"),
    ({"architectures": ["LlamaModel"]}, "architectures"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"head_dim": 16}, "head_dim"),
    ({"num_attention_heads": 6}, "num_attention_heads"),
])
def test_import_refuses_unsupported_configs_naming_the_field(tmp_path, hf_folder, changes, field):
    folder = tmp_path / "m"
    folder.mkdir()
    for f in hf_folder.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    _edit_config(folder, **changes)
    with pytest.raises(UserError, match=field):
        load_hf_model(folder)


def test_import_corrupt_inputs_name_the_file(tmp_path, hf_folder):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="config.json"):
        load_hf_model(empty)

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "config.json").write_bytes((hf_folder / "config.json").read_bytes())
    data = (hf_folder / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="model.safetensors"):
        load_hf_model(truncated)

    (truncated / "model.safetensors").write_bytes(data)
    (truncated / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="config.json"):
        load_hf_model(truncated)

    sharded = tmp_path / "sharded"
    _hf_llama(sharded, max_shard_size="40KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    shards[1].unlink()
    with pytest.raises(UserError, match=f"{shards[1].name}.*missing"):
        load_hf_model(sharded)


def test_import_missing_tensor_and_wrong_shape(tmp_path, hf_folder):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_bytes((hf_folder / "config.json").read_bytes())
    tensors = load_file(hf_folder / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="lm_head.weight"):
        load_hf_model(folder)
    _edit_config(folder, intermediate_size=96)
    with pytest.raises(UserError, match="shape"):
        load_hf_model(folder)


def test_pickled_weights_are_never_executed(tmp_path, hf_folder):
    """An old-style pytorch_model.bin is read with weights_only=True: a pickle with code is refused."""
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_bytes((hf_folder / "config.json").read_bytes())
    marker = tmp_path / "pwned"
    torch.save({"x": _Evil(str(marker))}, folder / "pytorch_model.bin")
    with pytest.raises(UserError, match="pytorch_model.bin"):
        load_hf_model(folder)
    assert not marker.exists()


class _Evil:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))
