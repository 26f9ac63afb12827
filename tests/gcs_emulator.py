"""A local Google Cloud Storage emulator for tests (issue 19).

Importable helper, not a test module.  Typical use in a test file::

    import pytest
    from gcs_emulator import gcs_emulator

    @pytest.fixture
    def gcs():
        with gcs_emulator() as emu:
            yield emu

    def test_roundtrip(gcs):
        root = gcs.bucket("runs")              # -> "gs://runs"
        gcs.fs.pipe(f"{root}/a.txt", b"hi")
        with fsspec.open(f"{root}/a.txt", "rb") as f:   # plain gs:// URL works too
            assert f.read() == b"hi"

What it does, and why:

* Serves the pure-Python ``gcp-storage-emulator`` package (JSON API, in memory)
  from a daemon thread on ``127.0.0.1`` and an OS-chosen free port, so tests can
  run in parallel and never touch the network.

* Sets, for the duration of the ``with`` block, and then restores:

  - ``STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT``: gcsfs reads it on every
    request when no ``endpoint_url`` is given (``gcsfs.core._location``), so
    code under test that calls ``fsspec.open("gs://...")`` with no storage
    options talks to the emulator.  Credentials are then skipped too
    (``GoogleCredentials.connect`` tries ``google_default`` then falls back to
    ``anon``; the ``cloud`` method is not tried because ``on_google`` is false).
  - ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``: since gcsfs 2026.3.0,
    ``gcsfs/__init__.py`` replaces ``gcsfs.GCSFileSystem`` with
    ``gcsfs.extended_gcsfs.ExtendedGcsFileSystem`` unless this variable is
    "false".  That class asks the Storage Control *gRPC* API for every bucket's
    layout (``ExtendedGcsFileSystem._get_bucket_type``); an HTTP-only emulator
    fails the TLS handshake and google-api-core retries for 60 s
    (``gcsfs.retry.DEFAULT_RETRY_CONFIG["timeout"]``), and because an UNKNOWN
    answer is not cached (``_lookup_bucket_type``) *every* write/read/ls pays
    it again.  The variable is read only when gcsfs is first imported, so
    setting it here covers gcsfs imported later and subprocesses (CLI tests)
    started inside the block.
  - ``NO_GCE_CHECK=true``: stops gcsfs and google-auth probing the GCE metadata
    server while looking for credentials.
  - ``TENSORSTORE_GCS_HTTP_URL=http://127.0.0.1:PORT``: tensorstore's ``gcs``
    kvstore driver (used by orbax-checkpoint for array data) sends its JSON-API
    requests there instead of https://storage.googleapis.com.  Tensorstore
    finds no credentials, logs "Could not find the credentials file ..." and
    continues unauthenticated, which the emulator accepts.  Orbax's directory
    work (etils.epath) goes through fsspec/gcsfs when TensorFlow is absent.

* Because gcsfs may already have been imported (with the extended class),
  the block also points fsspec's ``gs`` and ``gcs`` protocols at the plain
  ``gcsfs.core.GCSFileSystem`` and restores the previous registration after.
  ``.fs`` is such an instance, with ``token="anon"`` and the endpoint given
  explicitly.

* Adds the ``objects.moveTo`` JSON-API route (copy then delete) to the emulator,
  which lacks it: gcsfs >= 2026.x tries ``moveTo`` first for same-bucket
  ``mv`` and, on the emulator's 501 reply, retries 6 times (~33 s) before
  falling back to copy + delete.  Note that ``mv`` on real GCS is not atomic
  across several objects either.

* Sends ``x-goog-generation`` with media downloads, as GCS does (the emulator
  omits it and tensorstore's conditional rewrite of an OCDBT manifest then fails
  with "Malformed StorageGeneration").

* Clears gcsfs's instance cache on entry and exit, so no filesystem object (and
  its directory-listing cache) leaks between emulators.

Pins known to work together (Python 3.11, fsspec 2026.9.0 from
requirements.lock): gcsfs==2026.10.1, gcp-storage-emulator==2026.7.19.
Tests are skipped, with a message, when either package is missing.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import importlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

__all__ = ["GCSEmulator", "gcs_emulator", "gcs_emulator_fixture"]

_ENV = {
    # Read by gcsfs at import: keep the plain HTTP GCSFileSystem (no gRPC probe).
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    # Skip GCE metadata-server credential probes (gcsfs and google-auth).
    "NO_GCE_CHECK": "true",
}
_PROTOCOLS = ("gs", "gcs")


def _require_packages() -> None:
    missing = []
    for module, dist in (("gcsfs", "gcsfs"), ("gcp_storage_emulator", "gcp-storage-emulator")):
        try:
            __import__(module)
        except ImportError:
            missing.append(dist)
    if missing:
        pytest.skip(
            "GCS emulator tests need "
            + " and ".join(missing)
            + " (pip install gcsfs gcp-storage-emulator; pins in requirements-test.lock)"
        )


def _install_move_to_route() -> None:
    """Teach the emulator ``POST .../o/{src}/moveTo/o/{dst}`` (copy + delete)."""
    from http import HTTPStatus

    from gcp_storage_emulator import server
    from gcp_storage_emulator.exceptions import Conflict, NotFound
    from gcp_storage_emulator.handlers import objects

    if any("/moveTo/" in regex for regex, _ in server.HANDLERS):  # already added
        return

    def move_to(request, response, storage, *args, **kwargs):
        bucket = request.params["bucket_name"]
        try:
            dest = objects._copy(
                request.base_url,
                storage,
                bucket,
                request.params["object_id"],
                bucket,
                request.params["dest_object_id"],
            )
            objects._delete(storage, bucket, request.params["object_id"])
            response.json(dest)
        except NotFound:
            response.status = HTTPStatus.NOT_FOUND
        except Conflict as err:
            objects._handle_conflict(response, err)

    base = server.settings.API_ENDPOINT
    regex = (
        rf"^{base}/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)"
        rf"/moveTo/o/(?P<dest_object_id>.*[^/]+)$"
    )
    # Router.handle reads the module-level HANDLERS on every request.
    server.HANDLERS = ((regex, {server.POST: move_to}), *server.HANDLERS)


def _install_generation_headers() -> None:
    """Send ``x-goog-generation`` and ``x-goog-metageneration`` with every media download, as
    GCS does. The emulator omits them; tensorstore (orbax's OCDBT checkpoints) reads an existing
    ``manifest.ocdbt`` before rewriting it conditionally and then fails with "Malformed
    StorageGeneration" (seen whenever one checkpoint's writes land in two commits)."""
    from gcp_storage_emulator import server
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    if getattr(objects.download, "_davir_generation", False):  # already added
        return
    original = objects.download

    def download(request, response, storage, *args, **kwargs):
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except NotFound:
            obj = None
        if obj is not None:
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj["metageneration"])
        return original(request, response, storage, *args, **kwargs)

    download._davir_generation = True
    objects.download = download  # `objects.get` (alt=media) calls it by this name
    server.HANDLERS = tuple(
        (regex, {m: (download if fn is original else fn) for m, fn in methods.items()})
        for regex, methods in server.HANDLERS
    )


class _HTTPServer(http.server.HTTPServer):
    # gcsfs issues many requests concurrently (e.g. cat/find over many files);
    # the stdlib default backlog of 5 makes extra connects wait for SYN retries.
    request_queue_size = 128

    def handle_error(self, request, client_address):
        # Clients (aiohttp, tensorstore's libcurl) may drop a connection before
        # the emulator has written its reply; the stdlib would print a full
        # traceback for each.  Print only real handler errors.
        import sys

        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


def _forget_filesystems() -> None:
    """Drop cached gcsfs instances so none outlives (or predates) an emulator.

    fsspec caches instances per constructor arguments; etils.epath (orbax's
    path layer) additionally keeps one ``fsspec.filesystem("gcs")`` forever in
    an ``lru_cache``.  A stale instance still sends requests to the current
    ``STORAGE_EMULATOR_HOST`` but answers ``exists``/``ls`` from the previous
    emulator's directory listings (seen as orbax failing with
    ``FileNotFoundError: gs://.../2`` when it removes a step it thinks exists).
    """
    import sys

    import gcsfs.core

    gcsfs.core.GCSFileSystem.clear_instance_cache()
    if "gcsfs.extended_gcsfs" in sys.modules:
        sys.modules["gcsfs.extended_gcsfs"].ExtendedGcsFileSystem.clear_instance_cache()
    epath_backend = sys.modules.get("etils.epath.backend")
    if epath_backend is not None:
        epath_backend.fsspec_backend._get_filesystem.cache_clear()


@dataclass
class GCSEmulator:
    """Handle yielded by :func:`gcs_emulator`."""

    url: str  # endpoint, e.g. "http://127.0.0.1:40123"
    fs: Any  # gcsfs.core.GCSFileSystem bound to the emulator
    project: str
    _storage: Any = field(repr=False)

    def bucket(self, name: str) -> str:
        """Create bucket ``name`` if absent and return its URL ``gs://name``."""
        from gcp_storage_emulator.handlers import buckets

        buckets.create_bucket(name, self._storage)
        self.fs.invalidate_cache()
        return f"gs://{name}"

    def wipe(self) -> None:
        """Delete every object and bucket."""
        self._storage.wipe()
        self.fs.invalidate_cache()


@contextlib.contextmanager
def gcs_emulator(project: str = "davir-test") -> Iterator[GCSEmulator]:
    """Run an in-memory GCS emulator for the duration of the block.

    Skips the calling test when gcsfs or gcp-storage-emulator is missing.
    """
    _require_packages()
    import fsspec
    import gcsfs.core
    from gcp_storage_emulator.server import RequestHandler
    from gcp_storage_emulator.storage import Storage

    _install_move_to_route()
    _install_generation_headers()
    storage = Storage(use_memory_fs=True)
    httpd = _HTTPServer(("127.0.0.1", 0), functools.partial(RequestHandler, storage))
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, name="gcs-emulator", daemon=True)
    thread.start()

    env = dict(_ENV, STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url)
    saved_env = {k: os.environ.get(k) for k in env}
    # fsspec.registry is a read-only view; the module's private dict is the only
    # way to restore (or drop) the previous "gs"/"gcs" registration afterwards.
    registry = importlib.import_module("fsspec.registry")._registry
    saved_reg = {p: registry.get(p) for p in _PROTOCOLS}
    try:
        os.environ.update(env)
        for p in _PROTOCOLS:
            fsspec.register_implementation(p, gcsfs.core.GCSFileSystem, clobber=True)
        _forget_filesystems()
        fs = gcsfs.core.GCSFileSystem(
            token="anon", endpoint_url=url, project=project, skip_instance_cache=True
        )
        yield GCSEmulator(url=url, fs=fs, project=project, _storage=storage)
    finally:
        _forget_filesystems()
        for p, cls in saved_reg.items():
            if cls is None:
                registry.pop(p, None)
            else:
                registry[p] = cls
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def gcs_emulator_fixture(scope: str = "function", project: str = "davir-test"):
    """Build a pytest fixture: ``gcs = gcs_emulator_fixture()`` in a test module
    or conftest.py gives tests a ``gcs`` argument holding a :class:`GCSEmulator`."""

    @pytest.fixture(scope=scope)
    def _fixture():
        with gcs_emulator(project=project) as emu:
            yield emu

    return _fixture
