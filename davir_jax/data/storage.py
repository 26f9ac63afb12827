"""Tokenized example storage: TFDS `array_record` data sets, written and read without TensorFlow.

A *store* is one directory per (data file, tokenizer, template, options) combination, named by a
hash of those fields (`store_dir`), so a change to any input lands in a new directory instead of
silently reusing stale tokens. In a multi-host run every process tokenizes its share of the
examples (``index % num_parts == part``) and writes one *part* (`build_part`); all processes then
wait for the others (`wait_for_parts`) and open the whole store (`TokenizedStore`), which gives
random access to the records in global ``index`` order.

Layout::

    <root>/<name>-<key16>/
        key.json                          the fields the key was computed from
        part-00000-of-00002/
            tfds/davir_tokenized/1.0.0/   TFDS data set (dataset_info.json, features.json,
                                          davir_tokenized-train.array_record-00000-of-00001;
                                          the reader takes any number of shards)
            index.npy  lengths.npy        sidecars: global index and token count per record,
            example_ids.json              in the order the records were written
            info.json                     the caller's `info` (e.g. skip counts)
            COMPLETE.json                 completion marker and summary, written last
        part-00001-of-00002/ ...

Why TFDS array_record: it is a standard, documented on-disk format with random access (grain /
`as_data_source` read it directly), it needs no TensorFlow for writing or for reading through
`as_data_source`, and `index.npy` / `lengths.npy` let a store open (and a length-bucketing
sampler plan) without decoding a single record. Nothing here uses pickle: the sidecars are
``.npy`` (loaded with ``allow_pickle=False``) and JSON.

How, through public APIs only: each record is encoded by the TFDS features
(`FeaturesDict.serialize_example`) and written with `array_record`'s own writer (one shard per
part), then `tfds.folder_dataset.write_metadata` writes ``dataset_info.json`` and
``features.json``: TFDS's documented way to describe a data set written outside a TFDS builder.
Reading is `tfds.builder_from_directory(...).as_data_source`. A TFDS builder would print
"Downloading and preparing dataset" on stdout (no public switch turns that off), and a store
build is not a download. Each part is built in its own temp folder and published atomically,
so processes building parts of one store at once need no lock.
"""

from __future__ import annotations

import hashlib
import json
import logging
import operator
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging as absl_logging
from array_record.python.array_record_module import ArrayRecordWriter

from davir_jax.core.io import atomic_dir, dumps_json, remove_leftovers, write_atomic

log = logging.getLogger(__name__)

# A record: {"index": int (global order of the example in the data set), "example_id": str,
# "input_ids": np.ndarray int32 [L], "loss_mask": np.ndarray uint8 [L] (0/1, same L)}.
Record = dict

# Bumped whenever the on-disk layout of a part changes; a part written with another version is
# treated as incomplete (and rebuilt) rather than misread.
FORMAT_VERSION = 1
SPLIT = "train"
KEY_FILE = "key.json"
MARKER = "COMPLETE.json"
INFO_FILE = "info.json"
INDEX_FILE = "index.npy"
LENGTHS_FILE = "lengths.npy"
IDS_FILE = "example_ids.json"
TFDS_SUBDIR = "tfds"
_PART_RE = re.compile(r"^part-(\d+)-of-(\d+)$")
_INT32 = np.iinfo(np.int32)


# ----------------------------------------------------------------------------- keys and dirs


def _canonical_json(fields: dict) -> str:
    try:
        # sort_keys + fixed separators: the same fields give the same text whatever the dict
        # order; no default= hook, because str() of an arbitrary object need not be stable.
        return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    except TypeError as e:
        raise TypeError(f"store key fields must be JSON-serializable: {e}") from e


def store_key(fields: dict) -> str:
    """sha256 hex digest of the canonical JSON (``sort_keys``) of `fields`.

    `fields` should hold everything the tokenized output depends on: data file content hash,
    tokenizer fingerprint, template name, max length, reader/format options, overlong policy...
    Key order does not matter; any change of a value (or of its JSON type: ``1`` vs ``"1"``)
    gives a different key.
    """
    return hashlib.sha256(_canonical_json(fields).encode("utf-8")).hexdigest()


def _safe_name(name: str) -> str:
    # Keep names readable but safe as one path component on any file system.
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._")
    return safe[:80] or "store"


def store_dir(root: str | Path, name: str, fields: dict) -> Path:
    """Directory of the store for `fields`: ``root / f"{safe(name)}-{store_key(fields)[:16]}"``.

    Creates the directory and records `fields` in its ``key.json`` (atomically, so several hosts
    may call this at once), which makes a store self-describing. Raises ValueError if an existing
    ``key.json`` records different fields (a 64-bit key prefix collision, or a hand-edited dir).
    """
    key = store_key(fields)
    d = Path(root) / f"{_safe_name(name)}-{key[:16]}"
    d.mkdir(parents=True, exist_ok=True)
    key_path = d / KEY_FILE
    record = {"key": key, "fields": fields}
    if key_path.exists():
        existing = json.loads(key_path.read_text(encoding="utf-8"))
        if existing.get("key") != key:
            raise ValueError(
                f"{key_path} records key {existing.get('key')} for fields "
                f"{existing.get('fields')}, not {key} for {fields}"
            )
    else:
        write_atomic(key_path, dumps_json(record, sort_keys=True, indent=1))
    return d


def part_name(part: int, num_parts: int) -> str:
    """Directory name of part `part` of `num_parts`."""
    return f"part-{part:05d}-of-{num_parts:05d}"


# ----------------------------------------------------------------------------- TFDS plumbing


DATASET_NAME = "davir_tokenized"  # the TFDS data set name: part of every shard's file name
VERSION = "1.0.0"
_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"  # TFDS's default shard file names
_FILE_FORMAT = "array_record"
# Random access reads one record at a time; TFDS writes its array_record shards with this too.
_WRITER_OPTIONS = "group_size:1"


class _QuietStoreInfo(logging.Filter):
    """Drops the INFO lines TFDS logs (through absl) each time a store part is opened ("Load
    dataset info from .../davir_tokenized/1.0.0"): one per part and data-loader worker, they
    would drown a job's own log. Stateless, so no lock; TFDS's warnings still pass, and so does
    everything TFDS logs about other data sets."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or DATASET_NAME not in record.getMessage()


absl_logging.get_absl_logger().addFilter(_QuietStoreInfo())


def _features() -> tfds.features.FeaturesDict:
    # Encoding.BYTES stores the arrays as raw little-endian bytes: without it TFDS upcasts ints to
    # int64 lists in the tf.train.Example proto, which is ~2x slower to write and 4-8x bigger.
    enc = tfds.features.Encoding.BYTES
    return tfds.features.FeaturesDict(
        {
            "index": tfds.features.Scalar(dtype=np.int64),
            "example_id": tfds.features.Text(),
            "input_ids": tfds.features.Tensor(shape=(None,), dtype=np.int32, encoding=enc),
            "loss_mask": tfds.features.Tensor(shape=(None,), dtype=np.uint8, encoding=enc),
        }
    )


def _builder_dir(part_dir: Path) -> Path:
    return part_dir / TFDS_SUBDIR / DATASET_NAME / VERSION


def _write_tfds(builder_dir: Path, examples: Iterable[dict]) -> int:
    """Write `examples` (in order) as a one-shard TFDS array_record data set in `builder_dir`;
    returns how many. Writes nothing for no examples (TFDS cannot describe an empty split)."""
    features = _features()
    template = tfds.core.ShardedFileTemplate(
        data_dir=builder_dir,
        template=_TEMPLATE,
        dataset_name=DATASET_NAME,
        split=SPLIT,
        filetype_suffix=_FILE_FORMAT,
    )
    shard = template.sharded_filepath(shard_index=0, num_shards=1)
    writer = None
    n = num_bytes = 0
    try:
        for ex in examples:
            if writer is None:
                builder_dir.mkdir(parents=True)
                writer = ArrayRecordWriter(os.fspath(shard), _WRITER_OPTIONS)
            blob = features.serialize_example(ex)
            writer.write(blob)
            n += 1
            num_bytes += len(blob)  # what TFDS's own writer records: the serialized examples
    finally:
        if writer is not None:
            writer.close()
    if n:
        split = tfds.core.SplitInfo(
            name=SPLIT, shard_lengths=[n], num_bytes=num_bytes, filename_template=template
        )
        tfds.folder_dataset.write_metadata(
            data_dir=builder_dir,
            features=features,
            split_infos=[split],
            version=VERSION,
            check_data=False,  # it would read a record back through tf.data (TensorFlow)
            description="Tokenized examples written by davir_jax.data.storage.",
            # Keep the order the examples were given in: the sidecars describe that order.
            disable_shuffling=True,
        )
    return n


# ----------------------------------------------------------------------------- validation


def _as_int_array(x: Any, dtype: np.dtype, lo: int, hi: int, what: str, eid: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"example {eid!r}: {what} must be 1-D, got shape {a.shape}")
    if a.size == 0:
        return np.zeros(0, dtype)  # [] comes in as float64; nothing to range-check
    if a.dtype == np.bool_:
        a = a.astype(np.uint8)
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"example {eid!r}: {what} must be integers, got dtype {a.dtype}")
    if a.dtype != dtype:
        # "Safe" by value, not by dtype: tokenizers hand out int64 arrays whose values fit.
        mn, mx = int(a.min()), int(a.max())
        if mn < lo or mx > hi:
            raise ValueError(
                f"example {eid!r}: {what} values [{mn}, {mx}] do not fit {np.dtype(dtype).name} "
                f"range [{lo}, {hi}]"
            )
        a = a.astype(dtype)
    return a


def _validate(rec: Record) -> tuple[int, str, np.ndarray, np.ndarray]:
    try:
        eid = rec["example_id"]
        index = rec["index"]
        ids, mask = rec["input_ids"], rec["loss_mask"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"record must have index, example_id, input_ids, loss_mask: {e}") from e
    if not isinstance(eid, str):
        raise ValueError(f"example_id must be str, got {type(eid).__name__}: {eid!r}")
    try:
        index = operator.index(index)
    except TypeError as e:
        raise ValueError(f"example {eid!r}: index must be an integer, got {index!r}") from e
    if index < 0:
        raise ValueError(f"example {eid!r}: index must be >= 0, got {index}")
    ids = _as_int_array(ids, np.int32, 0, _INT32.max, "input_ids", eid)
    mask = _as_int_array(mask, np.uint8, 0, 1, "loss_mask", eid)
    if ids.shape != mask.shape:
        raise ValueError(
            f"example {eid!r}: input_ids has length {ids.shape[0]} but loss_mask has "
            f"length {mask.shape[0]}"
        )
    return index, eid, ids, mask


# ----------------------------------------------------------------------------- writing


def _read_marker(part_dir: Path) -> dict | None:
    try:
        marker = json.loads((part_dir / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def part_complete(directory: Path, part: int, num_parts: int) -> bool:
    """Whether part `part` of `num_parts` has been fully written (its completion marker exists,
    parses, and describes this part in the current format)."""
    marker = _read_marker(Path(directory) / part_name(part, num_parts))
    return (
        marker is not None
        and marker.get("format_version") == FORMAT_VERSION
        and marker.get("part") == part
        and marker.get("num_parts") == num_parts
    )


def build_part(
    directory: Path,
    part: int,
    num_parts: int,
    records: Iterable[Record],
    info: dict | Callable[[], dict],
) -> dict:
    """Build part `part` of `num_parts` of the store in `directory`, replacing any earlier copy.

    One part per process in a multi-host run: each process tokenizes the examples with
    ``index % num_parts == part`` and calls this (the split is the caller's convention; only the
    global uniqueness of ``index`` is checked, when the store is opened). `records` is consumed
    once, streaming, in the given order, which is kept within the part; it may be empty.

    Writes a TFDS array_record data set under ``directory / part_name(part, num_parts)``, the
    sidecars (``index.npy``, ``lengths.npy``, ``example_ids.json``), the JSON `info` (e.g. skip
    counts computed by the caller; a callable is called after `records` is consumed, so counts
    gathered while streaming are complete) and, last, the completion marker. Everything is
    written to a temporary directory next to the part and published with
    `io_utils.atomic_dir`, so a crash leaves either no part or the previous one, never a
    half-written part that looks complete; leftovers of crashed builds of this part are removed
    first. The caller decides whether to skip parts that are already complete
    (`part_complete`): this always rebuilds.

    Raises ValueError (naming the example_id) for a malformed record or a duplicate index.
    Returns the summary also stored in the marker: ``n_records``, ``n_tokens``,
    ``n_loss_tokens``, ``part``, ``num_parts``.
    """
    directory = Path(directory)
    if not (0 <= part < num_parts):
        raise ValueError(f"part must be in [0, {num_parts}), got {part}")
    if not callable(info):
        info_text = dumps_json(info, sort_keys=True, indent=1)  # fail on bad info before tokenizing
    final = directory / part_name(part, num_parts)
    # Left by a crashed build (or publish) of this part; only this process builds this part.
    remove_leftovers(final)

    side = _Sidecars(part)
    with atomic_dir(final) as tmp:
        t0 = time.perf_counter()
        # An empty part has sidecars only (TFDS cannot describe a split with no examples).
        _write_tfds(_builder_dir(tmp), side.track(records))
        log.debug("wrote %d records in %.2fs", len(side.indices), time.perf_counter() - t0)
        if callable(info):
            info_text = dumps_json(info(), sort_keys=True, indent=1)
        summary = side.write(tmp, info_text, num_parts)
    return summary


class _Sidecars:
    """What a part records beside its array_record data, gathered while the records stream
    past: indices (checked unique), lengths, example ids and the loss-token count."""

    def __init__(self, part: int) -> None:
        self.part = part
        self.indices: list[int] = []
        self.lengths: list[int] = []
        self.ids: list[str] = []
        self.seen: set[int] = set()
        self.n_loss = 0

    def track(self, records: Iterable[Record]) -> Iterator[dict]:
        for rec in records:
            index, eid, input_ids, mask = _validate(rec)
            if index in self.seen:
                raise ValueError(
                    f"example {eid!r}: index {index} appears twice in part {self.part}"
                )
            self.seen.add(index)
            self.indices.append(index)
            self.lengths.append(int(input_ids.shape[0]))
            self.ids.append(eid)
            self.n_loss += int(mask.sum(dtype=np.int64))
            yield {"index": index, "example_id": eid, "input_ids": input_ids, "loss_mask": mask}

    def write(self, tmp: Path, info_text: str, num_parts: int) -> dict:
        """The sidecars, the info and, last, the completion marker (whose summary is returned)."""
        np.save(tmp / INDEX_FILE, np.asarray(self.indices, np.int64), allow_pickle=False)
        np.save(tmp / LENGTHS_FILE, np.asarray(self.lengths, np.int32), allow_pickle=False)
        (tmp / IDS_FILE).write_text(dumps_json(self.ids), encoding="utf-8")
        (tmp / INFO_FILE).write_text(info_text, encoding="utf-8")
        summary = {
            "format_version": FORMAT_VERSION,
            "part": self.part,
            "num_parts": num_parts,
            "n_records": len(self.indices),
            "n_tokens": int(sum(self.lengths)),
            "n_loss_tokens": self.n_loss,
        }
        (tmp / MARKER).write_text(dumps_json(summary, indent=1), encoding="utf-8")
        return summary


def wait_for_parts(
    directory: Path, num_parts: int, timeout_s: float = 3600, poll_s: float = 1.0
) -> None:
    """Block until all `num_parts` parts in `directory` are complete.

    Other hosts build their parts on a shared file system; this polls their completion markers.
    Raises TimeoutError naming the parts still missing after `timeout_s` seconds.
    """
    directory = Path(directory)
    deadline = time.monotonic() + timeout_s
    missing = list(range(num_parts))
    while True:
        missing = [p for p in missing if not part_complete(directory, p, num_parts)]
        if not missing:
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"timed out after {timeout_s:g}s waiting for {len(missing)} of {num_parts} parts "
                f"of {directory}: missing parts {missing[:20]}"
                + (" ..." if len(missing) > 20 else "")
            )
        time.sleep(poll_s)


# ----------------------------------------------------------------------------- reading


def _find_num_parts(directory: Path) -> int:
    """The `num_parts` of the (unique, most recent) complete set of parts in `directory`."""
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenized store {directory} does not exist")
    seen: dict[int, set[int]] = {}
    for d in directory.iterdir():
        m = _PART_RE.match(d.name)
        if m and d.is_dir():
            seen.setdefault(int(m.group(2)), set()).add(int(m.group(1)))
    if not seen:
        raise FileNotFoundError(f"tokenized store {directory} has no parts (not built yet?)")
    complete = {}
    problems = []
    for n in sorted(seen):
        missing = [p for p in range(n) if not part_complete(directory, p, n)]
        if missing:
            problems.append(f"{n} parts: missing or incomplete parts {missing[:20]}")
        else:
            complete[n] = max(
                (directory / part_name(p, n) / MARKER).stat().st_mtime for p in range(n)
            )
    if not complete:
        raise FileNotFoundError(
            f"tokenized store {directory} is incomplete ({'; '.join(problems)}); build the "
            "missing parts with build_part"
        )
    # Same key => same content, so any complete set is correct; the newest is the likeliest to
    # be the one the current run wrote (an older run may have used another host count).
    return max(complete, key=complete.__getitem__)


class TokenizedStore:
    """Random-access view over all parts of a store, in global ``index`` order.

    Opening reads only the sidecars (no record is decoded); records are read on demand through
    TFDS ``as_data_source`` (array_record random access), one data source per non-empty part,
    opened lazily. The view is picklable (for data-loader worker processes): the open data
    sources are dropped and reopened on first use.

    Attributes:
        directory: the store directory.
        num_parts: how many parts the store was built in.
        indices: int64 [N] the global ``index`` values, sorted ascending (gaps are examples the
            builder skipped).
        lengths: int32 [N] token count of each record, in the same order.
        example_ids: the example ids, in the same order.
        infos: each part's `info` dict, in part order.
        summaries: each part's summary (see `build_part`), in part order.
        fields: the fields recorded in ``key.json`` by `store_dir`, or None if there is none.

    Returned arrays are read-only views of the decoded bytes; copy before modifying in place.
    """

    def __init__(self, directory: str | Path, num_parts: int | None = None) -> None:
        self.directory = Path(directory)
        if num_parts is None:
            num_parts = _find_num_parts(self.directory)
        else:
            missing = [
                p for p in range(num_parts) if not part_complete(self.directory, p, num_parts)
            ]
            if missing:
                raise FileNotFoundError(
                    f"tokenized store {self.directory} is incomplete: missing or incomplete parts "
                    f"{missing[:20]} of {num_parts}; build them with build_part"
                )
        self.num_parts = num_parts
        key_path = self.directory / KEY_FILE
        self.fields = (
            json.loads(key_path.read_text(encoding="utf-8"))["fields"]
            if key_path.exists()
            else None
        )

        idx_parts, len_parts, self.example_ids = [], [], []
        self.infos, self.summaries = [], []
        self._part_dirs = [self.directory / part_name(p, num_parts) for p in range(num_parts)]
        for d in self._part_dirs:
            idx = np.load(d / INDEX_FILE, allow_pickle=False)
            lens = np.load(d / LENGTHS_FILE, allow_pickle=False)
            ids = json.loads((d / IDS_FILE).read_text(encoding="utf-8"))
            summary = _read_marker(d) or {}
            if not (len(idx) == len(lens) == len(ids) == summary.get("n_records")):
                raise ValueError(f"{d}: sidecars disagree on the number of records")
            idx_parts.append(idx.astype(np.int64))
            len_parts.append(lens.astype(np.int32))
            self.example_ids.extend(ids)
            self.infos.append(json.loads((d / INFO_FILE).read_text(encoding="utf-8")))
            self.summaries.append(summary)

        # num_parts >= 1, so there is always something to concatenate (possibly empty arrays).
        all_idx = np.concatenate(idx_parts)
        part_of = np.concatenate([np.full(len(x), p, np.int32) for p, x in enumerate(idx_parts)])
        pos = np.concatenate([np.arange(len(x), dtype=np.int64) for x in idx_parts])
        order = np.argsort(all_idx, kind="stable")
        self.indices = all_idx[order]
        dup = np.flatnonzero(np.diff(self.indices) == 0)
        ids_sorted = [self.example_ids[i] for i in order]
        if dup.size:
            i = int(dup[0])
            raise ValueError(
                f"tokenized store {self.directory}: index {int(self.indices[i])} appears in more "
                f"than one record ({ids_sorted[i]!r}, {ids_sorted[i + 1]!r})"
            )
        self.lengths = np.concatenate(len_parts)[order]
        self.example_ids = ids_sorted
        # Where the i-th record (global order) lives: which part, which position in it.
        self._part_of = part_of[order]
        self._pos = pos[order]
        self._sources: dict[int, Any] = {}

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __repr__(self) -> str:
        return (
            f"TokenizedStore({os.fspath(self.directory)!r}, n={len(self)}, parts={self.num_parts})"
        )

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_sources"] = {}  # open array_record readers do not travel; reopened lazily
        return state

    def _source(self, p: int) -> Any:
        src = self._sources.get(p)
        if src is None:
            builder = tfds.builder_from_directory(os.fspath(_builder_dir(self._part_dirs[p])))
            src = builder.as_data_source(split=SPLIT)
            self._sources[p] = src
        return src

    def _normalize(self, i: Any) -> int:
        i = operator.index(i)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"record {i} out of range for a store of {n} records")
        return i

    def _convert(self, i: int, raw: dict) -> Record:
        rec = {
            "index": int(raw["index"]),
            "example_id": raw["example_id"].decode("utf-8")
            if isinstance(raw["example_id"], bytes)
            else str(raw["example_id"]),
            "input_ids": raw["input_ids"],
            "loss_mask": raw["loss_mask"],
        }
        # Cheap integrity check that the sidecars and the records agree.
        if rec["index"] != self.indices[i]:
            raise RuntimeError(
                f"{self.directory}: record {i} has index {rec['index']} but the sidecars say "
                f"{int(self.indices[i])}; the store is corrupt, rebuild it"
            )
        return rec

    def __getitem__(self, i: int) -> Record:
        """The `i`-th record in global index order (negative `i` counts from the end)."""
        i = self._normalize(i)
        raw = self._source(int(self._part_of[i]))[int(self._pos[i])]
        return self._convert(i, raw)

    def get_many(self, idx: Sequence[int]) -> list[Record]:
        """Records at positions `idx` (global index order), in the order asked.

        Reads each part's records in one ``__getitems__`` call (array_record batches and
        parallelizes those reads) instead of one lookup per record.
        """
        norm = np.asarray([self._normalize(i) for i in idx], np.int64)
        out: list[Record | None] = [None] * len(norm)
        if not len(norm):
            return []
        parts = self._part_of[norm]
        for p in np.unique(parts):
            where = np.flatnonzero(parts == p)
            src = self._source(int(p))
            local = self._pos[norm[where]].tolist()
            if hasattr(src, "__getitems__"):
                raws = src.__getitems__(local)
            else:
                raws = [src[j] for j in local]
            for w, raw in zip(where.tolist(), raws):
                out[w] = self._convert(int(norm[w]), raw)
        return out  # type: ignore[return-value]
