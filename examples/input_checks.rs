//! Times the checks stage one runs on its inputs (BENCHMARKS.md, "Input checks"):
//! - the model folder's shape check (headers only) and the NaN/Inf scan of every weight, against
//!   loading the same file without the scan, on a random-init model of Qwen2-0.5B's shapes (f32);
//! - the SHA-256 of a 60,000-row UltraFeedback JSON Lines file (real rows of
//!   `../shared/realdata`, repeated), the fingerprint's record of the data.
//!
//! `cargo run --release --example input_checks [DIR]` (DIR: where to write the two files, default
//! a temporary directory; ~2.5 GB).

use candle_core::{DType, Device};
use refdpo::model::{shapes, weights, TransformerConfig};
use std::io::Write;
use std::path::Path;
use std::time::Instant;

fn main() -> refdpo::Result<()> {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = std::env::args()
        .nth(1)
        .map_or_else(|| tmp.path().to_path_buf(), Into::into);
    let config = serde_json::json!({
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 151936,
        "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "tie_word_embeddings": true, "torch_dtype": "float32"
    });
    let model = dir.join("qwen2-0.5b");
    if !model.join("model.safetensors").exists() {
        std::fs::create_dir_all(&model).expect("the model folder");
        refdpo::model::init::write_model(&model, &config, 1, 0.02)?;
    }
    let mut cfg = TransformerConfig::from_file(&model.join("config.json"))?;
    let files = weights::weight_files(&model)?;
    let bytes = std::fs::metadata(&files[0]).map(|m| m.len()).unwrap_or(0);
    // warm the page cache, so both loads read memory
    weights::hash_files(&files)?;
    let t = Instant::now();
    shapes::check_files(&mut cfg, &files, &model)?;
    let shape_s = t.elapsed().as_secs_f64();
    let best = |f: &dyn Fn() -> refdpo::Result<()>| -> refdpo::Result<f64> {
        let mut best = f64::MAX;
        for _ in 0..3 {
            let t = Instant::now();
            f()?;
            best = best.min(t.elapsed().as_secs_f64());
        }
        Ok(best)
    };
    let load = best(&|| weights::load(&files, DType::F32, &Device::Cpu).map(drop))?;
    // the scan alone, over the loaded tensors (the load's own time varies with the page cache)
    let tensors = weights::load(&files, DType::F32, &Device::Cpu)?;
    let scan = best(&|| {
        for t in tensors.values() {
            assert!(weights::non_finite_at(t)?.is_none());
        }
        Ok(())
    })?;
    println!(
        "model: {:.0} MB f32 ({} tensors); shape check {:.1} ms; load {:.3} s, of which the \
         NaN/Inf scan {:.3} s ({:.0}%, {:.1} GB/s)",
        bytes as f64 / 1e6,
        tensors.len(),
        shape_s * 1e3,
        load,
        scan,
        100.0 * scan / load,
        bytes as f64 / 1e9 / scan
    );
    drop(tensors);

    let real = Path::new(env!("CARGO_MANIFEST_DIR")).join(
        "../shared/realdata/ultrafeedback_binarized_sample/data/train_prefs-00000-of-00001.parquet",
    );
    let mut lines = Vec::new();
    refdpo::data::records::for_each(&real, usize::MAX, &|_| true, &mut |r| {
        if let Ok(fields) = r.fields {
            lines.push(serde_json::Value::Object(fields).to_string());
        }
        true
    })?;
    let jsonl = dir.join("ultrafeedback-60k.jsonl");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&jsonl).expect("create"));
        for i in 0..60_000 {
            writeln!(f, "{}", lines[i % lines.len()]).expect("write");
        }
    }
    let size = std::fs::metadata(&jsonl).map(|m| m.len()).unwrap_or(0);
    let sha = best(&|| refdpo::error::fs::sha256(&jsonl).map(drop))?;
    println!(
        "data: 60,000 rows, {:.0} MB of JSON Lines; SHA-256 {:.3} s ({:.0} MB/s)",
        size as f64 / 1e6,
        sha,
        size as f64 / 1e6 / sha
    );
    Ok(())
}
