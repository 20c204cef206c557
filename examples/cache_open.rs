//! Times what stage two does once with a cache before its first step — memory map, checksum,
//! decode, vocabulary check, each pair's checks — and `stats`' Parquet checksum, on a synthetic
//! cache of UltraFeedback size. `cargo run --example cache_open [PAIRS]` (default 60,000 pairs;
//! dependencies — arrow, xxhash — are optimized in every profile).

use refdpo::cache::{self, CacheRow, Fingerprint, MappedCache};
use refdpo::config::{Dtype, Truncation};
use std::time::Instant;

fn main() -> refdpo::Result<()> {
    let pairs: usize = std::env::args()
        .nth(1)
        .map_or(60_000, |a| a.parse().expect("PAIRS is a number"));
    // Lengths near UltraFeedback's with a 49k vocabulary: prompt ~180, answers ~300 tokens.
    let ids = |n: usize, seed: usize| -> Vec<u32> {
        (0..n)
            .map(|i| ((i * 7919 + seed * 104_729) % 49_152) as u32)
            .collect()
    };
    let rows: Vec<CacheRow> = (0..pairs)
        .map(|i| CacheRow {
            prompt_id: format!("{i:064x}"),
            row: i as u64,
            prompt_ids: ids(120 + i % 120, i),
            chosen_ids: ids(200 + i % 200, i + 1),
            rejected_ids: ids(180 + i % 180, i + 2),
            ref_chosen_logps: -(i as f64),
            ref_rejected_logps: -(i as f64) - 1.0,
            score_chosen: Some(8.0),
            score_rejected: Some(4.0),
            chosen_truncated: false,
            rejected_truncated: false,
        })
        .collect();
    let fp = Fingerprint {
        dataset_id: "synthetic".into(),
        dataset_revision: "local".into(),
        split: "train_prefs".into(),
        limit: 0,
        dataset_options: None,
        model_id: "synthetic".into(),
        model_revision: "local".into(),
        weights_sha256: String::new(),
        tokenizer_sha256: String::new(),
        chat_template_sha256: String::new(),
        model_config_sha256: String::new(),
        tokenizer_config_sha256: String::new(),
        max_length: 1024,
        truncation: Truncation::KeepStart,
        shard: None,
        shard_pairs: None,
        dtype: Dtype::Bf16,
        refdpo_version: env!("CARGO_PKG_VERSION").into(),
        scoring: refdpo::cache::fingerprint::SCORING,
        data_sha256: Default::default(),
        dataset_commit: String::new(),
        model_commit: String::new(),
    };
    let dir = tempfile::tempdir().expect("temporary directory");
    let (arrow, pq) = (
        cache::arrow_path(dir.path(), "train_prefs"),
        cache::parquet_path(dir.path(), "train_prefs"),
    );
    cache::ipc::write(&arrow, &rows, &fp)?;
    cache::parquet::write(&pq, &rows, &fp)?;
    drop(rows);
    let mib =
        |p: &std::path::Path| std::fs::metadata(p).map_or(0.0, |m| m.len() as f64 / 1048576.0);
    // The first open reads the file from the page cache like any later one would.
    let t = Instant::now();
    let mapped = MappedCache::open(&arrow)?;
    let open_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let max_id = mapped.max_token_id();
    let vocab_ms = t.elapsed().as_secs_f64() * 1e3;
    drop(mapped);
    // All of it as stage two opens a split: the above, then each pair's sequences and reference
    // sums checked and its length taken.
    let t = Instant::now();
    let split = refdpo::train::split::Split::open(dir.path(), "train_prefs", &fp, 49_152)?;
    let split_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    cache::parquet::verify(&pq)?;
    let pq_ms = t.elapsed().as_secs_f64() * 1e3;
    println!(
        "{pairs} pairs: {:.0} MiB arrow opened (map + xxh3 checksum + decode) in {open_ms:.1} ms; \
         vocabulary check (max id {max_id:?}) {vocab_ms:.1} ms; stage two's whole open of {} pairs \
         (all of that, the pairs' checks and lengths) {split_ms:.1} ms; {:.0} MiB parquet \
         checksum {pq_ms:.1} ms",
        mib(&arrow),
        split.len(),
        mib(&pq)
    );
    Ok(())
}
