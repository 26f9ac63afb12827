"""The public extension API, used as a user would: a plugin file written outside the package
(a SimPO-like reference-free objective, a selection score, a model family), loaded by the
`davir` command with --plugins, DAVIR_PLUGINS or a config's `plugins:` key. The DPO loss is
checked against a NumPy evaluation of the formula on log-probs from a `davir score` run, the
selection against a NumPy ranking."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from score_tables import write_scores_dir
from toy_tokenizers import WORDS

from davir_jax import plugins
from davir_jax.cli import main
from davir_jax.core.losses import PREFERENCE_OBJECTIVES, REFERENCE_FREE
from davir_jax.core.scores import SCORES
from davir_jax.models.arch import HF_CONVERTERS

PLAIN = [w for w in WORDS if w.isalpha()]
GAMMA = 0.5  # the plugin objective's target margin
BETA = 2.0  # its default beta (the run sets none)

PLUGIN = f'''
"""A user's extensions: nothing here is part of davir_jax."""
import jax
import numpy as np

from davir_jax.plugins import ArchConfig, register_family, register_objective, register_score

GAMMA = {GAMMA}


@register_objective("simpo_test", default_beta={BETA}, needs_reference=False)
def simpo(pi_c, pi_r, ref_c, ref_r, n_c, n_r, beta, label_smoothing=0.0):
    """SimPO (arXiv 2405.14734): length-normalised, reference-free, with a target margin."""
    rc, rr = beta * pi_c / n_c, beta * pi_r / n_r
    return -jax.nn.log_sigmoid(rc - rr - GAMMA), rc, rr


def rho_sqrt(cols, seed):
    return (cols.nll_base - cols.nll_ref) / np.sqrt(cols.n_tokens)


register_score("rho_sqrt_test", rho_sqrt)


@register_family("toy_llama")
def toy_llama(hf):
    return ArchConfig.from_hf({{**hf, "model_type": "llama"}})
'''


@pytest.fixture(autouse=True)
def fresh_registries():
    """Each test starts from the built-in registries and no loaded plugin, and leaves them so."""
    regs = (PREFERENCE_OBJECTIVES, SCORES, HF_CONVERTERS)
    saved = [dict(r) for r in regs]
    free, loaded, modules = set(REFERENCE_FREE), dict(plugins._LOADED), set(sys.modules)
    yield
    for r, old in zip(regs, saved, strict=True):
        r.clear()
        r.update(old)
    REFERENCE_FREE.clear()
    REFERENCE_FREE.update(free)
    plugins._LOADED.clear()
    plugins._LOADED.update(loaded)
    for m in set(sys.modules) - modules:
        if m.startswith("davir_plugin_"):
            del sys.modules[m]


def _plugin(tmp_path: Path, text: str = PLUGIN, name: str = "my_ext.py") -> Path:
    d = tmp_path / "user_code"  # outside the package, not on sys.path
    d.mkdir(exist_ok=True)
    f = d / name
    f.write_text(textwrap.dedent(text))
    return f


def _pairs(path: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    rows = [
        {
            "prompt": " ".join(rng.choice(PLAIN, 4)),
            "chosen": " " + " ".join(rng.choice(PLAIN, 3)),
            "rejected": " " + " ".join(rng.choice(PLAIN, int(rng.integers(2, 9)))),
        }
        for _ in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


def test_dpo_trains_a_plugin_objective_from_a_file(tmp_path, base, capsys):
    plugin = _plugin(tmp_path)
    data = _pairs(tmp_path / "pairs.jsonl", 24)
    cache = tmp_path / "cache"
    common = [f"--data.cache_dir={cache}", "--data.max_len=32", "-q"]
    out = tmp_path / "dpo"
    code = main(
        [
            "dpo",
            "--model",
            str(base),
            "--data",
            str(data),
            "--out",
            str(out),
            "--objective",
            "simpo_test",
            "--plugins",  # after the subcommand, like --debug
            str(plugin),
            "--data.batch_rows=8",
            "--train.batch_examples=24",  # one step holds every training pair
            "--train.epochs=4",
            "--train.min_steps=0",
            "--dpo.eval_fraction=0.25",
            "--optimizer.lr=1e-3",
            "--optimizer.warmup_steps=1",
            *common,
        ]
    )
    assert code == 0, capsys.readouterr().err
    # Reference-free: no reference log-probs were computed (none cached).
    assert not list(cache.glob("reference-nll-*"))

    # The oracle's inputs: each response's summed log-prob and token count under the starting
    # policy (the base), from a scoring run on the same pairs.
    sc = tmp_path / "scores"
    assert (
        main(["score", "--data", str(data), "--reference", str(base), "--out", str(sc), *common])
        == 0
    )
    t = pq.read_table(sc / "scores.parquet").to_pylist()
    logp = {r["example_id"]: -r["nll_ref"] for r in t}
    count = {r["example_id"]: r["n_tokens"] for r in t}
    pair_ids = sorted({e.rsplit("/", 1)[0] for e in logp})
    assert len(pair_ids) == 24

    from davir_jax.jobs.dpo import held_out

    train = [p for p in pair_ids if not held_out(p, 0.25)]
    lc = np.array([logp[f"{p}/chosen"] for p in train])
    lr = np.array([logp[f"{p}/rejected"] for p in train])
    tc = np.array([count[f"{p}/chosen"] for p in train], np.float64)
    tr = np.array([count[f"{p}/rejected"] for p in train], np.float64)
    rc, rr = BETA * lc / tc, BETA * lr / tr
    oracle = -_log_sigmoid(rc - rr - GAMMA)

    m = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(m) == 4 and m[0]["pairs"] == len(train)
    assert m[0]["loss"] == pytest.approx(oracle.mean(), rel=1e-5)
    assert m[0]["logps/chosen"] == pytest.approx(lc.mean(), rel=1e-5)  # means over the pairs
    assert m[0]["rewards/chosen"] == pytest.approx(rc.mean(), rel=1e-5)
    assert m[0]["rewards/rejected"] == pytest.approx(rr.mean(), rel=1e-5)
    assert m[-1]["loss"] < m[0]["loss"]  # it trained on the plugin's loss
    ev = json.loads((out / "eval.json").read_text())
    assert ev["objective"] == "simpo_test" and ev["beta"] == BETA
    assert ev["train_pairs"] == len(train)
    assert ev["held_out"]["pairs"] == len(pair_ids) - len(train) > 0


@pytest.mark.parametrize("how", ["flag", "env"])
def test_select_ranks_by_a_plugin_score(tmp_path, monkeypatch, capsys, how):
    plugin = _plugin(tmp_path)
    cols = write_scores_dir(tmp_path / "scores", "pool", 40, 3)
    args = ["select", f"{tmp_path / 'scores'}:count=7", "--method", "rho_sqrt_test"]
    args += ["--out", str(tmp_path / "sel")]
    if how == "flag":
        args = ["--plugins", str(plugin), *args]  # before the subcommand
    else:
        monkeypatch.setenv("DAVIR_PLUGINS", str(plugin))
    assert main(args) == 0, capsys.readouterr().err
    score = (cols["lb"] - cols["lr"]) / np.sqrt(cols["t"])
    ids = cols["ids"]
    want = sorted(range(len(ids)), key=lambda i: (-score[i], ids[i]))[:7]
    man = json.loads((tmp_path / "sel" / "manifest.json").read_text())
    assert man["method"] == "rho_sqrt_test"
    assert [s["example_id"] for s in man["selected"]] == [str(ids[i]) for i in want]
    np.testing.assert_allclose([s["score"] for s in man["selected"]], score[want], rtol=1e-12)


def test_a_config_names_plugins_before_its_sections_are_checked(tmp_path, capsys):
    _plugin(tmp_path)
    cfg = tmp_path / "user_code" / "exp.yaml"
    body = "dpo:\n  objective: simpo_test\npipeline:\n  methods: [rho_sqrt_test, davir]\n"
    cfg.write_text(body)
    # Without the plugin both names are errors that list what is registered.
    assert main(["config", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "dpo.objective" in err and "davir_dpo" in err and "simpo_test" in err
    cfg.write_text("pipeline:\n  methods: [rho_sqrt_test, davir]\n")
    assert main(["config", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "pipeline.methods" in err and "rho_sqrt_test" in err and "random" in err
    cfg.write_text("plugins: [my_ext.py]\n" + body)  # relative to the YAML file
    assert main(["config", "--config", str(cfg)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "objective: simpo_test" in out and "- rho_sqrt_test" in out


def test_pipeline_methods_unknown_score_is_an_error(tmp_path, capsys):
    assert main(["config", "--pipeline.methods=[davir, nope_score]"]) == 2
    err = capsys.readouterr().err
    assert "pipeline.methods" in err and "nope_score" in err and "rho" in err


def test_missing_plugin_file_exits_2_naming_it(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "my_objectives.py"
    assert main(["--plugins", str(missing), "config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("davir config: error:") and str(missing) in err
    assert main(["config", "--plugins", "no_such_module_davir_x"]) == 2
    assert "no_such_module_davir_x" in capsys.readouterr().err
    assert main(["config", "--plugins"]) == 2
    assert "--plugins needs a value" in capsys.readouterr().err


def test_import_error_names_the_plugin_and_its_message(tmp_path, capsys):
    bad = _plugin(tmp_path, "import numpy\nraise RuntimeError('broken on purpose')\n", "bad.py")
    assert main(["--plugins", str(bad), "config"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "RuntimeError: broken on purpose" in err


def test_a_name_registered_twice_is_an_error_and_leaves_no_trace(tmp_path, capsys):
    first = _plugin(tmp_path)
    plugins.load_plugins([str(first)])
    plugins.load_plugins([str(first)])  # the same plugin again: loaded once, no error
    # Registers a score, then an objective whose name the first plugin holds.
    again = _plugin(
        tmp_path,
        "from davir_jax.plugins import register_objective, register_score\n"
        "register_score('other_score', lambda cols, seed: cols.nll_base)\n"
        "register_objective('simpo_test', 1.0, lambda *a: a[:3])\n",
        "again.py",
    )
    with pytest.raises(plugins.PluginError) as e:
        plugins.load_plugins([str(again)])
    msg = str(e.value)
    assert str(again) in msg and "'simpo_test' is already registered" in msg
    assert "davir_plugin_my_ext_" in msg  # by whom
    # The failed plugin registered a score before it failed: undone.
    assert "other_score" not in SCORES and "simpo_test" in PREFERENCE_OBJECTIVES
    builtin = _plugin(tmp_path, PLUGIN.replace('"simpo_test"', '"dpo"'), "shadow.py")
    assert main(["--plugins", str(builtin), "config"]) == 2
    err = capsys.readouterr().err
    assert "'dpo' is already registered (by davir_jax.core.losses)" in err and str(builtin) in err


def test_a_model_family_plugin_reads_an_hf_directory(tmp_path, base, capsys):
    from davir_jax.models.loading import load_arch

    plugin = _plugin(tmp_path)
    toy = tmp_path / "toy"
    shutil.copytree(base, toy)
    hf = json.loads((toy / "config.json").read_text())
    (toy / "config.json").write_text(json.dumps({**hf, "model_type": "toy_llama"}))
    assert main(["info", str(toy)]) == 2
    assert "toy_llama" in capsys.readouterr().err
    assert main(["info", str(toy), "--plugins", str(plugin)]) == 0, capsys.readouterr().err
    assert load_arch(toy) == load_arch(base)
