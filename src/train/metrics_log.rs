//! `metrics.jsonl`: one JSON object per logged step under TRL's names, appended as training goes.

use crate::dpo::{Metric, MetricsAccumulator};
use crate::error::{fs, Error, Result};
use serde_json::{json, Map, Value};
use std::io::Write;
use std::path::{Path, PathBuf};

pub struct MetricsLog {
    path: PathBuf,
}

/// What one optimizer step measured.
pub struct StepReport {
    pub metrics: MetricsAccumulator,
    pub grad_norm: f64,
    pub learning_rate: f64,
    pub tokens: usize,
    pub seconds: f64,
}

impl MetricsLog {
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One optimizer step's line: TRL's names, plus `epoch` and `step_seconds`.
    pub fn append_step(&self, step: usize, epoch: f64, r: &StepReport) -> Result<()> {
        let mut line = Map::new();
        line.insert("step".into(), json!(step));
        line.insert("epoch".into(), json!(epoch));
        line.extend(r.metrics.to_json(""));
        line.insert(Metric::GradNorm.name().into(), json!(r.grad_norm));
        line.insert(Metric::LearningRate.name().into(), json!(r.learning_rate));
        line.insert(
            Metric::TokensPerSecond.name().into(),
            json!(r.tokens as f64 / r.seconds.max(1e-9)),
        );
        line.insert("step_seconds".into(), json!(r.seconds));
        self.append(line)
    }

    /// An evaluation's line: the same names prefixed `eval/`.
    pub fn append_eval(&self, step: usize, m: &MetricsAccumulator) -> Result<()> {
        let mut line = Map::from_iter([("step".to_string(), json!(step))]);
        line.extend(m.to_json("eval/"));
        self.append(line)
    }

    fn append(&self, line: Map<String, Value>) -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| Error::io("cannot open", &self.path, e))?;
        writeln!(f, "{}", Value::Object(line))
            .map_err(|e| Error::io("cannot append to", &self.path, e))
    }

    /// Keeps only the lines up to `step` (a resumed run rewrites what came after).
    pub fn truncate_after(&self, step: usize) -> Result<()> {
        let Ok(text) = std::fs::read_to_string(&self.path) else {
            return Ok(());
        };
        let kept: String = text
            .lines()
            .filter(|l| {
                serde_json::from_str::<Value>(l)
                    .ok()
                    .and_then(|v| v.get("step")?.as_u64())
                    .is_some_and(|s| s as usize <= step)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        fs::write_atomic(&self.path, kept.as_bytes())
    }
}
