"""Paths that are local files or URLs: `gs://` (what the hosts of a TPU pod share) and any other
protocol fsspec knows, through one small layer.

`upath(p)` is a `pathlib.Path` for a local path (so local behaviour is exactly pathlib's) and a
`BucketPath` for a URL: the same API (`/`, `name`, `parent`, `open`, `read_text`, `exists`,
`is_file`, `iterdir`, `glob`, `mkdir`, `unlink`, `rmtree`) over fsspec (etils' `epath`, which
orbax uses too), whose errors name the URL (`named_errors`: a missing object or bucket, refused
access, no credentials) instead of fsspec's request paths.

Publishing (`core.io`) stays atomic on an object store, where a rename is a copy and a delete:
a file is written to a local temp file and uploaded as one object, which readers see whole or
not at all; a folder is uploaded file by file and then gets a commit marker (`PUBLISHED`)
written last, which readers of folders require (`is_published`). Reads stream: `open` on a URL
is a buffered file that fetches byte ranges as they are read (parquet row groups, JSON lines),
never the whole object to disk.

gcsfs >= 2026.3 replaces `gcsfs.GCSFileSystem` by a class that first asks the Storage Control
gRPC API for each bucket's layout; against an HTTP endpoint (an emulator) each probe waits 60 s
before falling back, and the answer is not cached. The plain JSON-API client does everything
used here, so it is chosen (`GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`, read when gcsfs is first
imported) unless the environment says otherwise.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

from etils import epath  # noqa: E402  (after the variable above: it may import gcsfs)

# The commit marker of a folder published to an object store (`core.io.publish_dir`).
PUBLISHED = "_PUBLISHED.json"

PathLike = str | os.PathLike[str]


def is_url(path: Any) -> bool:
    """Whether `path` names an object through a protocol (`gs://b/x`, `memory://x`), not a
    local file (`file://` URLs and plain paths are local)."""
    s = os.fspath(path) if not isinstance(path, str) else path
    return "://" in s and not s.startswith("file://")


# `pathlib.Path("gs://b/x")` is the local `gs:/b/x`: a URL that went through Path by mistake.
_COLLAPSED_URL = re.compile(r"^[a-z][a-z0-9+.-]*:/[^/]")


def check_local(path: PathLike) -> None:
    """Refuse a local path that is a URL collapsed by `pathlib` (`gs:/b/x`), so that a code path
    that lost a URL fails naming it instead of writing a local folder called `gs:`."""
    s = os.fspath(path)
    if _COLLAPSED_URL.match(s):
        scheme, rest = s.split(":/", 1)
        raise ValueError(
            f"{path}: a URL turned into a local path (one '/' of '://' is missing: "
            f"write {scheme}://{rest}; in code, pathlib drops it: pass URLs through "
            "davir_jax.core.storage.upath)"
        )


def upath(path: PathLike) -> Any:
    """`path` as a path object: `pathlib.Path` when local, `BucketPath` for a URL."""
    if isinstance(path, BucketPath):
        return path
    if isinstance(path, Path):
        check_local(path)
        return path
    s = os.fspath(path)
    check_local(s)
    if s.startswith("file://"):
        return Path(s[len("file://") :])
    return BucketPath(s) if is_url(s) else Path(s)


def _credentials_hint(url: str) -> str:
    if url.startswith(("gs://", "gcs://")):
        return (
            "; credentials come from GOOGLE_APPLICATION_CREDENTIALS, `gcloud auth "
            "application-default login`, or the VM's service account"
        )
    return ""


def _missing(url: str) -> str:
    """What is missing behind a not-found error for `url`: the object, or its bucket."""
    bucket = url.split("://", 1)[1].split("/", 1)[0]
    with contextlib.suppress(Exception):
        fs = filesystem(url)
        if not fs.exists(bucket):
            return f"no bucket {bucket!r} (or no access to it)"
    return "no such file or object"


@contextlib.contextmanager
def named_errors(url: Any, action: str = "access") -> Iterator[None]:
    """Re-raise fsspec's and the cloud clients' errors for `url` as OS errors that name it:
    FileNotFoundError (missing object or bucket), PermissionError (refused, or no credentials),
    OSError (any other failed request)."""
    url = str(url)
    try:
        yield
    except FileNotFoundError as e:
        if url in str(e):
            raise
        raise FileNotFoundError(f"{url}: {_missing(url)}") from e
    except PermissionError as e:
        if url in str(e):
            raise
        raise PermissionError(f"{url}: {action} refused ({e}){_credentials_hint(url)}") from e
    except Exception as e:
        code = getattr(e, "code", None)
        kind = type(e).__name__
        if kind in ("DefaultCredentialsError", "RefreshError") or code in (401, 403):
            why = f"HTTP {code}: {e}" if code else f"{kind}: {e}"
            raise PermissionError(f"{url}: {action} refused ({why}){_credentials_hint(url)}") from e
        if code == 404:
            raise FileNotFoundError(f"{url}: {_missing(url)}") from e
        if type(e).__module__.split(".")[0] in ("gcsfs", "google", "aiohttp", "fsspec"):
            raise OSError(f"{url}: {action} failed ({kind}: {e})") from e
        raise


class BucketPath(epath.gpath.PosixGPath):
    """A URL with pathlib's API (etils `epath` over fsspec), whose errors name the URL."""

    def open(self, mode: str = "r", *args: Any, **kwargs: Any) -> IO[Any]:  # type: ignore[override]
        with named_errors(self, "writing" if any(c in mode for c in "wax") else "reading"):
            return super().open(mode, *args, **kwargs)

    def exists(self) -> bool:
        with named_errors(self):
            return super().exists()

    def is_dir(self) -> bool:
        with named_errors(self):
            return super().is_dir()

    def is_file(self) -> bool:
        with named_errors(self):
            return super().exists() and not super().is_dir()

    def iterdir(self) -> Iterator[BucketPath]:
        with named_errors(self, "listing"):
            return iter(list(super().iterdir()))

    def glob(self, pattern: str) -> Iterator[BucketPath]:
        with named_errors(self, "listing"):
            return iter(list(super().glob(pattern)))

    def mkdir(self, *args: Any, **kwargs: Any) -> None:
        with named_errors(self, "writing"):
            super().mkdir(*args, **kwargs)

    def unlink(self, missing_ok: bool = False) -> None:
        with named_errors(self, "deleting"):
            super().unlink(missing_ok=missing_ok)

    def rmtree(self, missing_ok: bool = False) -> None:
        with named_errors(self, "deleting"):
            super().rmtree(missing_ok=missing_ok)

    def stat(self) -> Any:
        with named_errors(self):
            return super().stat()

    def resolve(self, strict: bool = False) -> BucketPath:
        return self


def filesystem(url: PathLike) -> Any:
    """The fsspec file system of `url` (cached per protocol and options by fsspec)."""
    import fsspec

    return fsspec.core.url_to_fs(str(url))[0]


def resolved(path: PathLike) -> str:
    """`path` as recorded in manifests: a local path made absolute, a URL as written."""
    return str(path) if is_url(path) else str(Path(path).resolve())


def rmtree(path: PathLike) -> None:
    """Delete a folder and everything in it, if it exists."""
    p = upath(path)
    if isinstance(p, BucketPath):
        p.rmtree(missing_ok=True)
    else:
        import shutil

        shutil.rmtree(p, ignore_errors=True)


def upload(local: Path, url: PathLike) -> None:
    """Copy the local file `local` to `url` as one object (visible only once whole)."""
    fs = filesystem(url)
    with named_errors(url, "writing"):
        fs.put_file(str(local), str(url))


def upload_dir(local: Path, url: PathLike) -> None:
    """Copy every file under the local folder `local` to the same relative names under `url`."""
    base = str(url).rstrip("/")
    for f in sorted(local.rglob("*")):
        if f.is_file():
            upload(f, f"{base}/{f.relative_to(local).as_posix()}")


def copy_file(src: PathLike, dst: PathLike) -> None:
    """Copy a file between any two local paths or URLs (streamed; one object at a URL)."""
    from davir_jax.core.io import atomic_file  # io imports this module

    with upath(src).open("rb") as r, atomic_file(dst) as w:
        _stream(r, w)


def _stream(r: IO[bytes], w: IO[bytes]) -> None:
    """Copy `r` to `w` in 16 MiB blocks (a model file never whole in memory twice)."""
    while block := r.read(1 << 24):
        w.write(block)


def is_published(path: PathLike) -> bool:
    """Whether a folder has been published whole: a local folder exists (it was renamed into
    place in one step); a folder on an object store has its commit marker (`PUBLISHED`)."""
    p = upath(path)
    if isinstance(p, BucketPath):
        return (p / PUBLISHED).is_file()
    return p.is_dir()


def size(path: PathLike) -> int:
    """A file's size in bytes."""
    p = upath(path)
    return p.stat().length if isinstance(p, BucketPath) else p.stat().st_size


def read_bytes(path: PathLike) -> bytes:
    with upath(path).open("rb") as f:
        return f.read()


def load_npy(path: PathLike) -> Any:
    """A `.npy` array (no pickle) from a local path or URL."""
    import numpy as np

    if not is_url(path):
        return np.load(path, allow_pickle=False)
    return np.load(io.BytesIO(read_bytes(path)), allow_pickle=False)


def read_parquet(path: PathLike, **kwargs: Any) -> Any:
    """`pyarrow.parquet.read_table` of a local path or URL (through fsspec: pyarrow's own GCS
    client ignores the endpoint and credentials fsspec is configured with)."""
    import pyarrow.parquet as pq

    if not is_url(path):
        return pq.read_table(path, **kwargs)
    import fsspec

    fs, inner = fsspec.core.url_to_fs(str(path))
    with named_errors(path, "reading"):
        return pq.read_table(inner, filesystem=fs, **kwargs)


@contextlib.contextmanager
def parquet_file(path: PathLike) -> Iterator[Any]:
    """`pyarrow.parquet.ParquetFile` (row groups read as asked: streamed from a URL), closed
    with its source when the block ends."""
    import pyarrow.parquet as pq

    if not is_url(path):
        pf = pq.ParquetFile(path)
        try:
            yield pf
        finally:
            pf.close()
        return
    with upath(path).open("rb") as f, named_errors(path, "reading"):
        yield pq.ParquetFile(f)


def read_parquet_schema(path: PathLike) -> Any:
    with parquet_file(path) as pf:
        return pf.schema_arrow


def cache_root() -> Path:
    """Where copies of remote model sources live: `$DAVIR_REMOTE_CACHE`, else
    `~/.cache/davir/remote`."""
    env = os.environ.get("DAVIR_REMOTE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "davir" / "remote"


def local_copy(url: str) -> Path:
    """A local copy of the model source at `url`, made once per published version: a folder
    published with its marker (a model or LoRA directory, or a run whose `model/` is), or a
    single object (a GGUF file). Weights are read whole into memory to load a model anyway;
    the copy is what the loaders (safetensors memory maps, GGUF, orbax) open. Keyed by the URL
    and the marker's content (or the object's size and generation), so a republished model is
    fetched again and an unchanged one never."""
    import hashlib

    p = upath(url)
    src, files = None, None
    for candidate in (p, p / "model"):
        marker = candidate / PUBLISHED
        if marker.is_file():
            text = marker.read_text()
            src, files = candidate, json.loads(text)["files"]
            version = text
            break
    if src is None:
        if p.is_dir():
            raise FileNotFoundError(
                f"{url}: a folder without a complete published model ({PUBLISHED} missing: "
                "not written by davir, or its upload was cut short)"
            )
        with named_errors(url, "reading"):
            info = filesystem(url).info(str(url))
        version = f"{info.get('size')}:{info.get('generation') or info.get('etag') or ''}"
        src, files = p, None
    key = hashlib.sha256(f"{src}\n{version}".encode()).hexdigest()[:24]
    dest = cache_root() / key / (src.name or "object")
    if dest.exists():
        return dest
    if files is None:  # one object
        dest.parent.mkdir(parents=True, exist_ok=True)
        copy_file(src, dest)
        return dest
    download_published(src, dest)
    return dest


def _marker(url: PathLike) -> dict[str, Any] | None:
    """The commit marker of the folder at `url`, or None if it has none."""
    try:
        return json.loads((upath(url) / PUBLISHED).read_text())
    except FileNotFoundError:
        return None


def published_files(url: PathLike) -> list[str] | None:
    """The files of a folder published at `url` (its marker's list), or None if it has none."""
    marker = _marker(url)
    return None if marker is None else list(marker["files"])


def seal(url: PathLike) -> None:
    """Write the commit marker of a folder whose files were written in place at `url` (by
    orbax, which writes each host's shards itself), listing every file under it: the folder is
    then a publication that `core.io.publish_dir` can copy into place."""
    from davir_jax.core.io import write_json  # io imports this module

    files = [f for f in list_files(url) if f != PUBLISHED]
    write_json(upath(url) / PUBLISHED, {"files": files, "id": "sealed"})


def list_files(url: PathLike) -> list[str]:
    """Every object under the URL folder `url`, as sorted relative names (none if it has
    none), listed afresh: tensorstore (orbax) writes bypass gcsfs's cached listings."""
    fs, p = filesystem(url), upath(url)
    base = str(p).split("://", 1)[1].rstrip("/") + "/"
    fs.invalidate_cache(str(p))
    with named_errors(p, "listing"):
        found = fs.find(str(p)) if p.exists() else []
    return sorted(f[len(base) :] for f in found if f.startswith(base))


class _Republished(Exception):
    """A folder got a new publication while it was being copied."""


def download_published(url: PathLike, dest: Path) -> None:
    """Copy the folder published at `url` (the files its marker lists) to the local `dest`,
    atomically (`core.io.atomic_dir`: a complete copy or none)."""
    from davir_jax.core.io import atomic_dir  # io imports this module

    src = upath(url)
    for _ in range(3):
        marker = _marker(src)
        if marker is None:
            raise FileNotFoundError(f"{url}: not a published folder ({PUBLISHED} missing)")
        try:
            with atomic_dir(dest) as tmp:  # an exception in the block publishes nothing
                for rel in marker["files"]:
                    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                    with (src / rel).open("rb") as r, open(tmp / rel, "wb") as f:
                        _stream(r, f)
                if _marker(src) != marker:  # republished meanwhile: the copy may mix two
                    raise _Republished
            return
        except _Republished:
            continue
    raise OSError(f"{url}: republished while it was being copied, three times; try again")


def publish_copy(local: Path, url: PathLike) -> None:
    """Publish a copy of the local folder `local` at `url` (files, then the marker); `local`
    stays."""
    import shutil

    from davir_jax.core.io import publish_dir, temp_dir

    tmp = temp_dir(url)
    shutil.copytree(local, tmp, dirs_exist_ok=True)
    publish_dir(tmp, url)


def mirror_dir(url: PathLike, kind: str) -> Path:
    """A local folder that stands for the remote folder `url` (`kind`: what it holds), under
    `cache_root()`: where files that must be local (the token cache's array_record files) are
    built or fetched."""
    import hashlib

    key = hashlib.sha256(str(url).rstrip("/").encode()).hexdigest()[:16]
    return cache_root() / kind / key
