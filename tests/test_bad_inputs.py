"""Each bad weight source gives one clear error naming the file and the tensor; never a partial
load."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from hf_models import make_hf_model

from davir_jax.models import UnsupportedConfigError, WeightFileError, load_model
from davir_jax.models.safetensors_io import SafetensorsFile, save_file


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    make_hf_model("llama", d)
    return d


@pytest.fixture
def copy(good_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(good_dir, d)
    return d


def test_missing_weight_file(copy):
    (copy / "model.safetensors").unlink()
    with pytest.raises(WeightFileError, match=r"m: no model\.safetensors"):
        load_model(copy)


def test_truncated_weight_file(copy):
    f = copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(WeightFileError, match=r"model\.safetensors: truncated: tensor '.+'"):
        load_model(copy)


def test_missing_shard_of_an_index(copy):
    index = {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightFileError, match=r"model-00001-of-00002\.safetensors: .*not found"):
        load_model(copy)


def test_missing_tensor(copy):
    f = SafetensorsFile(copy / "model.safetensors")
    tensors = {k: np.array(f.get(k)) for k in f.keys() if "layers.1.mlp.up_proj" not in k}
    save_file(tensors, copy / "model.safetensors")
    with pytest.raises(
        WeightFileError,
        match=r"'model\.layers\.1\.mlp\.up_proj\.weight' is "
        "missing",
    ):
        load_model(copy)


def test_shape_disagrees_with_config(copy):
    cfg = json.loads((copy / "config.json").read_text())
    cfg["intermediate_size"] = 80
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        WeightFileError,
        match=r"m/model\.safetensors: tensor 'model\.layers\.0\.mlp\.gate_proj"
        r"\.weight' has shape \(96, 64\) in the file but the config implies "
        r"\(80, 64\)",
    ):
        load_model(copy)


def test_more_layers_in_file_than_config(copy):
    cfg = json.loads((copy / "config.json").read_text())
    cfg["num_hidden_layers"] = 1
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightFileError, match="not explained by config.json"):
        load_model(copy)


def test_unknown_family(copy):
    cfg = json.loads((copy / "config.json").read_text())
    cfg["model_type"] = "falcon"
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedConfigError, match=r"config\.json: model_type 'falcon'"):
        load_model(copy)


@pytest.mark.parametrize(
    "field,value",
    [
        ("rope_parameters", {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
        ("hidden_act", "relu2"),
        ("some_new_norm_option", True),
    ],
)
def test_math_changing_field_not_implemented_is_an_error(copy, field, value):
    cfg = json.loads((copy / "config.json").read_text())
    cfg[field] = value
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedConfigError, match=r"config\.json"):
        load_model(copy)


def test_pickle_weights_are_refused(copy):
    (copy / "model.safetensors").unlink()
    (copy / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(WeightFileError, match="safetensors only"):
        load_model(copy)


def test_not_a_model_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_model(tmp_path / "nothing")
    with pytest.raises(WeightFileError, match="neither"):
        load_model(tmp_path)


def _gguf(path, arch: str = "llama", qtype=None):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tensor("token_embd.weight", np.zeros((12, 8), np.float32))
    if qtype is not None:
        w.add_tensor("blk.0.attn_q.weight", np.zeros((8, 8), np.uint8), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_unsupported_architecture(tmp_path):
    p = _gguf(tmp_path / "m.gguf", arch="falcon")
    with pytest.raises(UnsupportedConfigError, match=r"m\.gguf: GGUF architecture 'falcon'"):
        load_model(p)


def test_gguf_unsupported_tensor_type(tmp_path):
    import gguf

    p = _gguf(tmp_path / "m.gguf", qtype=gguf.GGMLQuantizationType.I8)
    with pytest.raises(
        WeightFileError,
        match=r"m\.gguf: tensor 'blk\.0\.attn_q\.weight' has "
        "unsupported type I8",
    ):
        load_model(p)


def test_gguf_missing_tensor(tmp_path):
    p = _gguf(tmp_path / "m.gguf")
    with pytest.raises(
        WeightFileError,
        match=r"m\.gguf: tensor 'blk\.0\.attn_norm\.weight' is "
        "missing",
    ):
        load_model(p)


def test_corrupt_project_checkpoint(tmp_path, good_dir):
    from davir_jax.models import save_model

    ck = save_model(load_model(good_dir), tmp_path / "ck")
    shutil.rmtree(ck / "params")
    with pytest.raises(WeightFileError, match="no params/ folder"):
        load_model(ck)


def test_malformed_safetensors_header_names_file_and_tensor(tmp_path):
    import struct

    header = json.dumps({"w": {"dtype": "F32", "shape": [2]}}).encode()
    p = tmp_path / "model.safetensors"
    p.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(WeightFileError, match=r"model\.safetensors: tensor 'w' has a malformed"):
        SafetensorsFile(p)


def test_config_json_must_be_an_object(copy):
    (copy / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config\.json: a model config must be a JSON object"):
        load_model(copy)


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_export_hf_files_get_the_umask_permissions(good_dir, tmp_path, umask):
    """An export is meant to be shared: its folder and files get the modes a plain mkdir/open
    would (0755/0644 under umask 022), not mkdtemp's 0700 and mkstemp's 0600."""
    import os
    import stat

    from davir_jax.models import export_hf

    model = load_model(good_dir)
    old = os.umask(umask)
    try:
        out = export_hf(model, None, tmp_path / "exported")
        save_file({"x": np.zeros(2, np.float32)}, tmp_path / "alone.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    files = sorted(p.name for p in out.iterdir())
    assert files == ["config.json", "model.safetensors"]
    for name in files:
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o666 & ~umask, name
    assert stat.S_IMODE((tmp_path / "alone.safetensors").stat().st_mode) == 0o666 & ~umask
