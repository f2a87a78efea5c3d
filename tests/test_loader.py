"""Config reading and the checkpoint loader: both release layouts, shards, dtypes, and clear failures."""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil

import numpy as np
import pytest

from model.config import ConfigError, JanusConfig, expected_hf_shapes
from model.loader import CheckpointError, _fused_columns, load_model
import checkpoints
from checkpoints import GOLDEN


@pytest.fixture(scope="module")
def reference():
    return load_model(GOLDEN)


@pytest.fixture(scope="module")
def cases():
    with np.load(GOLDEN / "cases.npz") as data:
        return {name: data[name] for name in ("understanding.conv1.inputs_embeds", "understanding.conv1.prefill_logits")}


def parameters(model) -> dict[str, np.ndarray]:
    return {name: param.numpy() for name, param in model.named_parameters()}


def assert_same_parameters(model, reference):
    actual, expected = parameters(model), parameters(reference)
    assert actual.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)


def golden_config() -> dict:
    return json.loads((GOLDEN / "config.json").read_text())


def test_golden_config_file():
    config = JanusConfig.from_file(GOLDEN / "config.json")
    lm = config.language
    assert (lm.vocab_size, lm.hidden_size, lm.intermediate_size, lm.num_hidden_layers) == (600, 64, 128, 2)
    assert (lm.num_attention_heads, lm.num_key_value_heads, lm.rms_norm_eps, lm.rope_theta) == (4, 4, 1e-6, 10000.0)
    assert (config.vision.width, config.vision.depth, config.vision.heads, config.vision.mlp_dim) == (32, 2, 2, 128)
    assert config.num_image_tokens == 576 and config.image_size == 384
    assert (config.aligner.input_dim, config.aligner.n_embed) == (32, 64)
    assert (config.gen_aligner.input_dim, config.gen_aligner.n_embed) == (8, 64)
    assert (config.image_token_size, config.image_token_embed_dim) == (64, 8)
    assert config.gen_vision.ch == 32 and config.gen_vision.codebook_size == 64


def test_presets():
    janus = JanusConfig.from_name("deepseek-ai/Janus-1.3B")
    assert (janus.language.hidden_size, janus.language.num_hidden_layers, janus.language.vocab_size) == (2048, 24, 102400)
    assert (janus.vision.width, janus.vision.depth, janus.vision.heads) == (1024, 24, 16)
    assert janus.gen_head.image_token_size == 16384 and janus.gen_vision.z_channels == 256
    assert janus.chat_roles == ("User", "Assistant")
    assert JanusConfig.from_name("deepseek-ai/Janus-Pro-1B").chat_roles == ("<|User|>", "<|Assistant|>")
    pro7 = JanusConfig.from_name("deepseek-ai/Janus-Pro-7B")
    assert (pro7.language.hidden_size, pro7.language.num_hidden_layers, pro7.aligner.n_embed) == (4096, 30, 4096)
    tiny = JanusConfig.from_name("janus-tiny")
    assert expected_hf_shapes(tiny) == expected_hf_shapes(JanusConfig.from_file(GOLDEN / "config.json"))
    with pytest.raises(ConfigError, match="unknown model name"):
        JanusConfig.from_name("gpt2")


def test_config_round_trips_through_json(tmp_path):
    config = JanusConfig.from_name("janus-tiny")
    config.to_json(tmp_path / "config.json")
    assert JanusConfig.from_file(tmp_path / "config.json") == config


def test_language_config_defaults_to_llama():
    raw = golden_config()
    raw["language_config"] = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4}
    lm = JanusConfig.from_dict(raw).language
    assert (lm.intermediate_size, lm.num_hidden_layers, lm.vocab_size, lm.max_position_embeddings) == (11008, 32, 32000, 2048)
    assert (lm.num_key_value_heads, lm.rms_norm_eps, lm.rope_theta) == (4, 1e-6, 10000.0)


def test_not_a_janus_config():
    llama = {"model_type": "llama", "hidden_size": 64, "architectures": ["LlamaForCausalLM"]}
    with pytest.raises(ConfigError, match="not a Janus config"):
        JanusConfig.from_dict(llama)


def test_expected_shapes_are_the_golden_tensors_minus_the_unused_ones():
    tensors = checkpoints.golden_tensors()
    expected = expected_hf_shapes(JanusConfig.from_file(GOLDEN / "config.json"))
    assert {k: tuple(v.shape) for k, v in tensors.items() if k in expected} == expected
    unused = sorted({k.split(".")[1] if k.startswith("gen_vision") else k.split(".")[2] for k in tensors if k not in expected})
    assert unused == ["attn_pool", "encoder", "quant_conv", "quantize"]


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
def test_paddlenlp_layout_loads_the_same_model(tmp_path, reference, cases, fused):
    """fused: as a config with fuse_attention_qkv and fuse_attention_ffn saves the projections."""
    folder = checkpoints.write_paddlenlp(tmp_path / "paddlenlp", fused=fused)
    model = load_model(folder)
    assert_same_parameters(model, reference)
    embeds = cases["understanding.conv1.inputs_embeds"]
    cache = model.new_cache(1, embeds.shape[1])
    logits = model.text_logits(model.forward_hidden(embeds, cache, [0], [0])).numpy()
    np.testing.assert_allclose(logits, cases["understanding.conv1.prefill_logits"], rtol=0, atol=1e-4)


def test_paddlenlp_fused_projections_in_safetensors_load_the_same_model(tmp_path, reference):
    """PaddleNLP's save_pretrained(safe_serialization=True): Paddle names and layout in model.safetensors
    (no "pt" format in its metadata), here with fused projections."""
    from safetensors.numpy import save_file

    folder = checkpoints.copy_side_files(tmp_path / "paddle-safetensors")
    save_file(checkpoints.paddlenlp_arrays(fused=True), str(folder / "model.safetensors"))
    assert_same_parameters(load_model(folder), reference)


def test_paddlenlp_fused_qkv_split_with_grouped_key_value_heads():
    """As PaddleNLP's LlamaAttention computes q, k and v from a fused qkv_proj: reshape the product to
    [kv_heads, (groups + 2) * head_dim], split it [groups * head_dim, head_dim, head_dim]."""
    heads, kv_heads, head_dim, hidden = 8, 2, 4, 32
    language = JanusConfig.from_file(GOLDEN / "config.json").language
    language = dataclasses.replace(language, hidden_size=heads * head_dim, num_attention_heads=heads,
                                   num_key_value_heads=kv_heads)
    rng = np.random.default_rng(0)
    fused = rng.standard_normal((hidden, (heads + 2 * kv_heads) * head_dim)).astype(np.float32)
    gate_up = rng.standard_normal((hidden, 2 * 48)).astype(np.float32)
    state = {}
    for key, weight in {"l.0.self_attn.qkv_proj.weight": fused, "l.0.mlp.gate_up_fused_proj.weight": gate_up}.items():
        for part, columns in _fused_columns(key, weight.shape, language, key).items():
            state[part] = weight[:, columns]

    # PaddleNLP reshapes and splits the product's columns; a product's column depends only on the same
    # column of the weight, so the same reshape and split of the weight's columns must give our parts
    # exactly (selecting columns is exact; comparing products would compare two BLAS roundings).
    groups = heads // kv_heads
    mix = fused.reshape(hidden, kv_heads, (groups + 2) * head_dim)
    q, k, v = np.split(mix, [groups * head_dim, (groups + 1) * head_dim], axis=-1)
    np.testing.assert_array_equal(state["l.0.self_attn.q_proj.weight"], q.reshape(hidden, heads * head_dim))
    np.testing.assert_array_equal(state["l.0.self_attn.k_proj.weight"], k.reshape(hidden, kv_heads * head_dim))
    np.testing.assert_array_equal(state["l.0.self_attn.v_proj.weight"], v.reshape(hidden, kv_heads * head_dim))
    gate, up = np.split(gate_up, 2, axis=-1)
    np.testing.assert_array_equal(state["l.0.mlp.gate_proj.weight"], gate)
    np.testing.assert_array_equal(state["l.0.mlp.up_proj.weight"], up)
    # And as PaddleNLP computes it, from the product, up to float rounding.
    x = rng.standard_normal((3, hidden)).astype(np.float32)
    product = np.split((x @ fused).reshape(3, kv_heads, (groups + 2) * head_dim),
                       [groups * head_dim, (groups + 1) * head_dim], axis=-1)
    for part, got in zip(("q", "k", "v"), product):
        np.testing.assert_allclose(x @ state[f"l.0.self_attn.{part}_proj.weight"], got.reshape(3, -1), rtol=1e-5, atol=1e-5)
    assert sorted(state) == sorted(f"l.0.{n}.weight" for n in
                                   ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"))


def test_paddlenlp_fused_qkv_of_the_wrong_width(tmp_path):
    folder = checkpoints.write_paddlenlp(tmp_path / "fused", fused=True)
    config = json.loads((folder / "config.json").read_text())
    config["language_config"]["num_key_value_heads"] = 2
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"qkv_proj.weight has 192 output columns; .* need 128"):
        load_model(folder)


def test_sharded_safetensors_load(tmp_path, reference):
    assert_same_parameters(load_model(checkpoints.write_sharded(tmp_path / "sharded")), reference)


def test_sharded_pdparams_load(tmp_path, reference, caplog):
    folder = checkpoints.write_paddlenlp(tmp_path / "paddlenlp", shards=3)
    assert not (folder / "model_state.pdparams").exists()
    with caplog.at_level(logging.INFO, logger="model.loader"):
        model = load_model(folder)
    assert_same_parameters(model, reference)
    assert "model_state.pdparams.index.json (3 shards) (PaddleNLP layout)" in caplog.text


def test_missing_pdparams_shard(tmp_path):
    folder = checkpoints.write_paddlenlp(tmp_path / "model", shards=2)
    (folder / "model_state-00002-of-00002.pdparams").unlink()
    with pytest.raises(CheckpointError, match="lists shard files missing.*model_state-00002-of-00002.pdparams"):
        load_model(folder)


@pytest.mark.parametrize("bfloat16", [False, True])
def test_pytorch_bin_loads_without_torch(tmp_path, reference, bfloat16):
    model = load_model(checkpoints.write_torch_bin(tmp_path / "bin", bfloat16=bfloat16))
    if not bfloat16:
        assert_same_parameters(model, reference)
    golden = checkpoints.golden_tensors()["gen_head.vision_head.weight"]
    expected = (checkpoints.to_bfloat16_bits(golden).astype(np.uint32) << 16).view(np.float32) if bfloat16 else golden
    np.testing.assert_array_equal(model.gen_head.vision_head.weight.numpy(), expected.T)


def test_truncated_pytorch_bin(tmp_path):
    folder = checkpoints.write_torch_bin(tmp_path / "model")
    checkpoints.truncate(folder / "pytorch_model.bin", 0.9)
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        load_model(folder)


def test_bfloat16_weights_are_upcast_to_float32(tmp_path):
    model = load_model(checkpoints.write_bfloat16(tmp_path / "bf16"))
    weight = model.language_model.lm_head.weight
    assert str(weight.dtype) == "paddle.float32"
    golden = checkpoints.golden_tensors()["language_model.lm_head.weight"]
    upcast = (checkpoints.to_bfloat16_bits(golden).astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(weight.numpy(), upcast.T)


def test_half_precision_on_cpu_loads_float32():
    with pytest.warns(UserWarning, match="float32"):
        model = load_model(GOLDEN, dtype="bfloat16")
    assert str(model.language_model.lm_head.weight.dtype) == "paddle.float32"


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="folder not found"):
        load_model(tmp_path / "nowhere")


def test_missing_config(tmp_path):
    folder = checkpoints.write_sharded(tmp_path / "model")
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_model(folder)


def test_missing_weights(tmp_path):
    folder = checkpoints.copy_side_files(tmp_path / "model")
    with pytest.raises(CheckpointError, match="no weights.*model.safetensors"):
        load_model(folder)


def test_missing_shard(tmp_path):
    folder = checkpoints.write_sharded(tmp_path / "model")
    (folder / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors"):
        load_model(folder)


def test_truncated_safetensors(tmp_path):
    folder = checkpoints.copy_side_files(tmp_path / "model")
    shutil.copy(GOLDEN / "model.safetensors", folder / "model.safetensors")
    checkpoints.truncate(folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(folder)


def test_truncated_pdparams(tmp_path):
    folder = checkpoints.write_paddlenlp(tmp_path / "model")
    checkpoints.truncate(folder / "model_state.pdparams")
    with pytest.raises(CheckpointError, match="model_state.pdparams"):
        load_model(folder)


def test_missing_key(tmp_path):
    tensors = checkpoints.golden_tensors()
    del tensors["language_model.model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"missing keys: language_model\.model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(checkpoints.write_safetensors(tmp_path / "model", tensors))


def test_unexpected_key(tmp_path):
    tensors = checkpoints.golden_tensors()
    tensors["language_model.model.layers.2.mlp.up_proj.weight"] = np.zeros((128, 64), np.float32)
    with pytest.raises(CheckpointError, match=r"unexpected keys: language_model\.model\.layers\.2\.mlp\.up_proj"):
        load_model(checkpoints.write_safetensors(tmp_path / "model", tensors))


def test_shape_mismatch(tmp_path):
    tensors = checkpoints.golden_tensors()
    tensors["gen_head.vision_head.weight"] = np.zeros((65, 64), np.float32)
    with pytest.raises(CheckpointError, match=r"gen_head\.vision_head\.weight: checkpoint \[65, 64\], model \[64, 64\]"):
        load_model(checkpoints.write_safetensors(tmp_path / "model", tensors))


def test_config_disagreeing_with_weights(tmp_path):
    config = golden_config()
    config["language_config"]["intermediate_size"] = 256
    with pytest.raises(CheckpointError, match="shape mismatches: language_model.model.layers.0.mlp"):
        load_model(checkpoints.write_safetensors(tmp_path / "model", checkpoints.golden_tensors(), config))


def test_not_a_janus_config_folder(tmp_path):
    folder = checkpoints.write_sharded(tmp_path / "model")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(ConfigError, match="not a Janus config"):
        load_model(folder)


def test_janus_pro_roles_come_from_the_checkpoints_name(tmp_path):
    from model.config import JanusConfig

    raw = json.loads((GOLDEN / "config.json").read_text())
    folder = tmp_path / "deepseek-ai--Janus-Pro-1B"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(raw))
    assert JanusConfig.from_file(folder / "config.json").chat_roles == ("<|User|>", "<|Assistant|>")
    assert JanusConfig.from_file(GOLDEN / "config.json").chat_roles == ("User", "Assistant")
