"""Suite-wide setup: 8 fake CPU devices (set once, before any backend starts) and offline HF."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")

import pathlib  # noqa: E402

import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    n = len(jax.devices())
    for item in items:
        m = item.get_closest_marker("devices")
        if m and n < m.args[0]:
            item.add_marker(pytest.mark.skip(reason=f"needs {m.args[0]} devices, {n} present"))


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (tests read ../shared/data)")
    return SHARED_DATA
