"""Do two source trees compile the same SFT and scoring steps? A speed check that needs no quiet
machine: when the lowered programs (StableHLO without debug information) are identical, the
steady speed cannot differ.

    python benchmarks/same_program.py /path/to/old/checkout /path/to/new/checkout

Each tree is imported in its own process (its `davir_jax` first on `sys.path`); the programs are
SmolLM2-135M's shape cut to 2 layers, float32, the default attention on CPU, 2 rows of 512
tokens: the SFT step with and without remat, and the scoring step.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

_PROBE = r"""
import dataclasses, hashlib, sys
sys.path.insert(0, sys.argv[1])
import numpy as np, optax
from flax import nnx
from davir_jax.config import load_config
from davir_jax.engine.nll import nll_step
from davir_jax.engine.trainer import make_train_step
from davir_jax.models import random_model

arch = load_config(sys.argv[1] + "/configs/models/smollm2-135m.yaml").model.arch
arch = dataclasses.replace(arch, num_layers=2)
T = 512
ones = np.ones((1, 2, T), np.int32)
pos = np.broadcast_to(np.arange(T, dtype=np.int32), (1, 2, T)).copy()
for remat in (False, True):
    model = random_model(arch, remat=remat, scan_layers=True)
    graphdef, params = nnx.split(model)
    tx = optax.adamw(1e-4)
    batch = {"input_ids": ones, "segment_ids": ones, "positions": pos, "loss_mask": ones,
             "weights": np.ones((1, 2, 1), np.float32)}
    text = make_train_step(graphdef, tx, 256).lower((params, tx.init(params)), batch)
    print(f"sft remat={remat}", hashlib.sha256(text.as_text(debug_info=False).encode()).hexdigest())
model = random_model(arch, scan_layers=True)
fn = nll_step(model.arch, model.run, 1, 256)
text = fn.lower(nnx.state(model), ones[0], ones[0], pos[0], ones[0]).as_text(debug_info=False)
print("score", hashlib.sha256(text.encode()).hexdigest())
"""


def programs(tree: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run(
        [sys.executable, "-c", _PROBE, os.path.abspath(tree)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if r.returncode:
        raise SystemExit(f"{tree}: the probe failed:\n{r.stderr[-2000:]}")
    return dict(line.rsplit(" ", 1) for line in r.stdout.strip().splitlines())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("old")
    p.add_argument("new")
    a = p.parse_args()
    old, new = programs(a.old), programs(a.new)
    for name in old:
        same = "identical" if old[name] == new.get(name) else "DIFFERENT"
        print(f"{name}: {same} ({old[name][:12]} / {new.get(name, '-')[:12]})")
    sys.exit(0 if old == new else 1)


if __name__ == "__main__":
    main()
