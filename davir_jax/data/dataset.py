"""A data file -> a cached, tokenized data set -> batch plans -> host batches.

`prepare` reads the file with its reader, encodes it with a template and stores the tokens in a
tensorflow-datasets `array_record` store keyed by everything that changes the tokens (the file's
content hash, the tokenizer fingerprint, the template, whether EOS is in the loss mask, the maximum
length and the reader options),
so a second run reuses it and a changed input rebuilds it. In a multi-host run every process
tokenizes the rows `row % process_count == process_index` and writes its own part; all parts are
awaited, and the skip accounts of all parts are merged.

`TokenizedData` is the prepared data: lengths, ids, the merged `SkipLog`, and `plans()` /
`batches()` that yield this process's fixed-shape host batches.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from davir_jax.core import storage
from davir_jax.core.fingerprints import tokenizer_fingerprint
from davir_jax.core.io import dumps_json, file_sha256, progress_bar, write_atomic
from davir_jax.data import batching
from davir_jax.data.config import DataConfig
from davir_jax.data.readers import (
    PAIR_FORMATS,
    read_examples,
    read_pairs,
    resolve_format,
    source_name,
)
from davir_jax.data.skips import DataError, PairSkips, SkipLog
from davir_jax.data.storage import (
    TokenizedStore,
    build_part,
    part_complete,
    part_name,
    store_dir,
    wait_for_parts,
)
from davir_jax.data.templates import Encoder

# Bump when the tokenized layout or a template's definition changes (invalidates caches).
STORE_VERSION = 1
_ENCODE_CHUNK = 1024


def store_fields(cfg: DataConfig, tokenizer: Any, pairs: bool = False) -> dict[str, Any]:
    """Everything that determines the tokens of a data set (the cache key)."""
    if cfg.path is None:
        raise DataError("data.path is not set")
    fmt = resolve_format(cfg.path, cfg.format)
    if pairs and fmt not in PAIR_FORMATS:
        raise DataError(f"{cfg.path}: format {fmt!r} has no preference pairs")
    return {
        # A preference file holds both responses of each pair (example index 2*row + side) or,
        # for SFT and evaluation, the chosen response only (index = row).
        "sides": "both" if pairs else "chosen",
        "version": STORE_VERSION,
        "data_sha256": file_sha256(cfg.path),
        "format": fmt,
        "fields": dict(sorted(cfg.fields.items())),
        "source": cfg.name or source_name(cfg.path),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "template": cfg.template,
        # The same ids, another loss mask: a set tokenized one way is never reused for the other.
        "eos_in_loss": cfg.eos_in_loss,
        "max_len": cfg.max_len,
        "overlong": cfg.overlong,
    }


def no_examples_error(path: str | Path, log: SkipLog) -> DataError:
    """The error for a data file of which nothing can be used: every row skipped (with the
    reasons, their counts and first locations, in one line) or no rows at all. Raised where a
    file becomes a data set (`prepare`), so every job fails the same clear way; `preflight`
    raises it too when a quick read already shows it."""
    if not log.total:
        return DataError(f"{path}: no examples (the file holds no rows)")
    reasons = []
    for reason, n in log.skipped.most_common():
        where = log.where.get(reason, [])[:2]
        reasons.append(f"{reason} x{n:,}" + (f" (first: {'; '.join(where)})" if where else ""))
    return DataError(
        f"{path}: every row was skipped ({log.total:,} rows), nothing to use: " + ", ".join(reasons)
    )


def make_plans(
    lengths: np.ndarray, cfg: DataConfig, shuffle: bool = False, seed: int = 0
) -> list[batching.BatchPlan]:
    """Global batch plans of a data set (identical on every process): packed rows or buckets."""
    if cfg.pack:
        return batching.packed_plan(
            lengths, cfg.batch_rows, cfg.packed_row_len, cfg.max_segments, shuffle, seed
        )
    widths = batching.bucket_widths(cfg.max_len, cfg.bucket_min)
    return batching.padded_plan(lengths, cfg.batch_rows, widths, shuffle, seed)


class _Batched:
    """Plans and host batches for anything with `cfg`, `lengths` and `get` (one data set or a
    mixture of several)."""

    cfg: DataConfig
    lengths: np.ndarray

    def get(self, idx: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        raise NotImplementedError

    def plans(self, shuffle: bool = False, seed: int = 0) -> list[batching.BatchPlan]:
        """Global batch plans (identical on every process)."""
        return make_plans(self.lengths, self.cfg, shuffle, seed)

    @property
    def num_segments(self) -> int:
        return self.cfg.max_segments if self.cfg.pack else 1

    def batches(
        self,
        plans: list[batching.BatchPlan],
        process_index: int = 0,
        process_count: int = 1,
        start: int = 0,
    ) -> Iterator[tuple[int, batching.Batch]]:
        """(step, this process's host batch) for plans[start:]."""
        for step in range(start, len(plans)):
            rows = batching.local_rows(plans[step], process_index, process_count)
            yield step, batching.assemble(rows, plans[step].width, self.num_segments, self.get)


@dataclasses.dataclass
class TokenizedData(_Batched):
    """A prepared data set: a random-access store plus what was skipped."""

    cfg: DataConfig
    store: TokenizedStore
    fields: dict[str, Any]
    log: SkipLog
    directory: Path

    @property
    def source(self) -> str:
        return self.fields["source"]

    def __len__(self) -> int:
        return len(self.store)

    @property
    def lengths(self) -> np.ndarray:
        return self.store.lengths

    @property
    def example_ids(self) -> list[str]:
        return self.store.example_ids

    @property
    def rows(self) -> np.ndarray:
        """Source row index of each example (from the store's global `index`)."""
        if self.fields.get("sides") == "both":
            return self.store.indices // 2
        return self.store.indices

    def get(self, idx: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        recs = self.store.get_many(idx)
        return [(r["input_ids"], r["loss_mask"]) for r in recs]

    def _per_record(self, fn: Any) -> np.ndarray:
        """int64 [N]: `fn(input_ids, loss_mask)` of every example; reads every record once."""
        out = np.zeros(len(self), np.int64)
        for s in range(0, len(self), 4096):
            idx = list(range(s, min(s + 4096, len(self))))
            out[idx] = [fn(ids, m) for ids, m in self.get(idx)]
        return out

    def n_response_tokens(self) -> np.ndarray:
        """T per example (loss tokens: the response, plus EOS unless `eos_in_loss` is off);
        reads every record once."""
        return self._per_record(lambda ids, m: int(m.sum()))

    def prompt_lengths(self) -> np.ndarray:
        """Tokens before the response per example (every template's sequence is prompt +
        response, and the response's first token is the first loss token); reads every record."""
        return self._per_record(lambda ids, m: int(np.argmax(m > 0)))


class ResponseAlone(_Batched):
    """The examples of `data` with their prompt replaced by one start token: the same response
    token ids (and loss mask) predicted without the instruction, for IFD's L(y) (Cherry LLM,
    arXiv 2308.12032). Sequence: `[start] + response`, mask `[0] + response mask`, so T and the
    scored ids equal the prompted example's exactly and IFD is a ratio over the same tokens.

    `start` (`start_token`) is the BOS when the tokenizer adds one to every text, else its EOS
    (tokenizers that add no BOS, such as Qwen2's and SmolLM2's, whose BOS-named token is a chat
    marker, separate documents with it): one token of context, as Cherry's code gives the
    response when its tokenizer adds a BOS, and never a scored position.
    """

    def __init__(self, data: TokenizedData, start: int) -> None:
        self.data, self.cfg, self.start = data, data.cfg, int(start)
        self.prompt_len = data.prompt_lengths()
        self.lengths = data.lengths - self.prompt_len + 1
        self.example_ids, self.rows = data.example_ids, data.rows

    def __len__(self) -> int:
        return len(self.data)

    def get(self, idx: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        head_ids, head_mask = np.asarray([self.start], np.int32), np.zeros(1, np.uint8)
        out = []
        for i, (ids, mask) in zip(idx, self.data.get(idx)):
            p = int(self.prompt_len[i])
            out.append(
                (
                    np.concatenate([head_ids, ids[p:].astype(np.int32)]),
                    np.concatenate([head_mask, mask[p:].astype(np.uint8)]),
                )
            )
        return out


def start_token(tokenizer: Any) -> int:
    """`ResponseAlone`'s start token: the BOS if the tokenizer puts one before every text (what
    a document starts with for this model), else its EOS. A BOS the tokenizer defines but does
    not add (SmolLM2's `<|im_start|>`) would be a chat marker out of place."""
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = tokenizer("a")["input_ids"]
    adds_bos = bos is not None and bool(ids) and ids[0] == bos
    return int(bos if adds_bos else tokenizer.eos_token_id)


def prepare(
    cfg: DataConfig,
    tokenizer: Any,
    process_index: int = 0,
    process_count: int = 1,
    progress: bool = True,
    wait_timeout_s: float = 3600.0,
    pairs: bool = False,
) -> TokenizedData:
    """Tokenize `cfg.path` into the cache (or reuse it) and open it.

    With `pairs`, a preference file is stored with both responses of every pair (chosen at index
    2*row, rejected at 2*row + 1); a pair whose either side cannot be used is skipped whole.
    Raises `DataError` in strict mode if any row was skipped, naming the first location.
    """
    fields = store_fields(cfg, tokenizer, pairs)
    remote = storage.is_url(cfg.cache_dir)
    root = storage.mirror_dir(cfg.cache_dir, "tokens") if remote else cfg.cache_dir
    directory = store_dir(root, fields["source"], fields)
    url = f"{str(cfg.cache_dir).rstrip('/')}/{directory.name}" if remote else None
    pi, pc = process_index, process_count
    if not part_complete(directory, pi, pc) and not _fetch_part(url, directory, pi, pc, 0):
        _tokenize_part(cfg, tokenizer, fields, directory, pi, pc, progress, pairs)
    if url is not None:
        _share_parts(url, directory, pi, pc, wait_timeout_s)
    wait_for_parts(directory, process_count, timeout_s=wait_timeout_s)
    store = TokenizedStore(directory, num_parts=process_count)
    log = SkipLog()
    for info in store.infos:
        log.merge(info.get("log", {}))
    if process_index == 0:
        _write_manifest(cfg, fields, directory, store, log, pairs)
    if progress and process_index == 0:
        kept = (len(store) // 2, "pairs") if pairs else (len(store), "examples")
        print(f"{cfg.path}: " + log.report(*kept), file=sys.stderr)
    if cfg.strict and log.total:
        reason = next(iter(log.skipped))
        raise DataError(
            f"strict: {log.total} rows of {cfg.path} were skipped; first: {reason} at "
            f"{log.where[reason][0]}"
        )
    if len(store) == 0:
        # No job can do anything with an empty data set (eval would report a loss of 0 over 0
        # examples, scoring would merge no shards): one error naming the file and why.
        raise no_examples_error(cfg.path, log)
    return TokenizedData(cfg, store, fields, log, directory)


def _fetch_part(url: str | None, directory: Path, part: int, num_parts: int, wait_s: float) -> bool:
    """Copy part `part` of a token cache in a bucket (`data.cache_dir` a URL) into its local
    mirror `directory`, waiting up to `wait_s` seconds for a host to publish it; whether it was
    there. array_record files are read from local disk only, so each host keeps a copy."""
    if url is None:
        return False
    remote = f"{url}/{part_name(part, num_parts)}"
    deadline = time.monotonic() + wait_s
    while not storage.is_published(remote):
        if time.monotonic() >= deadline:
            return False
        time.sleep(1.0)
    storage.download_published(remote, directory / part_name(part, num_parts))
    return True


def _share_parts(url: str, directory: Path, pi: int, pc: int, wait_s: float) -> None:
    """A token cache in a bucket: publish this process's part unless the bucket has it (also
    when the local copy was complete before: a host killed before its upload finishes it on the
    rerun), then fetch every part the local mirror lacks, waiting for the hosts to publish
    them."""
    own = f"{url}/{part_name(pi, pc)}"
    if not storage.is_published(own):
        storage.publish_copy(directory / part_name(pi, pc), own)
    for p in range(pc):
        if not part_complete(directory, p, pc) and not _fetch_part(url, directory, p, pc, wait_s):
            raise TimeoutError(
                f"{url}/{part_name(p, pc)}: not published after {wait_s:g}s (process {p} of "
                f"{pc} tokenizes and publishes it)"
            )


def _tokenize_part(
    cfg: DataConfig,
    tokenizer: Any,
    fields: dict[str, Any],
    directory: Path,
    process_index: int,
    process_count: int,
    progress: bool,
    pairs: bool,
) -> None:
    """Read and encode this process's rows of `cfg.path` into its part of the token store,
    with the skip log in the part's info."""
    log = SkipLog(strict=cfg.strict)
    encoder = Encoder(tokenizer, cfg.template, cfg.max_len, cfg.overlong, cfg.eos_in_loss)
    reader = read_pairs if pairs else read_examples
    examples = reader(
        cfg.path,
        fields["format"],
        log,
        fields["source"],
        cfg.fields or None,
        process_index,
        process_count,
    )
    bar = progress_bar(None, f"tokenize {fields['source']} ({cfg.template})", "ex", progress)

    def records() -> Iterator[dict[str, Any]]:
        chunk = []
        for ex in examples:
            chunk.append(ex)
            if len(chunk) == _ENCODE_CHUNK:
                yield from _encode(chunk)
                chunk = []
        yield from _encode(chunk)

    def _encode(chunk: list) -> Iterator[dict[str, Any]]:
        if pairs:
            yield from _encode_pairs(encoder, chunk, log)
        else:
            for ex, enc in zip(chunk, encoder.encode(chunk, log)):
                if enc is not None:
                    yield _record(ex.row, enc)
        bar.update(len(chunk))

    build_part(directory, process_index, process_count, records(), lambda: {"log": log.to_dict()})
    bar.close()


def _encode_pairs(encoder: Encoder, chunk: list, log: SkipLog) -> Iterator[dict[str, Any]]:
    """Both sides of every pair (chosen at 2*row, rejected at 2*row + 1); a pair goes whole and
    is counted once (the chosen side's reason first)."""
    sides = PairSkips(log)
    chosen = encoder.encode([p.chosen for p in chunk], sides)
    rejected = encoder.encode([p.rejected for p in chunk], sides)
    for p, c, r in zip(chunk, chosen, rejected):
        sides.settle(p.location, kept=c is not None and r is not None)
        if c is None or r is None:
            continue
        for side, enc in ((0, c), (1, r)):
            yield _record(2 * p.row + side, enc)


def _record(index: int, enc: Any) -> dict[str, Any]:
    return {
        "index": index,
        "example_id": enc.example_id,
        "input_ids": enc.input_ids,
        "loss_mask": enc.loss_mask,
    }


def _write_manifest(
    cfg: DataConfig,
    fields: dict[str, Any],
    directory: Path,
    store: TokenizedStore,
    log: SkipLog,
    pairs: bool,
) -> None:
    """The data set's own manifest: what it holds and what could not be used, and where."""
    manifest = {
        "fields": fields,
        "path": storage.resolved(cfg.path),
        "n_examples": len(store),
        **({"n_pairs": len(store) // 2} if pairs else {}),  # a pair is stored as two examples
        "n_tokens": int(store.lengths.sum()),
        **log.to_dict(),
    }
    text = dumps_json(manifest, indent=1, sort_keys=True)
    mpath = directory / "manifest.json"
    if not mpath.is_file() or mpath.read_text() != text:
        write_atomic(mpath, text)


class Mixture(_Batched):
    """Several prepared data sets as one (e.g. the pools of a `davir select` output); example i
    of the mixture is example i - offset of the part that holds it."""

    def __init__(self, parts: list[TokenizedData], cfg: DataConfig) -> None:
        if not parts:
            raise DataError("a mixture needs at least one data set")
        self.parts, self.cfg = parts, cfg
        self.offsets = np.cumsum([0] + [len(p) for p in parts])
        self.lengths = np.concatenate([p.lengths for p in parts])
        self.example_ids = [i for p in parts for i in p.example_ids]
        self.log = SkipLog()
        for p in parts:
            self.log.merge(p.log)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def get(self, idx: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        where = np.searchsorted(self.offsets, idx, side="right") - 1
        out: list[Any] = [None] * len(idx)
        for k in np.unique(where):
            pos = np.flatnonzero(where == k)
            local = [int(idx[j] - self.offsets[k]) for j in pos]
            for j, item in zip(pos, self.parts[k].get(local)):
                out[j] = item
        return out
