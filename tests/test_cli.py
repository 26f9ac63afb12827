"""The `davir` command: help lists the subcommands; configs and overrides are validated."""

from __future__ import annotations

import subprocess
import sys

from davir_jax.cli import main


def test_help_lists_subcommands():
    out = subprocess.run(
        [sys.executable, "-m", "davir_jax.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for cmd in ("demo", "pipeline", "score", "select", "sft", "dpo", "eval", "info", "export"):
        assert cmd in out


def test_config_overrides(capsys):
    assert main(["config", "--config", "configs/tiny.yaml", "--mesh.fsdp=4"]) == 0
    assert "fsdp: 4" in capsys.readouterr().out


def test_unknown_key_is_a_clear_error(capsys):
    assert main(["config", "--config", "configs/tiny.yaml", "--mesh.fsdpp=4"]) == 2
    err = capsys.readouterr().err
    assert "mesh.fsdpp" in err and "tiny.yaml" in err


def test_info_on_tiny_random_model_sharded(capsys):
    assert main(["info", "--config", "configs/tiny.yaml", "--mesh.fsdp=4", "--mesh.tensor=2"]) == 0
    out = capsys.readouterr().out
    assert "parameters: " in out and "'fsdp', 'tensor'" in out


def test_export_from_hf_dir(tmp_path):
    from hf_models import make_hf_model

    make_hf_model("qwen2", tmp_path / "src")
    assert main(["export", str(tmp_path / "src"), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_hello_on_a_tiny_model(base, capsys):
    assert main(["hello", f"--model.source={base}", "--max-new-tokens=3"]) == 0
    out = capsys.readouterr().out
    assert "per-token loss" in out and "Q: What is the capital of France?" in out
