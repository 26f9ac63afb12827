"""Tiny random transformers (PyTorch) models of every family: the numerical oracle."""

from __future__ import annotations

import pathlib

import numpy as np

FAMILIES = ("llama", "mistral", "qwen2", "gemma", "gemma2")


def hf_config(family: str, **over):
    import transformers as tf

    common = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    if family == "llama":
        # Llama-3 rope scaling with a short original context so all three bands are hit.
        kw = dict(
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        )
        cfg = tf.LlamaConfig(**{**common, **kw, **over})
    elif family == "mistral":
        cfg = tf.MistralConfig(**{**common, "sliding_window": 4, "head_dim": 16, **over})
    elif family == "qwen2":
        cfg = tf.Qwen2Config(**{**common, **over})
    elif family == "gemma":
        cfg = tf.GemmaConfig(**{**common, "num_key_value_heads": 1, "head_dim": 32, **over})
    elif family == "gemma2":
        cfg = tf.Gemma2Config(
            **{
                **common,
                "num_hidden_layers": 3,
                "head_dim": 16,
                "sliding_window": 4,
                "query_pre_attn_scalar": 24,
                "attn_logit_softcapping": 5.0,
                "final_logit_softcapping": 3.0,
                **over,
            }
        )
    else:
        raise ValueError(family)
    return cfg


def make_hf_model(family: str, directory: pathlib.Path, seed: int = 0, **over):
    """Build, perturb (so norms and biases are not trivially 0/1) and save a tiny model."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(
        hf_config(family, **over), attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    return model


def hf_logits(model, ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    import torch

    with torch.no_grad():
        am = None if attention_mask is None else torch.tensor(attention_mask)
        return model(torch.tensor(ids, dtype=torch.long), attention_mask=am).logits.numpy()
