"""The command line generated from the config schema: `davir JOB --help` lists every key of the
job's sections with its default; each README shorthand sets the key it names; unknown keys are
errors naming the key and the file; `cli.py` spells no config key."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import operator
import re
from pathlib import Path

import pytest
import yaml

from davir_jax import config as C
from davir_jax.cli import build_parser, main
from davir_jax.cli_schema import config_overrides

ROOT = Path(__file__).resolve().parent.parent

# Written out here, not read from cli.py: the config sections each job reads.
SECTIONS = tuple(
    f.name for f in dataclasses.fields(C.Config) if dataclasses.is_dataclass(f.default_factory)
)
JOB_SECTIONS = {
    "score": ("model", "mesh", "data", "scoring"),
    "sft": ("model", "mesh", "data", "optimizer", "train"),
    "dpo": ("model", "mesh", "data", "optimizer", "train", "dpo"),
    "eval": ("model", "mesh", "data", "eval"),
    "hello": ("model", "mesh"),
    "info": ("model", "mesh"),
    "pipeline": SECTIONS,
    "demo": SECTIONS,
    "plan": SECTIONS,
    "config": SECTIONS,
}


def _default(f: dataclasses.Field):
    """A field's default as plain YAML data (tuples read back as lists)."""
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return list(value) if isinstance(value, tuple) else value


def _keys(section: str) -> dict[str, dataclasses.Field]:
    """`section.key` -> field, from `dataclasses.fields` of the section's class."""
    cls = type(getattr(C.Config(), section))
    return {f"{section}.{f.name}": f for f in dataclasses.fields(cls)}


def _help(job: str, capsys, monkeypatch) -> dict[str, str]:
    """`davir JOB --help` as {option: its whole entry, whitespace collapsed}."""
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([job, "--help"])
    assert e.value.code == 0
    entries: dict[str, str] = {}
    current = None
    for line in capsys.readouterr().out.splitlines():
        m = re.match(r"^  (-\w, )?(--[\w.-]+)", line)  # an option's first line: indent 2
        if m:
            current = m.group(2)
            entries[current] = line.strip()
        elif current and line.startswith("   "):  # its wrapped help
            entries[current] += " " + line.strip()
        else:
            current = None
    return {k: " ".join(v.split()) for k, v in entries.items()}


@pytest.mark.parametrize("job", sorted(JOB_SECTIONS))
def test_help_lists_every_key_of_the_jobs_sections_with_its_default(job, capsys, monkeypatch):
    entries = _help(job, capsys, monkeypatch)
    expected = {"seed": next(f for f in dataclasses.fields(C.Config) if f.name == "seed")}
    for section in JOB_SECTIONS[job]:
        expected.update(_keys(section))
    for key, f in expected.items():
        entry = entries.get(f"--{key}")
        assert entry is not None, f"davir {job} --help does not list --{key}"
        # The entry ends with the default; a doc may itself say "(default: ...)" before it.
        head, sep, shown = entry.rpartition("(default: ")
        assert sep and shown.endswith(")"), entry
        assert yaml.safe_load(shown[:-1]) == _default(f), (key, entry)
        doc = head.split(maxsplit=2)[2:]  # after the option and its metavar
        assert doc and doc[0].strip(), f"--{key} has no doc: {entry}"
    others = [s for s in SECTIONS if s not in JOB_SECTIONS[job]]
    listed = [k for k in entries if k.split(".")[0].lstrip("-") in others]
    assert not listed, f"davir {job} --help lists keys of sections it does not read: {listed}"


# Every shorthand of the README and the tests: (job, argv, {key: value it sets}).
SHORTHANDS = [
    ("score", ["--data", "F"], {"data.path": "F"}),
    ("score", ["--base", "S"], {"scoring.base": "S"}),
    ("score", ["--reference", "R"], {"scoring.reference": "R"}),
    ("score", ["--out", "D"], {"scoring.out": "D"}),
    ("score", ["--template", "alpaca"], {"data.template": "alpaca"}),
    ("score", ["--format", "alpaca"], {"data.format": "alpaca"}),
    ("score", ["--max-len", "64"], {"data.max_len": 64}),
    ("score", ["--overwrite"], {"scoring.overwrite": True, "train.overwrite": False}),
    ("score", ["--strict"], {"data.strict": True, "train.strict_steps": False}),
    ("sft", ["--model", "M"], {"model.source": "M"}),
    ("sft", ["--data", "F"], {"data.path": "F"}),
    ("sft", ["--selection", "D"], {"train.selection": "D"}),
    ("sft", ["--out", "D"], {"train.out": "D"}),
    ("sft", ["--template", "chat"], {"data.template": "chat"}),
    ("sft", ["--format", "gsm8k"], {"data.format": "gsm8k"}),
    ("sft", ["--max-len", "128"], {"data.max_len": 128}),
    ("sft", ["--strict"], {"data.strict": True, "train.strict_steps": True}),
    ("sft", ["--overwrite"], {"train.overwrite": True, "scoring.overwrite": False}),
    ("dpo", ["--model", "M"], {"model.source": "M"}),
    ("dpo", ["--data", "P"], {"data.path": "P"}),
    ("dpo", ["--out", "D"], {"train.out": "D"}),
    ("dpo", ["--objective", "ipo"], {"dpo.objective": "ipo"}),
    ("dpo", ["--beta", "0.25"], {"dpo.beta": 0.25}),
    ("dpo", ["--reference", "R"], {"dpo.reference": "R", "scoring.reference": None}),
    ("dpo", ["--reference-scores", "D"], {"dpo.reference_scores": "D"}),
    ("dpo", ["--template", "chat"], {"data.template": "chat"}),
    ("dpo", ["--format", "preference"], {"data.format": "preference"}),
    ("dpo", ["--max-len", "32"], {"data.max_len": 32}),
    ("dpo", ["--strict"], {"data.strict": True, "train.strict_steps": True}),
    ("dpo", ["--overwrite"], {"train.overwrite": True}),
    ("eval", ["--model", "M"], {"model.source": "M"}),
    ("eval", ["--data", "F"], {"data.path": "F"}),
    ("eval", ["--out", "D"], {"eval.out": "D"}),
    ("eval", ["--generate", "200"], {"eval.generate": 200}),
    ("eval", ["--max-new-tokens", "7"], {"eval.max_new_tokens": 7}),
    ("eval", ["--max-new-tokens=7"], {"eval.max_new_tokens": 7}),
    ("eval", ["--template", "alpaca"], {"data.template": "alpaca"}),
    ("eval", ["--format", "gsm8k"], {"data.format": "gsm8k"}),
    ("eval", ["--max-len", "4"], {"data.max_len": 4}),
    ("pipeline", ["--out", "D"], {"pipeline.out": "D"}),
    ("pipeline", ["--data", "F"], {"data.path": "F"}),
    ("pipeline", ["--test", "T"], {"pipeline.test": "T"}),
    ("pipeline", ["--strict"], {"data.strict": True, "train.strict_steps": True}),
    ("demo", ["--out", "D"], {"pipeline.out": "D"}),
    ("demo", ["--data", "F"], {"data.path": "F"}),
    ("demo", ["--test", "T"], {"pipeline.test": "T"}),
]


def _resolve(job: str, argv: list[str]) -> tuple[argparse.Namespace, C.Config]:
    args, rest = build_parser().parse_known_args([job, *argv])
    return args, C.load_config(None, config_overrides(args) + rest)


@pytest.mark.parametrize(("job", "argv", "sets"), SHORTHANDS, ids=lambda x: str(x))
def test_each_shorthand_sets_the_key_it_names(job, argv, sets):
    _, cfg = _resolve(job, argv)
    for key, value in sets.items():
        assert operator.attrgetter(key)(cfg) == value, (job, argv, key)


def test_every_other_key_keeps_its_default_under_a_shorthand():
    # The oracle: the same config built from the dotted keys a user would type.
    _, cfg = _resolve("sft", ["--model", "M", "--data", "F", "--out", "D", "--strict"])
    typed = C.load_config(
        None,
        ["--model.source=M", "--data.path=F", "--train.out=D", "--data.strict=true"]
        + ["--train.strict_steps=true"],
    )
    assert cfg == typed


def test_dotted_options_take_values_and_win_over_shorthands():
    args, cfg = _resolve("score", ["--data.path=B", "--data", "A", "--data.max_len", "48"])
    assert cfg.data.path == "B" and cfg.data.max_len == 48
    _, cfg = _resolve("sft", ["--mesh.fsdp", "-1", "--optimizer.lr=3e-3", "--seed", "4"])
    assert (cfg.mesh.fsdp, cfg.optimizer.lr, cfg.seed) == (-1, 3e-3, 4)
    # Nested keys and keys of other sections still reach the config as overrides.
    _, cfg = _resolve("score", ["--model.arch.num_layers=2", "--train.epochs=5"])
    assert cfg.model.arch.num_layers == 2 and cfg.train.epochs == 5


def test_sft_help_shows_the_strict_switch_and_its_keys(capsys, monkeypatch):
    entries = _help("sft", capsys, monkeypatch)
    assert "--data.strict=true" in entries["--strict"]
    assert "--train.strict_steps=true" in entries["--strict"]
    assert "--train.selection" in entries["--selection"]


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["sft", "--train.nope=1"], "train.nope"),
        (["score", "--data.max_l=3"], "data.max_l"),  # no abbreviation of --data.max_len
        (["config", "--nope.x=1"], "nope"),
        (["score", "--max-len", "abc"], "data.max_len"),
        (["dpo", "--objective", "nope"], "dpo.objective"),
    ],
)
def test_unknown_keys_and_bad_values_name_the_key_and_file(argv, named, capsys):
    assert main([*argv, "--config", "configs/tiny.yaml"]) == 2
    err = capsys.readouterr().err
    assert named in err and "tiny.yaml" in err, err


def test_a_shorthand_exists_only_where_the_schema_declares_it(capsys):
    # `davir score` reads no model.source shorthand (it scores --base and --reference).
    assert main(["score", "--model", "M", "--config", "configs/tiny.yaml"]) == 2
    assert "unrecognised arguments" in capsys.readouterr().err


def test_the_schema_names_only_commands_that_exist(capsys, monkeypatch):
    declared: dict[str, set[str]] = {}
    for section in SECTIONS:
        for f in _keys(section).values():
            for flag, commands in f.metadata.get("cli", {}).items():
                for command in commands:
                    declared.setdefault(command, set()).add(flag)
    assert declared
    for command, flags in declared.items():
        entries = _help(command, capsys, monkeypatch)  # an unknown command exits 2
        assert flags <= set(entries), (command, flags - set(entries))


def test_cli_source_spells_no_config_key():
    keys: set[str] = set()  # (a bare "seed" is also select's own option: not searched)
    for section in SECTIONS:
        keys |= set(_keys(section))
    tree = ast.parse((ROOT / "davir_jax" / "cli.py").read_text())
    strings = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)]
    spelled = [s for s in strings if isinstance(s, str)]
    found = sorted({k for s in spelled for k in keys if re.search(rf"\b{re.escape(k)}\b", s)})
    assert not found, f"cli.py spells config keys {found}"
    assert len(keys) > 50  # the enumeration itself is not empty
