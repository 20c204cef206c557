"""refdpo.load_cache and read_fingerprint on caches the refdpo binary writes ($REFDPO_BIN):
the rows equal the Parquet file stage one writes beside the Arrow one (read by pyarrow, an
independent reader), shards read in row order equal the unsharded cache, and a damaged or
missing file is refused by name.

    REFDPO_BIN=target/debug/refdpo PYTHONPATH=python python -m pytest python/tests
"""

import os
import shutil
import subprocess

import pyarrow.parquet as pq
import pytest

import refdpo

BIN = os.environ.get("REFDPO_BIN", "refdpo")
COLLATOR = ["prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logps", "ref_rejected_logps"]


def pipeline(d, out):
    cfg = os.path.join(d, "pipeline.toml")
    with open(cfg, "w") as f:
        f.write(f"""
[demo]
generate = true
dir = "{d}/demo"
train_rows = 96
test_rows = 32
[dataset]
id = "{d}/demo/dataset"
[model]
id = "{d}/demo/model"
dtype = "f32"
[tokenize]
max_length = 96
[precompute]
batch_size = 16
chunk_pairs = 16
out = "{out}"
""")
    return cfg


def precompute(cfg, *args):
    subprocess.run([BIN, "precompute", "--config", cfg, "--quiet", *args], check=True)


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("refdpo"))
    whole, sharded = os.path.join(d, "cache"), os.path.join(d, "sharded")
    precompute(pipeline(d, whole))
    cfg = pipeline(d, sharded)
    for i in range(2):
        precompute(cfg, "--shard", f"{i}/2")
    return whole, sharded


def test_rows_equal_the_parquet_file_stage_one_writes(caches):
    whole, _ = caches
    ds = refdpo.load_cache(whole, "train_prefs")
    assert set(COLLATOR) <= set(ds.column_names)
    want = pq.read_table(os.path.join(whole, "train_prefs.parquet")).replace_schema_metadata(None)
    assert ds.num_rows == want.num_rows > 0
    for col in COLLATOR + ["row", "prompt_id"]:
        assert ds[col] == want.column(col).to_pylist(), col
    test = refdpo.load_cache(whole, "test_prefs")
    assert test.num_rows == pq.read_metadata(os.path.join(whole, "test_prefs.parquet")).num_rows


def test_the_fingerprint_says_what_made_the_cache(caches):
    whole, _ = caches
    fp = refdpo.read_fingerprint(whole, "train_prefs")
    assert fp["split"] == "train_prefs" and fp["max_length"] == 96
    assert fp["truncation"] == "keep_start"
    assert len(fp["weights_sha256"]) == 64 and len(fp["tokenizer_sha256"]) == 64


def test_shards_read_in_row_order_equal_the_whole_split(caches):
    whole, sharded = caches
    assert len(refdpo.cache_files(sharded, "train_prefs")) == 2
    a, b = refdpo.load_cache(whole), refdpo.load_cache(sharded)
    for col in COLLATOR + ["row"]:
        assert a[col] == b[col], col


def test_a_file_holding_another_split_or_shard_is_refused_by_name(caches, tmp_path):
    """Each file's checksum holds, so only its fingerprint tells: the test split copied over the
    train split read 32 test rows as `train_prefs`, and shard 0 copied over shard 1 read shard 0
    twice (the second half of the split never seen), as stage two refuses both."""
    whole, sharded = caches
    swap = tmp_path / "swap"
    shutil.copytree(whole, swap)
    shutil.copy(swap / "test_prefs.arrow", swap / "train_prefs.arrow")
    for read in (refdpo.load_cache, refdpo.read_fingerprint):
        with pytest.raises(refdpo.CacheError, match=r"train_prefs.arrow: holds split 'test_prefs', not 'train_prefs'"):
            read(str(swap), "train_prefs")
    assert len(refdpo.load_cache(str(swap), "test_prefs")) == len(refdpo.load_cache(str(whole), "test_prefs"))
    copied = tmp_path / "copied"
    shutil.copytree(sharded, copied)
    shutil.copy(copied / "train_prefs.shard-0-of-2.arrow", copied / "train_prefs.shard-1-of-2.arrow")
    with pytest.raises(refdpo.CacheError, match=r"shard-1-of-2.arrow: holds shard '0/2' of 'train_prefs', not the '1/2'"):
        refdpo.load_cache(str(copied))
    # a shard of another cache (other inputs): named by its first differing field
    other = tmp_path / "other"
    shutil.copytree(sharded, other)
    shutil.copy(os.path.join(whole, "train_prefs.arrow"), other / "train_prefs.shard-1-of-2.arrow")
    with pytest.raises(refdpo.CacheError, match=r"shard-1-of-2.arrow: holds shard None"):
        refdpo.load_cache(str(other))


def test_a_damaged_or_missing_file_is_refused_by_name(caches, tmp_path):
    whole, sharded = caches
    bad = tmp_path / "bad"
    shutil.copytree(whole, bad)
    path = bad / "train_prefs.arrow"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(refdpo.CacheError, match="train_prefs.arrow: damaged"):
        refdpo.load_cache(str(bad))
    # the footer too: its column names swapped (prompts read as chosen answers), no byte of data changed
    shutil.copy(os.path.join(whole, "train_prefs.arrow"), path)
    data = bytearray(path.read_bytes())
    footer_len = int.from_bytes(data[-10:-6], "little", signed=True)
    start = len(data) - 10 - footer_len
    footer = bytes(data[start : len(data) - 10])
    mark = b"@" * 10
    assert mark not in footer
    swapped = footer.replace(b"prompt_ids", mark).replace(b"chosen_ids", b"prompt_ids").replace(mark, b"chosen_ids")
    assert swapped != footer
    data[start : len(data) - 10] = swapped
    path.write_bytes(bytes(data))
    with pytest.raises(refdpo.CacheError, match="train_prefs.arrow: damaged"):
        refdpo.load_cache(str(bad))
    # a checksum value of the older `<length>:<hex>` form with a length past any file: a
    # CacheError, not Python's OverflowError (fuzzer)
    shutil.copy(os.path.join(whole, "train_prefs.arrow"), path)
    data = path.read_bytes()
    stored = data[data.index(b"whole:") : data.index(b"whole:") + 22]
    path.write_bytes(data.replace(stored, b"9" * 20 + b":0"))
    with pytest.raises(refdpo.CacheError, match="unreadable checksum"):
        refdpo.load_cache(str(bad))
    part = tmp_path / "part"
    shutil.copytree(sharded, part)
    # a copy under a name refdpo never writes (`01`) is no shard, to Python as to Rust (fuzzer)
    shutil.copy(part / "train_prefs.shard-1-of-2.arrow", part / "train_prefs.shard-01-of-2.arrow")
    assert refdpo.load_cache(str(part)).num_rows == refdpo.load_cache(str(sharded)).num_rows
    os.remove(part / "train_prefs.shard-01-of-2.arrow")
    os.remove(part / "train_prefs.shard-1-of-2.arrow")
    with pytest.raises(refdpo.CacheError, match=r"shard-1-of-2.arrow: missing: run `refdpo precompute --shard 1/2`"):
        refdpo.load_cache(str(part))
    with pytest.raises(refdpo.CacheError, match="no such cache file"):
        refdpo.load_cache(str(tmp_path), "train_prefs")


def test_shards_of_different_chunk_pairs_are_refused(caches, tmp_path):
    """Shards scored under different `precompute.chunk_pairs` do not tile the split (pairs missing
    or repeated): refused by name, as stage two refuses them."""
    whole, sharded = caches
    mixed = tmp_path / "mixed"
    shutil.copytree(sharded, mixed)
    d = os.path.dirname(whole)
    precompute(pipeline(d, str(mixed)), "--shard", "1/2", "--set", "precompute.chunk_pairs=40")
    with pytest.raises(refdpo.CacheError, match=r"shard-1-of-2.arrow: holds pairs 40.*end at pair 48.*chunk_pairs"):
        refdpo.load_cache(str(mixed))
    # the good sharded cache reads, its fingerprint the whole split's
    assert "shard_pairs" not in refdpo.fingerprint_of(refdpo.load_cache(sharded))


def test_shard_spans_must_tile_the_split():
    """The tiling check itself: a gap, an overlap, a shard without a span among shards with one."""
    from refdpo.cache import _check_tiling

    files = ["t.shard-0-of-2.arrow", "t.shard-1-of-2.arrow"]
    _check_tiling(files, [{"shard_pairs": "0..9 of 27"}, {"shard_pairs": "9..27 of 27"}], "t")
    _check_tiling(files, [{}, {}], "t")
    for spans, says in [
        (["0..9 of 27", "12..27 of 27"], "end at pair 9"),
        (["0..12 of 27", "9..27 of 27"], "end at pair 12"),
        (["0..9 of 27", None], "made before shards recorded"),
    ]:
        with pytest.raises(refdpo.CacheError, match=says):
            _check_tiling(files, [{"shard_pairs": s} if s else {} for s in spans], "t")


def test_impossible_rows_under_a_valid_checksum_are_refused_by_pair(caches):
    """The rows stage two refuses (`cache::impossible_pair`), refused here too: TRL would train on
    them. The check itself, over the cache's own rows edited (a re-sealed file reads the same)."""
    import pyarrow as pa

    from refdpo.cache import _check_rows

    whole, _ = caches
    path = os.path.join(whole, "train_prefs.arrow")
    fp = refdpo.read_fingerprint(whole)
    rows = refdpo.load_cache(whole).data.table.to_pylist()
    _check_rows([path], [pa.Table.from_pylist(rows)], fp)
    edits = [
        (lambda r: r.update(ref_chosen_logps=float("nan")), "pair 3 has reference log-probs"),
        (lambda r: r.update(ref_chosen_logps=5.0), "pair 3 has reference log-probs"),
        (lambda r: r.update(ref_rejected_logps=-1e300), "pair 3 has reference log-probs"),
        (lambda r: r.update(prompt_ids=[]), "pair 3 has an empty sequence"),
        (lambda r: r.update(chosen_ids=r["chosen_ids"] * 20), r"pair 3 has answers of .* more than `max_length` 96"),
    ]
    for edit, says in edits:
        bad = [dict(r) for r in rows]
        edit(bad[3])
        with pytest.raises(refdpo.CacheError, match=says):
            _check_rows([path], [pa.Table.from_pylist(bad)], fp)
    dropped = pa.Table.from_pylist(rows).drop_columns(["ref_rejected_logps"])
    with pytest.raises(refdpo.CacheError, match="cache column `ref_rejected_logps` is missing"):
        _check_rows([path], [dropped], fp)


def test_a_damaged_fingerprint_or_a_shard_count_past_any_is_a_cache_error(tmp_path):
    """Raised as CacheError naming the file, not as JSON's or Python's own errors; a shard name
    claiming 2^64 shards names the first missing one at once (it had listed them all)."""
    from refdpo.cache import FINGERPRINT_KEY, _fingerprint, cache_files

    class Reader:
        def __init__(self, raw):
            self.schema = type("S", (), {"metadata": {FINGERPRINT_KEY: raw}})()

    for raw, says in [
        (b"not json {", "is not JSON"),
        (b'{"limit": NaN}', "is not JSON"),
        (b"[1, 2]", "is a JSON list, not an object"),
    ]:
        with pytest.raises(refdpo.CacheError, match=f"f.arrow: its fingerprint {says}"):
            _fingerprint("f.arrow", Reader(raw))
    n = 2**64 - 1
    (tmp_path / f"train_prefs.shard-0-of-{n}.arrow").write_bytes(b"")
    with pytest.raises(refdpo.CacheError, match=f"shard-1-of-{n}.arrow: missing"):
        cache_files(str(tmp_path))
