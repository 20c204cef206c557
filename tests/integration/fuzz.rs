//! A seeded, bounded fuzz test of the readers: random mutations (bit flips, overwritten, inserted
//! and deleted byte runs, truncation) of a valid safetensors file, config.json, tokenizer.json,
//! JSON Lines file, Parquet data file and Arrow cache file. Each reader must return — a value or
//! an error — for every case: no panic, no abort, no hang. The seed is fixed, so a failure
//! reproduces; each target prints its cases and time.

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use refdpo::config::DemoConfig;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::time::{Duration, Instant};

/// One edit of a file's bytes, at a position scaled into `0..focus`.
#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: u32, bits: u8 },
    Overwrite { at: u32, bytes: Vec<u8> },
    Insert { at: u32, bytes: Vec<u8> },
    Delete { at: u32, len: u16 },
    Truncate { at: u32 },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let bytes = proptest::collection::vec(
        prop_oneof![
            any::<u8>(),
            Just(0u8),
            Just(0xff),
            Just(b'"'),
            Just(b'{'),
            Just(b'['),
            Just(b'\n')
        ],
        1..16,
    );
    prop_oneof![
        4 => (any::<u32>(), 1u8..=255).prop_map(|(at, bits)| Mutation::Flip { at, bits }),
        2 => (any::<u32>(), bytes.clone()).prop_map(|(at, bytes)| Mutation::Overwrite { at, bytes }),
        2 => (any::<u32>(), bytes).prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        1 => (any::<u32>(), 1u16..512).prop_map(|(at, len)| Mutation::Delete { at, len }),
        1 => any::<u32>().prop_map(|at| Mutation::Truncate { at }),
    ]
}

fn apply(data: &[u8], edits: &[Mutation], focus: usize) -> Vec<u8> {
    let mut d = data.to_vec();
    for m in edits {
        let pos = |at: u32, len: usize| (at as usize % focus.max(1)).min(len);
        match m {
            Mutation::Flip { at, bits } => {
                let i = pos(*at, d.len().saturating_sub(1));
                if let Some(b) = d.get_mut(i) {
                    *b ^= bits;
                }
            }
            Mutation::Overwrite { at, bytes } => {
                let i = pos(*at, d.len());
                for (k, b) in bytes.iter().enumerate() {
                    if let Some(x) = d.get_mut(i + k) {
                        *x = *b;
                    }
                }
            }
            Mutation::Insert { at, bytes } => {
                let i = pos(*at, d.len());
                d.splice(i..i, bytes.iter().copied());
            }
            Mutation::Delete { at, len } => {
                let i = pos(*at, d.len());
                let end = (i + *len as usize).min(d.len());
                d.drain(i..end);
            }
            Mutation::Truncate { at } => d.truncate(pos(*at, d.len())),
        }
    }
    d
}

/// Runs `read` on `cases` seeded mutations of `valid` written to `path`: every case must return
/// within `limit`, without a panic.
fn fuzz(
    name: &str,
    valid: &[u8],
    focus: usize,
    path: &Path,
    cases: u32,
    read: &dyn Fn(&Path) -> bool,
) {
    // A longer hunt, by hand: REFDPO_FUZZ_SEED (any text) and REFDPO_FUZZ_SCALE (× the cases).
    let scale = std::env::var("REFDPO_FUZZ_SCALE")
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
        .unwrap_or(1);
    let config = Config {
        cases: cases * scale.max(1),
        failure_persistence: None,
        max_shrink_iters: 200,
        ..Config::default()
    };
    let mut seed: [u8; 32] = *b"refdpo hostile readers, seeded!!";
    if let Ok(s) = std::env::var("REFDPO_FUZZ_SEED") {
        for (i, b) in s.bytes().enumerate() {
            seed[i % 32] ^= b;
        }
    }
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &seed));
    let started = Instant::now();
    let (accepted, refused) = (std::cell::Cell::new(0u32), std::cell::Cell::new(0u32));
    let limit = Duration::from_secs(20);
    let result = runner.run(&proptest::collection::vec(mutation(), 1..6), |edits| {
        std::fs::write(path, apply(valid, &edits, focus)).unwrap();
        let t = Instant::now();
        let outcome = catch_unwind(AssertUnwindSafe(|| read(path)));
        let took = t.elapsed();
        match outcome {
            Err(_) => Err(TestCaseError::fail(format!("{name}: the reader panicked"))),
            Ok(_) if took > limit => Err(TestCaseError::fail(format!(
                "{name}: the reader took {took:?}"
            ))),
            Ok(ok) => {
                let n = if ok { &accepted } else { &refused };
                n.set(n.get() + 1);
                Ok(())
            }
        }
    });
    eprintln!(
        "fuzz {name}: {} cases in {:.1} s ({} read, {} refused with an error)",
        accepted.get() + refused.get(),
        started.elapsed().as_secs_f64(),
        accepted.get(),
        refused.get()
    );
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
}

#[test]
fn mutated_inputs_never_panic_abort_or_hang_a_reader() {
    let tmp = tempfile::tempdir().unwrap();
    let demo = DemoConfig {
        generate: true,
        dir: tmp.path().join("demo"),
        train_rows: 24,
        test_rows: 8,
        ..DemoConfig::default()
    };
    refdpo::data::demo::ensure(&demo).unwrap();
    let model = demo.dir.join("model");
    let read = |p: &Path| std::fs::read(p).unwrap();
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();

    // safetensors: the header and its first tensors' bytes
    let st = read(&model.join("model.safetensors"));
    let header_end = 8 + u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
    let f = work.join("model.safetensors");
    fuzz("safetensors", &st, header_end + 256, &f, 2000, &|p| {
        refdpo::model::weights::read_header(p).is_ok()
            && refdpo::model::weights::load(
                &[p.to_path_buf()],
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
            )
            .is_ok()
    });

    let cfg = read(&model.join("config.json"));
    fuzz(
        "config.json",
        &cfg,
        cfg.len(),
        &work.join("config.json"),
        3000,
        &|p| refdpo::model::TransformerConfig::from_file(p).is_ok(),
    );

    // tokenizer.json in a model folder of its own (with the real tokenizer_config.json)
    let tok_dir = work.join("tok");
    std::fs::create_dir_all(&tok_dir).unwrap();
    std::fs::copy(
        model.join("tokenizer_config.json"),
        tok_dir.join("tokenizer_config.json"),
    )
    .unwrap();
    let tok = read(&model.join("tokenizer.json"));
    fuzz(
        "tokenizer.json",
        &tok,
        tok.len(),
        &tok_dir.join("tokenizer.json"),
        1000,
        &|p| {
            let dir = p.parent().unwrap();
            refdpo::tokenize::PairTokenizer::from_dir(dir, 64, Default::default())
                .map(|t| t.encode("useful answer <|im_end|>").is_ok())
                .unwrap_or(false)
        },
    );

    // data files, read as stage one reads them (every record, bounded rows)
    let records = |p: &Path| {
        let mut n = 0;
        refdpo::data::records::for_each(p, 1 << 16, &|_| true, &mut |_| {
            n += 1;
            true
        })
        .is_ok()
    };
    let pq = read(
        &demo
            .dir
            .join("dataset/data/train_prefs-00000-of-00001.parquet"),
    );
    fuzz(
        "parquet data",
        &pq,
        pq.len(),
        &work.join("data.parquet"),
        2000,
        &records,
    );
    let jsonl: Vec<u8> = (0..20)
        .map(|i| {
            format!(
                "{{\"prompt\": [{{\"role\": \"user\", \"content\": \"q {i}\"}}], \"chosen\": \"a\", \"rejected\": \"b\"}}\n"
            )
        })
        .collect::<String>()
        .into_bytes();
    fuzz(
        "jsonl",
        &jsonl,
        jsonl.len(),
        &work.join("data.jsonl"),
        3000,
        &records,
    );

    // an Arrow cache file, opened as stage two opens it
    let fp: refdpo::cache::Fingerprint = serde_json::from_value(serde_json::json!({
        "dataset_id": "d", "dataset_revision": "r", "split": "s", "limit": 0, "model_id": "m",
        "model_revision": "r", "weights_sha256": "w", "tokenizer_sha256": "t",
        "chat_template_sha256": "c", "max_length": 10, "truncation": "keep_start", "dtype": "f32",
        "refdpo_version": "0"
    }))
    .unwrap();
    let rows: Vec<refdpo::cache::CacheRow> = (0..12)
        .map(|i| refdpo::cache::CacheRow {
            prompt_id: format!("p{i}"),
            row: i,
            prompt_ids: vec![1, 2, 3],
            chosen_ids: vec![4; i as usize % 4 + 1],
            rejected_ids: vec![5, 6],
            ref_chosen_logps: -1.5,
            ref_rejected_logps: -2.5,
            score_chosen: Some(8.0),
            score_rejected: None,
            chosen_truncated: false,
            rejected_truncated: i % 2 == 0,
        })
        .collect();
    let arrow = work.join("valid.arrow");
    refdpo::cache::ipc::write(&arrow, &rows, &fp).unwrap();
    let bytes = read(&arrow);
    let open_all = |p: &Path| {
        refdpo::cache::MappedCache::open(p).is_ok_and(|m| {
            // every accessor stage two uses, on every row
            let _ = m.max_token_id();
            (0..m.len()).for_each(|i| drop(m.to_row(i)));
            m.len() == 12
        })
    };
    fuzz(
        "arrow cache",
        &bytes,
        bytes.len(),
        &work.join("s.arrow"),
        2000,
        &open_all,
    );

    // The same with the checksum recomputed over the mutated bytes: a crafted file that passes
    // it, so the Arrow decoder and the cache's accessors meet the damage themselves.
    let resealed = work.join("resealed.arrow");
    let footer =
        refdpo::cache::checksum::footer_range(bytes.len() as u64, &bytes[bytes.len() - 10..])
            .expect("an Arrow footer");
    fuzz(
        "arrow cache, resealed",
        &bytes,
        footer.start as usize,
        &work.join("raw.arrow"),
        2000,
        &|p| {
            let mut d = std::fs::read(p).unwrap();
            if !refdpo::cache::checksum::reseal(&mut d) {
                return false; // the mutation broke the footer's frame: nothing to reseal
            }
            std::fs::write(&resealed, d).unwrap();
            let opened = refdpo::cache::MappedCache::open(&resealed);
            if let Err(e) = &opened {
                assert!(
                    !e.to_string().contains("checksum mismatch"),
                    "not resealed: {e}"
                );
            }
            open_all(&resealed)
        },
    );
}
