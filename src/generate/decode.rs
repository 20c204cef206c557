//! Batched KV-cached decoding: one prefill forward of the prompts packed end to end (their keys
//! and values then left-padded into one cache row each), then one token per step for every row,
//! greedy or sampled (repetition penalty, temperature, top-k, top-p) from a per-prompt seed, so a
//! prompt's continuation does not depend on the batch it ran in.

use crate::error::{Error, Result};
use crate::model::Transformer;
use crate::model::{DecodeStep, KvCache};
use crate::rng::SplitMix;
use candle_core::{Device, Tensor};

/// New-token slots a decoding cache holds before it first grows.
const FIRST_NEW_SLOTS: usize = 512;

/// How the next token is chosen, in transformers' order: the repetition penalty on the logits
/// (greedy too), then the temperature, top-k and top-p.
#[derive(Debug, Clone, Copy)]
pub struct Sampling {
    /// 0: greedy (the first of the highest logits, as `torch.argmax`).
    pub temperature: f64,
    /// Nucleus sampling: the smallest set of most likely tokens holding this much probability
    /// (`None`: 1, all; `generate::run` puts the model's default in its place).
    pub top_p: Option<f64>,
    /// Sampling from the `k` most likely tokens only (ties at the k-th kept, as transformers);
    /// `None` or 0: from all (`generate::run` puts the model's default, 50, in its place).
    pub top_k: Option<usize>,
    /// transformers' `repetition_penalty`: the logit of every token already in the sequence
    /// (prompt included) divided by it where positive, multiplied where negative; `None`: 1,
    /// none (`generate::run` puts the model's `generation_config.json` value in its place).
    pub repetition_penalty: Option<f64>,
    pub seed: u64,
}

impl Sampling {
    /// Greedy decoding with no penalty.
    pub const GREEDY: Sampling = Sampling {
        temperature: 0.0,
        top_p: None,
        top_k: None,
        repetition_penalty: None,
        seed: 0,
    };
}

/// One prompt's continuation.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// New tokens, the stopping EOS token included.
    pub ids: Vec<u32>,
    /// Stopped at an EOS token (else at the token limit).
    pub finished: bool,
}

/// Continues each prompt (`key` seeds its sampling) by up to `max_new` tokens, stopping a row at
/// any of `eos`; `on_tokens` hears how many tokens each step produced.
pub fn generate(
    model: &Transformer,
    prompts: &[(u64, &[u32])],
    max_new: usize,
    eos: &[u32],
    sampling: &Sampling,
    device: &Device,
    on_tokens: &mut dyn FnMut(usize),
) -> Result<Vec<Generated>> {
    let b = prompts.len();
    let mut out = vec![
        Generated {
            ids: Vec::new(),
            finished: false,
        };
        b
    ];
    if b == 0 || max_new == 0 {
        return Ok(out);
    }
    let lens: Vec<usize> = prompts.iter().map(|(_, ids)| ids.len()).collect();
    let p = lens.iter().copied().max().unwrap_or(0);
    let pads: Vec<usize> = lens.iter().map(|&n| p - n).collect();
    let window = model.cfg.sliding_window;
    let mut rngs: Vec<SplitMix> = prompts
        .iter()
        // each prompt's own stream, its start hashed from (seed, key): streams of neighbouring
        // keys are not shifts of one another (seed ^ key·φ was, at seed 0)
        .map(|(key, _)| SplitMix::new(crate::rng::bits(sampling.seed, key.wrapping_add(1))))
        .collect();
    // room for the prompts and the first new tokens; longer runs grow it (a huge
    // --max-new-tokens is not allocated up front)
    let mut cache = KvCache::with_capacity(p + max_new.min(FIRST_NEW_SLOTS));
    // each row's tokens so far, for the repetition penalty
    let penalty = sampling.repetition_penalty.filter(|&r| r != 1.0);
    let mut seen: Vec<std::collections::HashSet<u32>> = match penalty {
        Some(_) => prompts
            .iter()
            .map(|(_, ids)| ids.iter().copied().collect())
            .collect(),
        None => Vec::new(),
    };
    let texts: Vec<&[u32]> = prompts.iter().map(|(_, ids)| *ids).collect();
    let mut hidden = model.prefill(&texts, &mut cache)?;
    for n in 0..max_new {
        let logits = model.next_logits(&hidden.squeeze(1)?)?.to_vec2::<f32>()?;
        let mut next = vec![eos.first().copied().unwrap_or(0); b];
        let mut produced = 0;
        for (i, row) in logits.iter().enumerate() {
            if out[i].finished {
                continue;
            }
            if let Some(x) = row.iter().find(|x| x.is_nan() || **x == f32::INFINITY) {
                // greedy would take the first token and sampling nothing sane (transformers'
                // sampling raises on such probabilities)
                return Err(Error::Model(format!(
                    "the model's logits for prompt {} are {x} at new token {}: the forward \
                     overflowed (weights far too large, a RoPE setting that makes positions \
                     overflow, or a dtype too narrow for them); try `--set model.dtype=f32`, or \
                     check the model's weights and config.json",
                    prompts[i].0,
                    n + 1
                )));
            }
            let tok = match penalty {
                Some(r) => {
                    let tok = choose(&penalized(row, &seen[i], r as f32), sampling, &mut rngs[i]);
                    seen[i].insert(tok);
                    tok
                }
                None => choose(row, sampling, &mut rngs[i]),
            };
            out[i].ids.push(tok);
            out[i].finished = eos.contains(&tok);
            next[i] = tok;
            produced += 1;
        }
        on_tokens(produced);
        if n + 1 == max_new || out.iter().all(|g| g.finished) {
            break;
        }
        let slot = p + n;
        let step = DecodeStep::one_slot(&pads, slot, window, device)?;
        hidden =
            model.forward_cached(&Tensor::from_vec(next, (b, 1), device)?, &step, &mut cache)?;
    }
    Ok(out)
}

/// The next token from one row of logits: greedy, or sampled at the temperature from every token
/// (top-p 1, in vocabulary order) or from the nucleus (the most likely tokens, most likely first,
/// until they hold top-p of the probability), among the top-k where that is set.
fn choose(logits: &[f32], s: &Sampling, rng: &mut SplitMix) -> u32 {
    if s.temperature <= 0.0 {
        return argmax(logits);
    }
    // the scaled scores, then in place their weights
    let mut probs: Vec<f64> = logits
        .iter()
        .map(|&x| f64::from(x) / s.temperature)
        .collect();
    let max = probs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !max.is_finite() {
        // a temperature so small that the logits overflow: sampling's limit there is greedy
        // (transformers' f32 division raises instead)
        return argmax(logits);
    }
    // top-k on the scores, not the weights: at a huge temperature every weight rounds to 1
    let kth = s
        .top_k
        .filter(|&k| k > 0 && k < probs.len())
        .map(|k| kth_largest(&probs, k));
    for z in &mut probs {
        *z = match kth {
            Some(kth) if *z < kth => 0.0,
            _ => (*z - max).exp(),
        };
    }
    let total: f64 = probs.iter().sum();
    let top_p = s.top_p.unwrap_or(1.0);
    if top_p >= 1.0 {
        return walk(probs.iter().copied().enumerate(), rng.unit() * total);
    }
    let nucleus = nucleus(&probs, total, top_p);
    let sum: f64 = nucleus.iter().map(|(_, p)| p).sum();
    walk(nucleus.iter().copied(), rng.unit() * sum)
}

/// The first of the highest logits, as `torch.argmax`.
fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// `logits` with transformers' repetition penalty on every token of `seen` (in f32, as its
/// processor computes).
fn penalized(logits: &[f32], seen: &std::collections::HashSet<u32>, penalty: f32) -> Vec<f32> {
    let mut out = logits.to_vec();
    for &t in seen {
        if let Some(x) = out.get_mut(t as usize) {
            *x = if *x < 0.0 { *x * penalty } else { *x / penalty };
        }
    }
    out
}

/// The k-th largest of `scores`: every score below it is left out, ties at the k-th kept, as
/// transformers' `TopKLogitsWarper` removes only the scores below it.
fn kth_largest(scores: &[f64], k: usize) -> f64 {
    let mut sorted = scores.to_vec();
    let (_, kth, _) = sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    *kth
}

/// The token at which `u` falls in the running sum of `items` (id, weight), in their order; the
/// last one of weight above zero where rounding leaves u past them all.
fn walk(items: impl Iterator<Item = (usize, f64)>, mut u: f64) -> u32 {
    let mut last = 0;
    for (i, p) in items {
        if u < p {
            return i as u32;
        }
        u -= p;
        if p > 0.0 {
            last = i;
        }
    }
    last as u32
}

/// The nucleus of `probs` (their sum `total`): most likely first (ties by id), until top_p of the
/// mass is in. Found among the k most likely (selected in linear time, then sorted), k from 64
/// growing 16-fold until the nucleus fits: a whole-vocabulary sort per token was most of a
/// sampled step's time, and a peaked distribution's nucleus is small (a flat one's costs two
/// selections more than the whole sort).
fn nucleus(probs: &[f64], total: f64, top_p: f64) -> Vec<(usize, f64)> {
    let order = |a: &(usize, f64), b: &(usize, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let mut items: Vec<(usize, f64)> = probs.iter().copied().enumerate().collect();
    let mut k = 64.min(items.len());
    loop {
        if k < items.len() {
            items.select_nth_unstable_by(k - 1, order);
        }
        items[..k].sort_by(order);
        let mut mass = 0.0;
        for (kept, (_, p)) in items[..k].iter().enumerate() {
            mass += p / total;
            if mass >= top_p {
                items.truncate(kept + 1);
                return items;
            }
        }
        if k == items.len() {
            return items;
        }
        k = (16 * k).min(items.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Logits that are NaN (a forward that overflowed) are an error naming the prompt, not a
    /// continuation of token 0 (fuzzer: a RoPE factor of 3e-37, a norm weight of 3e38).
    #[test]
    fn logits_that_are_not_finite_are_an_error() {
        let cfg = crate::model::TransformerConfig::from_json(
            r#"{"model_type":"llama","vocab_size":61,"hidden_size":16,"intermediate_size":24,
            "num_hidden_layers":1,"num_attention_heads":4,"num_key_value_heads":2,
            "rms_norm_eps":1e-6,"rope_theta":10000.0}"#,
        )
        .unwrap();
        let mut w = crate::model::init::init_weights(&cfg, 5, 0.2).unwrap();
        let run = |w: &std::collections::HashMap<String, Tensor>| {
            let model = Transformer::new(&cfg, w).unwrap();
            let prompt = [1u32, 2, 3];
            generate(
                &model,
                &[(7, &prompt)],
                4,
                &[],
                &Sampling::GREEDY,
                &Device::Cpu,
                &mut |_| {},
            )
        };
        assert_eq!(run(&w).unwrap()[0].ids.len(), 4);
        let norm = w["model.norm.weight"].affine(0.0, f64::NAN).unwrap();
        w.insert("model.norm.weight".into(), norm);
        let err = run(&w).unwrap_err().to_string();
        assert!(
            err.contains("logits for prompt 7 are NaN at new token 1"),
            "{err}"
        );
    }

    #[test]
    fn greedy_takes_the_first_maximum_and_top_p_keeps_the_nucleus() {
        let greedy = Sampling::GREEDY;
        let mut rng = SplitMix::new(1);
        assert_eq!(choose(&[0.1, 3.0, 3.0, -1.0], &greedy, &mut rng), 1);
        // one token holds nearly all the mass: top_p 0.5 keeps only it
        let nucleus = Sampling {
            temperature: 1.0,
            top_p: Some(0.5),
            ..Sampling::GREEDY
        };
        for _ in 0..50 {
            assert_eq!(choose(&[0.0, 9.0, 1.0], &nucleus, &mut rng), 1);
        }
        // full sampling visits every token of a flat distribution
        let flat = Sampling {
            temperature: 1.0,
            ..Sampling::GREEDY
        };
        let mut seen = [false; 3];
        for _ in 0..200 {
            seen[choose(&[0.0, 0.0, 0.0], &flat, &mut rng) as usize] = true;
        }
        assert_eq!(seen, [true; 3]);
    }

    #[test]
    fn top_k_keeps_the_k_most_likely_and_the_penalty_scales_by_sign() {
        let mut rng = SplitMix::new(2);
        let two = Sampling {
            temperature: 1.0,
            top_k: Some(2),
            ..Sampling::GREEDY
        };
        let mut seen = [0; 4];
        for _ in 0..400 {
            seen[choose(&[0.0, 3.0, 2.9, 1.0], &two, &mut rng) as usize] += 1;
        }
        assert!(
            seen[0] == 0 && seen[3] == 0 && seen[1] > 0 && seen[2] > 0,
            "{seen:?}"
        );
        // ties at the k-th are kept, as transformers'
        assert_eq!(kth_largest(&[0.1, 0.5, 0.5, 0.2], 2), 0.5);
        assert_eq!(kth_largest(&[0.1, 0.5, 0.3, 0.3], 2), 0.3);
        // at a huge temperature every weight rounds to 1, and top-k still keeps the top two
        // scores; at a tiny one the scaled logits overflow, and sampling is greedy
        let hot = Sampling {
            temperature: 1e20,
            ..two
        };
        let cold = Sampling {
            temperature: 1e-310,
            ..two
        };
        let mut seen = [0; 4];
        for _ in 0..400 {
            seen[choose(&[0.0, 3.0, 2.9, 1.0], &hot, &mut rng) as usize] += 1;
            assert_eq!(choose(&[0.0, 3.0, 2.9, 1.0], &cold, &mut rng), 1);
        }
        assert!(
            seen[0] == 0 && seen[3] == 0 && seen[1] > 150 && seen[2] > 150,
            "{seen:?}"
        );
        let tokens = [0u32, 1, 9].into_iter().collect();
        assert_eq!(penalized(&[2.0, -2.0, 1.0], &tokens, 2.0), [1.0, -4.0, 1.0]);
    }

    /// The nucleus by a whole sort, as `choose` found it until 2026-12-06.
    fn nucleus_by_full_sort(probs: &[f64], total: f64, top_p: f64) -> Vec<(usize, f64)> {
        let mut items: Vec<(usize, f64)> = probs.iter().copied().enumerate().collect();
        items.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let (mut kept, mut mass) = (0, 0.0);
        for (_, p) in &items {
            kept += 1;
            mass += p / total;
            if mass >= top_p {
                break;
            }
        }
        items.truncate(kept);
        items
    }

    #[test]
    fn the_nucleus_equals_a_whole_sorts_on_peaked_flat_and_tied_distributions() {
        let mut rng = SplitMix::new(3);
        for (n, peak) in [(1000, 8.0), (1000, 0.0), (50, 3.0), (5000, 30.0)] {
            // ties: values on a coarse grid
            let probs: Vec<f64> = (0..n)
                .map(|_| ((rng.unit() * 20.0).floor() / 20.0 * peak).exp())
                .collect();
            let total: f64 = probs.iter().sum();
            for top_p in [0.0, 0.3, 0.9, 0.999, 1.0 - 1e-12] {
                assert_eq!(
                    nucleus(&probs, total, top_p),
                    nucleus_by_full_sort(&probs, total, top_p),
                    "n {n}, peak {peak}, top_p {top_p}"
                );
            }
        }
    }
}
