"""Reading a refdpo cache directory (SPEC, "The cache"): a split is `<split>.arrow`, or its shards
`<split>.shard-<i>-of-<n>.arrow` read in row order. Every file is verified as stage two verifies
it before a row is used: the xxh3-64 of the whole file with the `refdpo.xxh3` value of its
footer's metadata (`whole:<hex>`) read as `whole:????????????????` (files written before it:
`<len>:<hex>`, of every byte before the footer); the fingerprint is the schema's
`refdpo.fingerprint` (JSON).
"""

import json
import math
import mmap
import os
import re

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import xxhash

CHECKSUM_KEY = b"refdpo.xxh3"
WHOLE = b"whole:"
PLACEHOLDER = b"whole:????????????????"
FINGERPRINT_KEY = b"refdpo.fingerprint"


class CacheError(Exception):
    """A cache file that is missing, damaged or not refdpo's, named with the fix."""


def cache_files(path, split="train_prefs"):
    """The Arrow files of `split` in `path`, in row order (one file, or all n shards)."""
    whole = os.path.join(path, f"{split}.arrow")
    # only the names refdpo writes (`01` is another file, as the Rust reader reads it)
    shard = re.compile(rf"^{re.escape(split)}\.shard-(0|[1-9]\d*)-of-([1-9]\d*)\.arrow$")
    shards = {}
    for name in os.listdir(path) if os.path.isdir(path) else []:
        m = shard.match(name)
        if m:
            shards[(int(m.group(1)), int(m.group(2)))] = os.path.join(path, name)
    if os.path.isfile(whole):
        if shards:
            raise CacheError(f"{path}: holds {split}.arrow and shards of it; remove one or the other")
        return [whole]
    if not shards:
        raise CacheError(
            f"{whole}: no such cache file (nor shards of it): run `refdpo precompute` for split {split!r}"
        )
    counts = {n for _, n in shards}
    if len(counts) != 1:
        raise CacheError(f"{path}: shards of {split} from different counts {sorted(counts)}: remove the stale ones")
    n = counts.pop()
    # the first missing shard, found among the ones there (a name may claim 2^64 shards)
    missing = next((i for i in range(len(shards) + 1) if (i, n) not in shards), None)
    if missing is not None and missing < n:
        name = f"{split}.shard-{missing}-of-{n}.arrow"
        raise CacheError(f"{os.path.join(path, name)}: missing: run `refdpo precompute --shard {missing}/{n}`")
    stray = sorted(i for i, _ in shards if i >= n)
    if stray:
        raise CacheError(f"{shards[(stray[0], n)]}: shard {stray[0]} of {n} does not exist: remove it")
    return [shards[(i, n)] for i in range(n)]


def _verify(path):
    """The file's reader, after its checksum was verified."""
    try:
        # memory-mapped: the rows are read in place, shared with the page cache by every process
        reader = ipc.open_file(pa.memory_map(str(path), "r"))
    except (pa.ArrowException, OSError) as e:
        raise CacheError(f"{path}: not a readable Arrow file ({e}): re-run `refdpo precompute`") from e
    stored = (reader.metadata or {}).get(CHECKSUM_KEY)
    if stored is None:
        raise CacheError(f"{path}: no `refdpo.xxh3` checksum in its footer: not a refdpo cache file")
    if stored.startswith(WHOLE):
        ok = _whole_matches(path, stored)
    else:
        try:
            length, digest = stored.decode().split(":")
            length, digest = int(length), int(digest, 16)
            if not 0 <= length <= os.path.getsize(path):
                raise ValueError(f"a length of {length} bytes")
        except ValueError as e:
            raise CacheError(f"{path}: unreadable checksum {stored!r}") from e
        with open(path, "rb") as f:
            covered = f.read(length)
        ok = len(covered) == length and xxhash.xxh3_64_intdigest(covered) == digest
    if not ok:
        raise CacheError(
            f"{path}: damaged: its bytes do not match their checksum; re-run `refdpo precompute` "
            "(it scores the damaged file again)"
        )
    return reader


def _whole_matches(path, stored):
    """The file hashed with its stored value read as the placeholder equals the value."""
    try:
        digest = int(stored[len(WHOLE):].decode(), 16)
    except ValueError as e:
        raise CacheError(f"{path}: unreadable checksum {stored!r}") from e
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size < 10:
            return False
        # hashed through a memory map: the file is never copied into the process
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            data = memoryview(m)
            try:
                footer_len = int.from_bytes(data[-10:-6], "little", signed=True)
                start = len(data) - 10 - footer_len
                footer = bytes(data[start : len(data) - 10]) if start >= 0 else b""
                if len(stored) != len(PLACEHOLDER) or start < 0 or footer.count(stored) != 1:
                    return False
                at = start + footer.index(stored)
                h = xxhash.xxh3_64()
                h.update(data[:at])
                h.update(PLACEHOLDER)
                h.update(data[at + len(stored) :])
                return h.intdigest() == digest
            finally:
                data.release()


def _no_constant(name):
    raise ValueError(f"{name} is not a JSON number")


def _fingerprint(path, reader):
    raw = (reader.schema.metadata or {}).get(FINGERPRINT_KEY)
    if raw is None:
        raise CacheError(f"{path}: no `refdpo.fingerprint` in its schema: re-run `refdpo precompute`")
    try:
        fingerprint = json.loads(raw, parse_constant=_no_constant)
    except ValueError as e:  # JSONDecodeError, a bad UTF-8 byte, NaN or Infinity
        raise CacheError(f"{path}: its fingerprint is not JSON ({e}): re-run `refdpo precompute`") from None
    if not isinstance(fingerprint, dict):
        raise CacheError(
            f"{path}: its fingerprint is a JSON {type(fingerprint).__name__}, not an object: re-run `refdpo precompute`"
        )
    return fingerprint


# Stage two's bounds on a pair (`cache::impossible_pair` in refdpo's source): a reference log-prob
# sum is at most MAX_REF_LOGP and at least MIN_REF_LOGP_PER_TOKEN per completion token.
MAX_REF_LOGP = 1e-2
MIN_REF_LOGP_PER_TOKEN = -1e4
COLLATOR_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logps", "ref_rejected_logps")


def _impossible(prompt, chosen, rejected, refs, max_length, truncation):
    """Why a pair cannot be stage one's (None: it can), as stage two judges it."""
    if not (prompt and chosen and rejected):
        return f"an empty sequence ({prompt} prompt, {chosen} chosen, {rejected} rejected ids)"
    room = (max_length - prompt if truncation == "keep_start" else max_length) if isinstance(max_length, int) else None
    if room is not None and max(chosen, rejected) > room:
        return (
            f"answers of {chosen} and {rejected} ids after a {prompt}-id prompt, more than `max_length` "
            f"{max_length} keeps ({truncation})"
        )
    for logp, tokens in zip(refs, (chosen, rejected)):
        if not (
            isinstance(logp, float)
            and math.isfinite(logp)
            and MIN_REF_LOGP_PER_TOKEN * tokens <= logp <= MAX_REF_LOGP
        ):
            return (
                f"reference log-probs {list(refs)} over {chosen} and {rejected} completion tokens, not finite sums "
                f"between {MIN_REF_LOGP_PER_TOKEN:g} per token and 0"
            )
    return None


def _check_rows(files, tables, fingerprint):
    """Every pair of the split possible, as stage two checks each before training: the collator's
    columns there, no empty sequence, answers within the truncation's `max_length`, reference sums
    finite and within bounds. TRL would train on such rows without a word."""
    first = 0
    for f, t in zip(files, tables):
        missing = [c for c in COLLATOR_COLUMNS if c not in t.column_names]
        if missing:
            raise CacheError(f"{f}: cache column `{missing[0]}` is missing: re-run `refdpo precompute`")
        lens = [pc.list_value_length(t[c]).fill_null(0).to_pylist() for c in COLLATOR_COLUMNS[:3]]
        refs = [t[c].to_pylist() for c in COLLATOR_COLUMNS[3:]]
        for i, (p, c, r, rc, rr) in enumerate(zip(*lens, *refs)):
            why = _impossible(
                p, c, r, (rc, rr), fingerprint.get("max_length"), fingerprint.get("truncation", "keep_start")
            )
            if why:
                raise CacheError(
                    f"{f}: pair {first + i} has {why}: the file is damaged or not stage one's; re-run `refdpo precompute`"
                )
        first += t.num_rows


def _shard_of(path, split):
    """The shard a file's name says it holds ("i/n"), or None for the whole split."""
    m = re.match(rf"^{re.escape(split)}\.shard-(\d+)-of-(\d+)\.arrow$", os.path.basename(path))
    return f"{int(m.group(1))}/{int(m.group(2))}" if m else None


def _check_identity(files, fingerprints, split):
    """Each file holds what its name says, as stage two checks it: the split asked for, the shard
    its name gives, and one cache's fingerprint besides (a file copied over another is refused,
    naming it)."""
    own = ("shard", "shard_pairs")  # each shard's own
    base = {k: v for k, v in fingerprints[0].items() if k not in own}
    for f, fp in zip(files, fingerprints):
        if fp.get("split") != split:
            raise CacheError(
                f"{f}: holds split {fp.get('split')!r}, not {split!r}: a file copied or renamed; "
                "re-run `refdpo precompute` (with --overwrite)"
            )
        if fp.get("shard") != _shard_of(f, split):
            raise CacheError(
                f"{f}: holds shard {fp.get('shard')!r} of {split!r}, not the {_shard_of(f, split)!r} "
                "its name says: a file copied or renamed; re-run that shard's `refdpo precompute`"
            )
        other = sorted(k for k in set(base) | set(fp) if k not in own and base.get(k) != fp.get(k))
        if other:
            raise CacheError(
                f"{f}: made from other inputs than {files[0]} (fingerprint field `{other[0]}`): "
                "re-run its shard's `refdpo precompute` with the same config"
            )


def _check_tiling(files, fingerprints, split):
    """A split's shards, in order, hold its pairs once each: their `shard_pairs` ("start..end of
    n") tile 0..n, as stage two checks it. Shards scored under different `precompute.chunk_pairs`
    would read as a split with pairs missing or repeated. (Shards that all predate the span carry
    none and are not checked; one of them among shards that carry it is refused.)"""
    spans = [fp.get("shard_pairs") for fp in fingerprints]
    if len(files) < 2 or not any(spans):
        return
    for f, s in zip(files, spans):
        if not s:
            raise CacheError(
                f"{f}: was made before shards recorded the pairs they hold, unlike the other shards of "
                f"{split!r}: re-run this shard's `refdpo precompute` with the others' config"
            )
    parsed = []
    for f, s in zip(files, spans):
        m = re.fullmatch(r"(\d+)\.\.(\d+) of (\d+)", s)
        if not m:
            raise CacheError(f"{f}: `shard_pairs` is {s!r}, not 'start..end of n'")
        parsed.append(tuple(int(x) for x in m.groups()))
    total, end = parsed[0][2], 0
    for f, (a, b, n) in zip(files, parsed):
        if a != end or n != total or b < a:
            raise CacheError(
                f"{f}: holds pairs {a}..{b} of {n} of {split!r}, where the shards before it end at pair "
                f"{end} of {total}: the shards were scored under different `precompute.chunk_pairs`; re-run "
                "every shard's `refdpo precompute` with one config"
            )
        end = b
    if end != total:
        raise CacheError(f"{files[-1]}: the shards of {split!r} end at pair {end} of {total}: re-run every shard")


def read_fingerprint(path, split="train_prefs"):
    """What made the split's cache (model, tokenizer, chat template, max_length, ...) as a dict:
    its first file's, verified, and checked to hold `split`."""
    first = cache_files(path, split)[0]
    fingerprint = _fingerprint(first, _verify(first))
    _check_identity([first], [fingerprint], split)
    return fingerprint


def load_cache(path, split="train_prefs"):
    """The split's rows as a `datasets.Dataset` with the cache's columns (`prompt_ids`,
    `chosen_ids`, `rejected_ids`, `ref_chosen_logps`, `ref_rejected_logps`, ...), every file
    verified first; shards are concatenated in row order."""
    import datasets

    files = cache_files(path, split)
    readers = [_verify(f) for f in files]
    fingerprints = [_fingerprint(f, r) for f, r in zip(files, readers)]
    _check_identity(files, fingerprints, split)
    _check_tiling(files, fingerprints, split)
    fingerprint = {k: v for k, v in fingerprints[0].items() if k not in ("shard", "shard_pairs")}
    tables = [r.read_all() for r in readers]
    _check_rows(files, tables, fingerprint)
    if sum(t.num_rows for t in tables) == 0:
        raise CacheError(f"{files[0]}: the split {split!r} holds no pairs: re-run `refdpo precompute` on data with some")
    table = pa.concat_tables(tables).replace_schema_metadata(None)
    # The fingerprint rides in the dataset's info, which `select`, `shuffle` and `filter` keep, so
    # `refdpo.trl.CachedReferenceDPOTrainer` can check the cache against its model and config.
    info = datasets.DatasetInfo(description=FINGERPRINT_INFO + json.dumps(fingerprint, sort_keys=True))
    return datasets.Dataset(table, info=info)


FINGERPRINT_INFO = "refdpo cache; fingerprint: "

# What a cache's reference log-probs depend on (the files' hashes, not the names they were loaded
# by): datasets joined from caches that agree on these (other splits, other data) hold one
# reference's log-probs.
REFERENCE_FIELDS = (
    "weights_sha256", "model_config_sha256", "tokenizer_sha256",
    "tokenizer_config_sha256", "chat_template_sha256", "max_length", "truncation", "dtype", "scoring",
)


def fingerprint_of(dataset):
    """The fingerprint of a dataset `load_cache` made (kept through `select`, `shuffle`, ...), or
    None for any other dataset. Datasets concatenated from caches of one reference
    (`datasets.concatenate_datasets`, which joins their descriptions: other splits, other data, the
    same model, tokenizer and tokenization) have the first's fingerprint with `split` naming them
    all ("train_prefs+test_prefs"); from caches of different references, a `CacheError` naming the
    field."""
    text = getattr(getattr(dataset, "info", None), "description", None) or ""
    if not text.startswith(FINGERPRINT_INFO):
        return None
    parts = text.split("\n\n" + FINGERPRINT_INFO)
    parts[0] = parts[0][len(FINGERPRINT_INFO):]
    try:
        fingerprints = [json.loads(p) for p in parts]
    except json.JSONDecodeError as e:
        raise CacheError(
            f"the dataset's description starts as a refdpo cache's but does not hold its fingerprint ({e}): "
            "read the cache with refdpo.load_cache and concatenate only such datasets"
        ) from None
    first = fingerprints[0]
    for other in fingerprints[1:]:
        differs = [k for k in REFERENCE_FIELDS if first.get(k) != other.get(k)]
        if differs:
            raise CacheError(
                f"the dataset joins caches made from other inputs (fingerprint field `{differs[0]}`: "
                f"{first.get(differs[0])!r} and {other.get(differs[0])!r}): their reference log-probs are of "
                "different references; concatenate splits of one cache only"
            )
    if len(fingerprints) > 1:
        splits = []
        for fp in fingerprints:
            if fp.get("split") not in splits:
                splits.append(fp.get("split"))
        first = dict(first, split="+".join(splits))
    return first
