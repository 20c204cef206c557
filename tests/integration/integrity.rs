//! Cache integrity: a flipped bit in a cache file is refused by name by every reader — stage two,
//! `stats` — and stage one scores the split again instead of trusting it.

use super::common::{fails, ok, precomputed, refdpo, rewrite_cache};
use refdpo::cache;

fn flip_middle_bit(path: &std::path::Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x20;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn a_flipped_bit_is_refused_by_train_and_stats_and_rescored_by_precompute() {
    let (tmp, cfg) = precomputed("max_steps = 1");
    let cfg_s = cfg.to_str().unwrap();
    let out = tmp.path().join("cache");
    let (arrow, pq) = (
        cache::arrow_path(&out, "train_prefs"),
        cache::parquet_path(&out, "train_prefs"),
    );
    let clean = (std::fs::read(&arrow).unwrap(), std::fs::read(&pq).unwrap());

    flip_middle_bit(&arrow);
    let err = fails(&["train", "--config", cfg_s, "--quiet"], tmp.path());
    assert!(
        err.contains("train_prefs.arrow") && err.contains("refdpo precompute"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    flip_middle_bit(&pq);
    let out_s = out.to_str().unwrap();
    let err = fails(&["stats", "--cache", out_s, "--json"], tmp.path());
    assert!(
        err.contains("train_prefs.parquet") && err.contains("checksum"),
        "{err}"
    );

    // Stage one does not trust the files either: it scores the split again, to the same bytes.
    let run = refdpo(&["precompute", "--config", cfg_s, "--quiet"], tmp.path());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(
        stderr.contains("train_prefs: scoring again") && stderr.contains("train_prefs.parquet"),
        "{stderr}"
    );
    assert!(std::fs::read(&arrow).unwrap() == clean.0, "arrow differs");
    assert!(std::fs::read(&pq).unwrap() == clean.1, "parquet differs");
    ok(&["train", "--config", cfg_s, "--quiet"], tmp.path());

    // The footers are covered too: the Arrow file's column names swapped (no data byte
    // changed: it trained on prompts as chosen answers, exit 0), a bit of the Parquet footer.
    let mut bytes = std::fs::read(&arrow).unwrap();
    let footer_len =
        i32::from_le_bytes(bytes[bytes.len() - 10..bytes.len() - 6].try_into().unwrap());
    let start = bytes.len() - 10 - footer_len as usize;
    let end = bytes.len() - 10;
    let spots = |name: &[u8], bytes: &[u8]| -> Vec<usize> {
        (start..end - name.len())
            .filter(|&i| &bytes[i..i + name.len()] == name)
            .collect()
    };
    let (p, c) = (spots(b"prompt_ids", &bytes), spots(b"chosen_ids", &bytes));
    assert!(!p.is_empty() && !c.is_empty());
    p.iter()
        .for_each(|&i| bytes[i..i + 10].copy_from_slice(b"chosen_ids"));
    c.iter()
        .for_each(|&i| bytes[i..i + 10].copy_from_slice(b"prompt_ids"));
    std::fs::write(&arrow, &bytes).unwrap();
    let err = fails(
        &["train", "--config", cfg_s, "--quiet", "--overwrite"],
        tmp.path(),
    );
    assert!(
        err.contains("train_prefs.arrow") && err.contains("checksum"),
        "{err}"
    );
    let mut bytes = std::fs::read(&pq).unwrap();
    let at = bytes.len() - 20;
    bytes[at] ^= 1;
    std::fs::write(&pq, &bytes).unwrap();
    let err = fails(&["stats", "--cache", out_s, "--json"], tmp.path());
    assert!(err.contains("train_prefs.parquet"), "{err}");
    ok(&["precompute", "--config", cfg_s, "--quiet"], tmp.path());
    assert!(std::fs::read(&arrow).unwrap() == clean.0, "arrow differs");
    assert!(std::fs::read(&pq).unwrap() == clean.1, "parquet differs");

    // A token id outside the model's vocabulary, in a file whose checksum is valid: refused.
    rewrite_cache(&arrow, |rows| {
        rows[3].chosen_ids[0] = 2_139_062_175;
    });
    let err = fails(
        &["train", "--config", cfg_s, "--quiet", "--overwrite"],
        tmp.path(),
    );
    assert!(
        err.contains("train_prefs.arrow")
            && err.contains("token id 2139062175")
            && err.contains("refdpo precompute"),
        "{err}"
    );
}

/// A cache whose checksum was made anew over impossible rows (another writer, or a hand edit):
/// training refuses it by file and pair before any step, never a silent step over them.
#[test]
fn impossible_rows_under_a_valid_checksum_are_refused_by_pair() {
    let (tmp, cfg) = precomputed("max_steps = 1\neval_every = 0");
    let cfg_s = cfg.to_str().unwrap();
    let arrow = cache::arrow_path(&tmp.path().join("cache"), "train_prefs");
    let clean = std::fs::read(&arrow).unwrap();
    type Edit = Box<dyn Fn(&mut Vec<cache::CacheRow>)>;
    let edits: Vec<(Edit, &str)> = vec![
        (
            Box::new(|r| r[3].chosen_ids[0] = 1_000_000),
            "token id 1000000",
        ),
        (
            Box::new(|r| r[3].chosen_ids.clear()),
            "pair 3 has an empty sequence",
        ),
        (
            Box::new(|r| r[3].prompt_ids.clear()),
            "pair 3 has an empty sequence",
        ),
        (
            Box::new(|r| r[3].ref_rejected_logps = f64::INFINITY),
            "pair 3 has reference log-probs",
        ),
        (
            Box::new(|r| r[3].ref_chosen_logps = 5.0),
            "pair 3 has reference log-probs",
        ),
        // an answer longer than the cache's truncation keeps: training's window would cut it
        // again, against a reference sum over the whole of it (fuzzer)
        (
            Box::new(|r| r[3].chosen_ids = r[3].chosen_ids.repeat(20)),
            "pair 3 has answers of",
        ),
        // finite, and no forward's: every reward saturated, a run of zero gradients (fuzzer)
        (
            Box::new(|r| r[3].ref_chosen_logps = -1e308),
            "pair 3 has reference log-probs",
        ),
        (Box::new(|r| r.clear()), "the training split has no pairs"),
    ];
    let pq = cache::parquet_path(&tmp.path().join("cache"), "train_prefs");
    let clean_pq = std::fs::read(&pq).unwrap();
    let dir = tmp.path().join("cache");
    let dir_s = dir.to_str().unwrap();
    for (edit, said) in edits {
        std::fs::write(&arrow, &clean).unwrap();
        rewrite_cache(&arrow, |rows| edit(rows));
        let err = fails(
            &["train", "--config", cfg_s, "--quiet", "--overwrite"],
            tmp.path(),
        );
        assert!(
            err.contains(said) && err.contains("train_prefs.arrow") && !err.contains("panicked"),
            "{said}: {err}"
        );
        // `stats` reads the Parquet file: the same pairs refused there, not left out unsaid
        // (a vocabulary it does not know, and an empty split, are training's to judge)
        if said.starts_with("pair") {
            std::fs::write(&pq, &clean_pq).unwrap();
            let fp = cache::parquet::read_fingerprint(&pq).unwrap();
            let mut rows = cache::parquet::read(&pq).unwrap();
            edit(&mut rows);
            cache::parquet::write(&pq, &rows, &fp).unwrap();
            let err = fails(&["stats", "--cache", dir_s, "--json"], tmp.path());
            assert!(
                err.contains(said) && err.contains("train_prefs.parquet"),
                "stats, {said}: {err}"
            );
        }
    }
    std::fs::write(&pq, &clean_pq).unwrap();
    ok(&["stats", "--cache", dir_s, "--json"], tmp.path());
}

/// A test split whose Parquet file is there and whose Arrow file is not (removed, lost) is a
/// damaged cache to stage two, not one without evaluation; stage one writes it again.
#[test]
fn a_test_split_without_its_arrow_file_is_refused_and_written_again() {
    let (tmp, cfg) = precomputed("max_steps = 1");
    let cfg_s = cfg.to_str().unwrap();
    let arrow = cache::arrow_path(&tmp.path().join("cache"), "test_prefs");
    let clean = std::fs::read(&arrow).unwrap();
    std::fs::remove_file(&arrow).unwrap();
    let err = fails(&["train", "--config", cfg_s, "--quiet"], tmp.path());
    assert!(
        err.contains("test_prefs") && err.contains("Arrow") && err.contains("refdpo precompute"),
        "{err}"
    );
    ok(&["precompute", "--config", cfg_s, "--quiet"], tmp.path());
    assert!(std::fs::read(&arrow).unwrap() == clean, "arrow differs");
    ok(&["train", "--config", cfg_s, "--quiet"], tmp.path());
    // both of its files gone, while the report counts its pairs: refused too
    std::fs::remove_file(&arrow).unwrap();
    std::fs::remove_file(arrow.with_extension("parquet")).unwrap();
    let err = fails(
        &["train", "--config", cfg_s, "--quiet", "--overwrite"],
        tmp.path(),
    );
    assert!(
        err.contains("report.json") && err.contains("`test_prefs` split"),
        "{err}"
    );
}

/// A cache scored by older numerics (here: made before the version was recorded, so 0): stage
/// one scores it again on its own, and stage two, which may be resuming a run begun on it,
/// trains but says so.
#[test]
fn a_cache_of_older_numerics_is_scored_again_and_named_by_train() {
    let (tmp, cfg) = precomputed("max_steps = 1\neval_every = 0");
    let cfg_s = cfg.to_str().unwrap();
    let dir = tmp.path().join("cache");
    for split in ["train_prefs", "test_prefs"] {
        let (arrow, pq) = (
            cache::arrow_path(&dir, split),
            cache::parquet_path(&dir, split),
        );
        let mapped = cache::MappedCache::open(&arrow).unwrap();
        let mut fp = mapped.fingerprint.clone();
        let rows: Vec<_> = (0..mapped.len()).map(|i| mapped.to_row(i)).collect();
        drop(mapped);
        assert_eq!(fp.scoring, cache::fingerprint::SCORING);
        fp.scoring = 0;
        cache::ipc::write(&arrow, &rows, &fp).unwrap();
        cache::parquet::write(&pq, &rows, &fp).unwrap();
    }
    let trained = |overwrite: bool| {
        let mut args = vec!["train", "--config", cfg_s, "--quiet"];
        if overwrite {
            args.push("--overwrite");
        }
        let out = refdpo(&args, tmp.path());
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = trained(false);
    assert!(
        err.contains("train_prefs.arrow` was scored by other numerics")
            && err.contains("version 0, this build"),
        "{err}"
    );
    let out = refdpo(&["precompute", "--config", cfg_s], tmp.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("train_prefs: scoring again: it was scored by other numerics"),
        "{err}"
    );
    let rescored = cache::MappedCache::open(&cache::arrow_path(&dir, "train_prefs")).unwrap();
    assert_eq!(rescored.fingerprint.scoring, cache::fingerprint::SCORING);
    assert!(!trained(true).contains("other numerics"));
}
