//! A reward model: an HF `*ForSequenceClassification` checkpoint with one label, of any family
//! the decoder implements. Its score is the `score` head (`score.weight` [1, hidden], no bias)
//! over the final norm's hidden state of each sequence's last token, as transformers computes it
//! (the last non-padding token; Gemma 2's final soft cap is the language-model head's, not this
//! one's). The decoder is the same one stage one runs, with `score.weight` as its one-row head.

use super::weights::{self, read_header};
use super::{shapes, OpMode, Transformer, TransformerConfig};
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

pub struct RewardModel {
    model: Transformer,
    /// The longest sequence it reads (config.json's `max_position_embeddings`; unbounded without).
    pub max_positions: usize,
}

/// The reward-model facts config.json states: its class, and one label. Returns its
/// `max_position_embeddings`.
fn check_config(dir: &Path) -> Result<usize> {
    let path = dir.join("config.json");
    let raw: serde_json::Value = serde_json::from_str(&crate::error::fs::read_to_string(&path)?)
        .map_err(|e| Error::Model(format!("`{}`: {e}", path.display())))?;
    let arch = raw["architectures"]
        .as_array()
        .and_then(|a| a.first())
        .and_then(|a| a.as_str())
        .unwrap_or("");
    if !arch.ends_with("ForSequenceClassification") {
        return Err(Error::Model(format!(
            "`{}`: architectures is {}, not a `*ForSequenceClassification` reward model \
             (a causal LM has no score head: pass a reward model)",
            path.display(),
            raw["architectures"]
        )));
    }
    let given = &raw["num_labels"];
    if !given.is_null() && given.as_u64().is_none() {
        return Err(Error::Model(format!(
            "`{}`: `num_labels` is {given}, not a number of labels (transformers refuses it too)",
            path.display()
        )));
    }
    let labels = given
        .as_u64()
        .or_else(|| raw["id2label"].as_object().map(|m| m.len() as u64))
        .unwrap_or(2);
    if labels != 1 {
        return Err(Error::Model(format!(
            "`{}`: {labels} labels: a reward model scores with one (num_labels = 1)",
            path.display()
        )));
    }
    Ok(raw["max_position_embeddings"]
        .as_u64()
        .map_or(usize::MAX, |n| n as usize))
}

impl RewardModel {
    /// Rows of its embedding: the ids its tokenizer may give.
    pub fn vocab_size(&self) -> usize {
        self.model.cfg.vocab_size
    }

    /// Loads the reward model in `dir` (config.json and safetensors weights), its tensors checked
    /// against config.json before any is read, in `dtype` on `device`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let max_positions = check_config(dir)?;
        let mut cfg = TransformerConfig::from_file(&dir.join("config.json"))?;
        // The head is `score`, not `lm_head`: expect no `lm_head` among the weights.
        cfg.tie_word_embeddings = true;
        let files = weights::weight_files(dir)?;
        let headers = files
            .iter()
            .map(|f| read_header(f))
            .collect::<Result<Vec<_>>>()?;
        shapes::check(&cfg, &headers, dir)?;
        let score = headers
            .iter()
            .flat_map(|h| h.tensors.iter().map(move |t| (h, t)))
            .find(|(_, t)| t.name == "score.weight");
        match score {
            Some((_, t)) if t.shape == [1, cfg.hidden_size] => {}
            Some((h, t)) => {
                return Err(Error::Model(format!(
                    "`{}`: tensor `score.weight` has shape {:?}, but a one-label reward model \
                     with hidden_size {} has [1, {}]",
                    h.path.display(),
                    t.shape,
                    cfg.hidden_size,
                    cfg.hidden_size
                )))
            }
            None => {
                return Err(Error::Model(format!(
                    "`{}`: no `score.weight` among the weights: not a sequence-classification \
                     checkpoint",
                    dir.display()
                )))
            }
        }
        let mut tensors: HashMap<String, Tensor> = weights::load(&files, dtype, device)?;
        let score = tensors.remove("score.weight").expect("checked above");
        let mut model = Transformer::new(&cfg, &tensors)?;
        model.lm_head = score;
        Ok(Self {
            model,
            max_positions,
        })
    }

    /// Each sequence's reward (token ids, no padding), `batch` sequences per forward.
    pub fn score(&self, seqs: &[&[u32]], batch: usize) -> Result<Vec<f64>> {
        let device = self.model.lm_head.device().clone();
        let mut out = Vec::with_capacity(seqs.len());
        for chunk in seqs.chunks(batch.max(1)) {
            let t = chunk.iter().map(|s| s.len()).max().unwrap_or(0);
            if chunk.iter().any(|s| s.is_empty()) {
                return Err(Error::Model(
                    "a reward model cannot score an empty sequence".into(),
                ));
            }
            // Right-padded: causal attention keeps each sequence's own tokens from the padding.
            let mut ids = Vec::with_capacity(chunk.len() * t);
            let mut last = Vec::with_capacity(chunk.len());
            // transformers pools the rightmost token that is not `pad_token_id` (with pad = EOS,
            // the one before a trailing EOS), position 0 if every token is; without a pad id,
            // the last token
            let pad = self.model.cfg.pad_token_id;
            for (b, s) in chunk.iter().enumerate() {
                ids.extend_from_slice(s);
                ids.resize((b + 1) * t, 0);
                let at = match pad {
                    Some(p) => s.iter().rposition(|&id| id != p).unwrap_or(0),
                    None => s.len() - 1,
                };
                last.push((b * t + at) as u32);
            }
            let ids = Tensor::from_vec(ids, (chunk.len(), t), &device)?;
            let hidden = self.model.forward_hidden(&ids, OpMode::scoring(&device))?;
            let h = hidden.dim(2)?;
            let rows = hidden
                .reshape((chunk.len() * t, h))?
                .index_select(&Tensor::from_vec(last, chunk.len(), &device)?, 0)?;
            let r = rows
                .to_dtype(DType::F32)?
                .matmul(&self.model.lm_head.to_dtype(DType::F32)?.t()?)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            out.extend(r.into_iter().map(f64::from));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn fixtures() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
    }

    /// The llama reward fixture copied, its config.json edited.
    fn llama_with(edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
        let tmp = tempfile::tempdir().unwrap();
        let src = fixtures().join("reward/llama");
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
        }
        let cfg = std::fs::read_to_string(tmp.path().join("config.json")).unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
        edit(&mut v);
        std::fs::write(tmp.path().join("config.json"), v.to_string()).unwrap();
        tmp
    }

    /// transformers' AutoModelForSequenceClassification on right- and left-padded batches
    /// (tests/fixtures/gen_reward_fixtures.py), three families.
    #[test]
    fn scores_equal_transformers_in_padded_batches_of_either_side() {
        for family in ["llama", "qwen2", "gemma2"] {
            let dir = fixtures().join("reward").join(family);
            let want: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap())
                    .unwrap();
            let seqs: Vec<Vec<u32>> = serde_json::from_value(want["sequences"].clone()).unwrap();
            let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
            let rm = RewardModel::load(&dir, DType::F32, &Device::Cpu).unwrap();
            for batch in [1, 3] {
                let got = rm.score(&refs, batch).unwrap();
                for side in ["scores_right_padded", "scores_left_padded"] {
                    let want: Vec<f64> = serde_json::from_value(want[side].clone()).unwrap();
                    for (g, w) in got.iter().zip(&want) {
                        let rel = (g - w).abs() / w.abs().max(1e-3);
                        assert!(rel < 1e-4, "{family} {side} batch {batch}: {g} vs {w}");
                    }
                }
            }
        }
    }

    /// transformers pools the rightmost token that is not `pad_token_id`: with pad = EOS (a
    /// common choice) a sequence ending in EOS is scored at the token before it, which equals the
    /// score of the sequence without it (causal attention); every token pad: position 0.
    #[test]
    fn the_pooled_token_is_the_last_that_is_not_padding() {
        let tmp = llama_with(|v| v["pad_token_id"] = serde_json::json!(7));
        let rm = RewardModel::load(tmp.path(), DType::F32, &Device::Cpu).unwrap();
        let (s, with_pad) = ([3u32, 9, 4, 5].as_slice(), [3u32, 9, 4, 5, 7, 7].as_slice());
        let got = rm.score(&[s, with_pad, &[7, 7]], 3).unwrap();
        assert!((got[0] - got[1]).abs() < 1e-6, "{got:?}");
        let first = rm.score(&[&[7]], 1).unwrap();
        assert!((got[2] - first[0]).abs() < 1e-6, "all pad: position 0");
    }

    #[test]
    fn a_causal_lm_or_a_classifier_of_two_labels_is_refused_by_name() {
        let lm = fixtures().join("families/qwen3");
        let e = RewardModel::load(&lm, DType::F32, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("ForSequenceClassification") && e.contains("config.json"),
            "{e}"
        );
        let tmp = llama_with(|v| {
            v["id2label"] = serde_json::json!({"0": "bad", "1": "good"});
            v.as_object_mut().unwrap().remove("num_labels");
        });
        let e = RewardModel::load(tmp.path(), DType::F32, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("2 labels"), "{e}");
        // a count that is not one is refused by key, not read from `id2label` (fuzzer)
        for odd in [
            serde_json::json!(-1),
            serde_json::json!("1"),
            serde_json::json!(1.5),
        ] {
            let tmp = llama_with(|v| {
                v["id2label"] = serde_json::json!({"0": "score"});
                v["num_labels"] = odd.clone();
            });
            let e = RewardModel::load(tmp.path(), DType::F32, &Device::Cpu)
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains(&format!("`num_labels` is {odd}")), "{e}");
        }
    }
}
