//! Sharded stage one: n processes (`--shard i/n`) fill one cache directory; their shards read as
//! one split equal the unsharded cache row for row, bit for bit; train and stats read the
//! directory; a missing or foreign shard is refused by name.

use super::common::{fails, ok, precomputed, refdpo};
use refdpo::cache::{self, Fingerprint, MappedCache};

fn rows(m: &MappedCache) -> Vec<refdpo::cache::CacheRow> {
    (0..m.len()).map(|i| m.to_row(i)).collect()
}

#[test]
fn two_shard_processes_equal_the_unsharded_cache() {
    let (tmp, cfg) = precomputed("max_steps = 3");
    let cfg_s = cfg.to_str().unwrap();
    let whole = tmp.path().join("cache");
    let sharded = tmp.path().join("sharded");
    let out = format!("precompute.out={}", sharded.display());
    // both shards at once, as two processes on two GPUs or hosts would run
    let children: Vec<_> = ["0/2", "1/2"]
        .iter()
        .map(|s| {
            std::process::Command::new(env!("CARGO_BIN_EXE_refdpo"))
                .args([
                    "precompute",
                    "--config",
                    cfg_s,
                    "--quiet",
                    "--set",
                    &out,
                    "--shard",
                    s,
                ])
                .current_dir(tmp.path())
                .env("HF_HUB_OFFLINE", "1")
                .output()
                .unwrap()
        })
        .collect();
    for c in &children {
        assert!(c.status.success(), "{}", String::from_utf8_lossy(&c.stderr));
    }
    for split in ["train_prefs", "test_prefs"] {
        for i in 0..2 {
            let stem = format!("{split}.shard-{i}-of-2");
            assert!(sharded.join(format!("{stem}.parquet")).exists(), "{stem}");
            assert!(sharded.join(format!("{stem}.arrow")).exists(), "{stem}");
            assert!(sharded.join(format!("report.shard-{i}-of-2.json")).exists());
        }
        let a = MappedCache::open(&cache::arrow_path(&whole, split)).unwrap();
        let expected: Fingerprint = a.fingerprint.clone();
        let b = cache::shards::open(&sharded, split, &expected)
            .unwrap()
            .unwrap();
        assert_eq!(b.fingerprint, expected);
        let (ra, rb) = (rows(&a), rows(&b));
        assert_eq!(ra.len(), rb.len(), "{split}");
        for (x, y) in ra.iter().zip(&rb) {
            // ids and log-probs bit-equal
            assert_eq!(x, y, "{split} row {}", x.row);
            assert_eq!(x.ref_chosen_logps.to_bits(), y.ref_chosen_logps.to_bits());
            assert_eq!(
                x.ref_rejected_logps.to_bits(),
                y.ref_rejected_logps.to_bits()
            );
        }
    }
    // train and stats on the sharded directory
    let cache_set = format!("train.cache={}", sharded.display());
    let run = format!("train.out={}", tmp.path().join("run-sharded").display());
    ok(
        &[
            "train", "--config", cfg_s, "--quiet", "--set", &cache_set, "--set", &run,
        ],
        tmp.path(),
    );
    let stats_whole = ok(
        &["stats", "--cache", whole.to_str().unwrap(), "--json"],
        tmp.path(),
    );
    let stats_sharded = ok(
        &["stats", "--cache", sharded.to_str().unwrap(), "--json"],
        tmp.path(),
    );
    // the same statistics, drops included (polars sums two files in another order: 1e-12)
    let (a, b): (serde_json::Value, serde_json::Value) = (
        serde_json::from_str(&stats_whole).unwrap(),
        serde_json::from_str(&stats_sharded).unwrap(),
    );
    assert_close(&a, &b, "stats");

    // a shard's files copied over another's are refused by stats too, naming the file
    let copy = tmp.path().join("copied");
    std::fs::create_dir_all(&copy).unwrap();
    for f in std::fs::read_dir(&sharded).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, copy.join(f.file_name().unwrap())).unwrap();
    }
    std::fs::copy(
        copy.join("train_prefs.shard-1-of-2.parquet"),
        copy.join("train_prefs.shard-0-of-2.parquet"),
    )
    .unwrap();
    let err = fails(&["stats", "--cache", copy.to_str().unwrap()], tmp.path());
    assert!(
        err.contains("train_prefs.shard-0-of-2.parquet") && err.contains("shard"),
        "{err}"
    );

    // ... and a split's files holding another split: stats read the test split as
    // `train_prefs` (its pairs beside the train split's row count), exit 0
    let swapped = tmp.path().join("swapped");
    std::fs::create_dir_all(&swapped).unwrap();
    for split in ["train_prefs", "test_prefs"] {
        std::fs::copy(
            whole.join("test_prefs.parquet"),
            swapped.join(format!("{split}.parquet")),
        )
        .unwrap();
    }
    let err = fails(&["stats", "--cache", swapped.to_str().unwrap()], tmp.path());
    assert!(
        err.contains("train_prefs.parquet") && err.contains("split"),
        "{err}"
    );

    // a missing shard is refused by name
    for ext in ["parquet", "arrow"] {
        std::fs::remove_file(sharded.join(format!("train_prefs.shard-1-of-2.{ext}"))).unwrap();
    }
    let run2 = format!("train.out={}", tmp.path().join("run-2").display());
    let err = fails(
        &[
            "train", "--config", cfg_s, "--quiet", "--set", &cache_set, "--set", &run2,
        ],
        tmp.path(),
    );
    assert!(
        err.contains("train_prefs.shard-1-of-2.arrow") && err.contains("--shard 1/2"),
        "{err}"
    );
    // ... and a shard of another count, or from other inputs
    let out3 = format!("precompute.out={}", sharded.display());
    let third = refdpo(
        &[
            "precompute",
            "--config",
            cfg_s,
            "--quiet",
            "--set",
            &out3,
            "--shard",
            "0/3",
        ],
        tmp.path(),
    );
    assert!(third.status.success());
    let err = fails(&["stats", "--cache", sharded.to_str().unwrap()], tmp.path());
    assert!(err.contains("another sharding"), "{err}");
    let err = fails(
        &["precompute", "--config", cfg_s, "--shard", "2/2"],
        tmp.path(),
    );
    assert!(err.contains("0 <= i < n"), "{err}");
    // a count past any use (the fuzzer's 2^64 - 1 wrote empty shards a reader listed one by one)
    let err = fails(
        &[
            "precompute",
            "--config",
            cfg_s,
            "--shard",
            "0/18446744073709551615",
        ],
        tmp.path(),
    );
    assert!(err.contains("more than 65536"), "{err}");
}

/// Shards scored under different `precompute.chunk_pairs` hold ranges of the split that do not
/// tile it (here pairs 0..64 and 80..160 of 160: 16 missing); every reader refuses the split,
/// naming the shard, where it read 144 pairs as the split. Rescored under one setting, it reads.
#[test]
fn shards_of_different_chunk_pairs_are_refused_by_every_reader() {
    let (tmp, cfg) = precomputed("max_steps = 1");
    let cfg_s = cfg.to_str().unwrap();
    let sharded = tmp.path().join("sharded");
    let out = format!("precompute.out={}", sharded.display());
    let shard = |i: &str, chunk: &str| {
        let chunk = format!("precompute.chunk_pairs={chunk}");
        ok(
            &[
                "precompute",
                "--config",
                cfg_s,
                "--quiet",
                "--set",
                &out,
                "--set",
                &chunk,
                "--shard",
                i,
            ],
            tmp.path(),
        );
    };
    shard("0/2", "32");
    shard("1/2", "16");
    let cache_set = format!("train.cache={}", sharded.display());
    let run = format!("train.out={}", tmp.path().join("run-mixed").display());
    for err in [
        fails(&["stats", "--cache", sharded.to_str().unwrap()], tmp.path()),
        fails(
            &[
                "train", "--config", cfg_s, "--set", &cache_set, "--set", &run,
            ],
            tmp.path(),
        ),
    ] {
        assert!(
            err.contains("train_prefs.shard-1-of-2")
                && err.contains("holds pairs 80..")
                && err.contains("end at pair 64")
                && err.contains("precompute.chunk_pairs"),
            "{err}"
        );
    }
    // shard 1 again under shard 0's setting: the split reads whole
    shard("1/2", "32");
    ok(&["stats", "--cache", sharded.to_str().unwrap()], tmp.path());
}

/// Equal JSON, numbers within 1e-12 relative.
fn assert_close(a: &serde_json::Value, b: &serde_json::Value, at: &str) {
    use serde_json::Value;
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            assert!(
                (x - y).abs() <= 1e-12 * x.abs().max(1.0),
                "{at}: {x} vs {y}"
            );
        }
        (Value::Object(x), Value::Object(y)) => {
            assert_eq!(x.len(), y.len(), "{at}");
            for (k, v) in x {
                assert_close(v, &y[k], &format!("{at}.{k}"));
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            assert_eq!(x.len(), y.len(), "{at}");
            for (i, (v, w)) in x.iter().zip(y).enumerate() {
                assert_close(v, w, &format!("{at}[{i}]"));
            }
        }
        _ => assert_eq!(a, b, "{at}"),
    }
}
