//! `metrics.jsonl`: one JSON object per logged step under TRL's names, appended as training goes.

use super::tensorboard::EventWriter;
use crate::dpo::{Metric, MetricsAccumulator};
use crate::error::{fs, Error, Result};
use serde_json::{json, Map, Value};
use std::io::Write;
use std::path::{Path, PathBuf};

/// One line of `metrics.jsonl`: a training step's (epoch, the per-pair means under TRL's names,
/// the step's figures) or an evaluation's (the means prefixed `eval/`). Keys in the file's order;
/// every name is a [`Metric`]'s.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsLine {
    pub step: usize,
    pub epoch: Option<f64>,
    /// [`Metric::PAIR_MEANS`] by name, prefixed `eval/` on an evaluation line.
    pub means: Map<String, Value>,
    pub grad_norm: Option<f64>,
    pub learning_rate: Option<f64>,
    pub tokens_per_second: Option<f64>,
    /// Not a TRL name: the step's wall time.
    pub step_seconds: Option<f64>,
}

impl MetricsLine {
    pub fn to_json(&self) -> Map<String, Value> {
        let mut line = Map::new();
        line.insert("step".into(), json!(self.step));
        if let Some(e) = self.epoch {
            line.insert("epoch".into(), json!(e));
        }
        line.extend(self.means.clone());
        for (metric, value) in [
            (Metric::GradNorm, self.grad_norm),
            (Metric::LearningRate, self.learning_rate),
            (Metric::TokensPerSecond, self.tokens_per_second),
        ] {
            if let Some(v) = value {
                line.insert(metric.name().into(), json!(v));
            }
        }
        if let Some(s) = self.step_seconds {
            line.insert("step_seconds".into(), json!(s));
        }
        line
    }
}

pub struct MetricsLog {
    path: PathBuf,
    /// Behind a lock so that logging takes `&self`, as the trainer's steps do.
    tensorboard: Option<std::sync::Mutex<Tensorboard>>,
}

/// The run's TensorBoard event file, opened at the first logged line.
struct Tensorboard {
    dir: PathBuf,
    writer: Option<EventWriter>,
    /// A resumed run's first rewritten step: the new file opens with it.
    restart_at: Option<u64>,
    /// Kept lines at `restart_at` that the new file writes again before its own: the restart
    /// drops every older event from that step on, and a final evaluation done again shares its
    /// step with the training line kept before it.
    replay: Vec<Map<String, Value>>,
}

/// What one optimizer step measured.
pub struct StepReport {
    pub metrics: MetricsAccumulator,
    pub grad_norm: f64,
    pub learning_rate: f64,
    pub tokens: usize,
    pub seconds: f64,
}

/// What one evaluation measured besides its means.
pub struct EvalReport {
    pub epoch: f64,
    pub tokens: usize,
    pub seconds: f64,
}

/// One `metrics.jsonl` line's numbers as TensorBoard scalars at its step.
fn write_scalars(w: &mut EventWriter, line: &Map<String, Value>) -> Result<()> {
    let step = line.get("step").and_then(Value::as_u64).unwrap_or(0);
    let scalars: Vec<(String, f64)> = line
        .iter()
        .filter(|(k, _)| *k != "step")
        .filter_map(|(k, v)| Some((k.clone(), v.as_f64()?)))
        .collect();
    w.scalars(step, &scalars)
}

impl MetricsLog {
    /// The log at `path`, mirrored into TensorBoard event files in `tensorboard` when given.
    pub fn new(path: PathBuf, tensorboard: Option<PathBuf>) -> Self {
        Self {
            path,
            tensorboard: tensorboard.map(|dir| {
                std::sync::Mutex::new(Tensorboard {
                    dir,
                    writer: None,
                    restart_at: None,
                    replay: Vec::new(),
                })
            }),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One optimizer step's line: TRL's names, plus `epoch` and `step_seconds`.
    /// `r` covers the `steps` steps since the last line (the means over their micro-batches),
    /// and `loss` is the mean of those steps' losses (transformers' `tr_loss` over its steps:
    /// with a short accumulation group it is not the micro-batches' mean).
    pub fn append_step(
        &self,
        step: usize,
        epoch: f64,
        r: &StepReport,
        steps: usize,
        loss: f64,
    ) -> Result<()> {
        let mut means = r.metrics.to_json("");
        means.insert(Metric::Loss.name().into(), json!(loss));
        let line = MetricsLine {
            step,
            epoch: Some(epoch),
            means,
            grad_norm: Some(r.grad_norm),
            learning_rate: Some(r.learning_rate),
            tokens_per_second: Some(r.tokens as f64 / r.seconds.max(1e-9)),
            step_seconds: Some(r.seconds / steps.max(1) as f64),
        };
        self.append(line.to_json())
    }

    /// An evaluation's line, as TRL's: `step`, `epoch`, and the means and throughput under the
    /// training names prefixed `eval/` (an evaluation has no gradient or learning rate).
    pub fn append_eval(&self, step: usize, m: &MetricsAccumulator, r: &EvalReport) -> Result<()> {
        let mut line = MetricsLine {
            step,
            epoch: Some(r.epoch),
            means: m.to_json("eval/"),
            grad_norm: None,
            learning_rate: None,
            tokens_per_second: None,
            step_seconds: None,
        }
        .to_json();
        line.insert(
            format!("eval/{}", Metric::TokensPerSecond.name()),
            json!(r.tokens as f64 / r.seconds.max(1e-9)),
        );
        self.append(line)
    }

    fn append(&self, line: Map<String, Value>) -> Result<()> {
        if let Some(tb) = &self.tensorboard {
            let mut tb = tb.lock().unwrap_or_else(|e| e.into_inner());
            let tb = &mut *tb;
            let writer = match &mut tb.writer {
                Some(w) => w,
                None => {
                    let mut w = EventWriter::create(&tb.dir, tb.restart_at)?;
                    for kept in std::mem::take(&mut tb.replay) {
                        write_scalars(&mut w, &kept)?;
                    }
                    tb.writer.insert(w)
                }
            };
            write_scalars(writer, &line)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| Error::io("cannot open", &self.path, e))?;
        writeln!(f, "{}", Value::Object(line))
            .map_err(|e| Error::io("cannot append to", &self.path, e))
    }

    /// Keeps only the lines up to `step` (a resumed run rewrites what came after), less the
    /// evaluation line at `step` when `drop_eval_at_step` (the final one, which a resumed run makes
    /// again). TensorBoard's new file restarts at the first step rewritten, where its readers drop
    /// the older events: `step + 1`, or `step` itself when its evaluation is dropped, the kept
    /// training line at `step` then written again.
    pub fn truncate_after(&self, step: usize, drop_eval_at_step: bool) -> Result<()> {
        let text = crate::error::fs::read_to_string(&self.path).unwrap_or_default();
        let eval_loss = format!("eval/{}", Metric::Loss.name());
        let kept: Vec<(&str, Map<String, Value>)> = text
            .lines()
            .filter_map(|l| Some((l, serde_json::from_str::<Map<String, Value>>(l).ok()?)))
            .filter(|(_, v)| {
                let eval = v.contains_key(&eval_loss);
                v.get("step").and_then(Value::as_u64).is_some_and(|s| {
                    (s as usize) < step || (s as usize == step && !(drop_eval_at_step && eval))
                })
            })
            .collect();
        if let Some(tb) = &self.tensorboard {
            let mut tb = tb.lock().unwrap_or_else(|e| e.into_inner());
            let at_step = |v: &Map<String, Value>| v["step"].as_u64() == Some(step as u64);
            (tb.restart_at, tb.replay) = if drop_eval_at_step {
                let replay = kept.iter().map(|(_, v)| v).filter(|v| at_step(v));
                let replay = replay.cloned().collect();
                (Some(step as u64), replay)
            } else {
                (Some(step as u64 + 1), Vec::new())
            };
        }
        if text.is_empty() {
            return Ok(());
        }
        let kept: String = kept.iter().map(|(l, _)| format!("{l}\n")).collect();
        fs::write_atomic(&self.path, kept.as_bytes())
    }
}
