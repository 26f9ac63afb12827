"""Full-size presets: parameter counts from jax.eval_shape (no memory) equal the published ones
and an independent count from transformers' PyTorch classes on the meta device."""

from __future__ import annotations

import math
import pathlib

import jax
import pytest

from davir_jax.config import load_config
from davir_jax.models.decoder import RunConfig
from davir_jax.models.weights import abstract_model, iter_params

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs" / "models"
PUBLISHED = {  # from the model cards / HF safetensors metadata
    "llama2-7b": 6_738_415_616,
    "llama3-8b": 8_030_261_248,
    "mistral-7b": 7_241_732_096,
    "qwen2-0.5b": 494_032_768,
    "gemma-2b": 2_506_172_416,
    "gemma2-2b": 2_614_341_888,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_eval_shape_parameter_count(name):
    arch = load_config(CONFIGS / f"{name}.yaml").model.arch
    _, abs_state = abstract_model(arch, RunConfig(param_dtype="bfloat16"))
    leaves = [v.get_value() for _, v in iter_params(abs_state)]
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing allocated
    count = sum(math.prod(x.shape) for x in leaves)
    assert count == PUBLISHED[name]
    assert arch.num_params() == PUBLISHED[name]


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_count_matches_transformers_meta_model(name):
    torch = pytest.importorskip("torch")
    import transformers as tf

    arch = load_config(CONFIGS / f"{name}.yaml").model.arch
    cfg = tf.AutoConfig.for_model(
        **{k: v for k, v in arch.to_hf().items() if k not in ("architectures",)}
    )
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == PUBLISHED[name]
