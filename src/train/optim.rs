//! AdamW on f32 master weights (torch's update rule), global-norm clipping and the LR schedule.

use super::policy::{Grads, Policy};
use crate::error::{Error, Result};
use candle_core::{DType, Tensor};
use std::collections::HashMap;
use std::path::Path;

#[derive(Debug, Clone, Copy)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// First and second moments per parameter, and the step count.
pub struct AdamW {
    pub params: AdamWParams,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    pub step: u64,
}

/// HF's Trainer exempts biases and norm weights from weight decay.
fn decays(name: &str) -> bool {
    !(name.ends_with(".bias") || name.ends_with("norm.weight"))
}

impl AdamW {
    pub fn new(policy: &Policy, params: AdamWParams) -> Result<Self> {
        let zeros = |v: &candle_core::Var| v.as_tensor().zeros_like();
        Ok(Self {
            params,
            m: policy
                .vars
                .iter()
                .map(zeros)
                .collect::<candle_core::Result<_>>()?,
            v: policy
                .vars
                .iter()
                .map(zeros)
                .collect::<candle_core::Result<_>>()?,
            step: 0,
        })
    }

    /// One update with learning rate `lr`; parameters without a gradient are left alone.
    pub fn update(&mut self, policy: &Policy, grads: &Grads, lr: f64) -> Result<()> {
        self.step += 1;
        let p = self.params;
        let t = self.step as i32;
        let (bc1, bc2) = (1.0 - p.beta1.powi(t), 1.0 - p.beta2.powi(t));
        for (i, var) in policy.vars.iter().enumerate() {
            let Some(g) = &grads[i] else { continue };
            let mut w = var.as_tensor().clone();
            if p.weight_decay != 0.0 && decays(&policy.names[i]) {
                w = (&w * (1.0 - lr * p.weight_decay))?;
            }
            self.m[i] = ((&self.m[i] * p.beta1)? + (g * (1.0 - p.beta1))?)?;
            self.v[i] = ((&self.v[i] * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let denom = ((self.v[i].sqrt()? / bc2.sqrt())? + p.eps)?;
            let w = (w - ((&self.m[i] / denom)? * (lr / bc1))?)?;
            var.set(&w)?;
        }
        Ok(())
    }

    /// Writes the moments and step as safetensors (`m.<name>`, `v.<name>`, `step`).
    pub fn save(&self, policy: &Policy, path: &Path) -> Result<()> {
        let mut t = HashMap::new();
        for (i, name) in policy.names.iter().enumerate() {
            t.insert(format!("m.{name}"), self.m[i].clone());
            t.insert(format!("v.{name}"), self.v[i].clone());
        }
        t.insert(
            "step".into(),
            Tensor::new(&[self.step as f64], &candle_core::Device::Cpu)?,
        );
        crate::model::weights::save(&t, path)
    }

    pub fn load(&mut self, policy: &Policy, path: &Path) -> Result<()> {
        let dev = policy.vars[0].device().clone();
        let t = crate::model::weights::load(&[path.to_path_buf()], DType::F32, &dev)?;
        let get = |k: &str| {
            t.get(k).cloned().ok_or_else(|| {
                Error::Train(format!("optimizer state `{}` lacks `{k}`", path.display()))
            })
        };
        for (i, name) in policy.names.iter().enumerate() {
            self.m[i] = get(&format!("m.{name}"))?;
            self.v[i] = get(&format!("v.{name}"))?;
        }
        self.step = get("step")?.to_dtype(DType::F64)?.to_vec1::<f64>()?[0] as u64;
        Ok(())
    }
}

/// L2 norm over all gradients.
pub fn global_norm(grads: &Grads) -> Result<f64> {
    let mut sq = 0.0;
    for g in grads.iter().flatten() {
        sq += g
            .sqr()?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
    }
    Ok(sq.sqrt())
}

/// torch's `clip_grad_norm_`: scale by max_norm / (norm + 1e-6) when that is below 1.
pub fn clip(grads: &mut Grads, norm: f64, max_norm: f64) -> Result<()> {
    let coef = max_norm / (norm + 1e-6);
    if max_norm > 0.0 && coef < 1.0 {
        for g in grads.iter_mut().flatten() {
            *g = (&*g * coef)?;
        }
    }
    Ok(())
}

/// Scales accumulated gradients (e.g. by 1 / grad_accum).
pub fn scale(grads: &mut Grads, factor: f64) -> Result<()> {
    for g in grads.iter_mut().flatten() {
        *g = (&*g * factor)?;
    }
    Ok(())
}

/// transformers' schedules: linear warmup over ceil(ratio·total) steps, then constant, linear
/// decay or cosine decay to 0. `step` is the 0-based optimizer step.
pub fn learning_rate(
    schedule: &str,
    base: f64,
    step: usize,
    total: usize,
    warmup_ratio: f64,
) -> f64 {
    let warmup = (warmup_ratio * total as f64).ceil() as usize;
    if step < warmup {
        return base * step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    match schedule {
        "linear" => base * (1.0 - progress).max(0.0),
        "cosine" => base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        _ => base,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules() {
        assert_eq!(learning_rate("cosine", 1.0, 0, 10, 0.1), 0.0);
        assert_eq!(learning_rate("cosine", 1.0, 1, 10, 0.1), 1.0);
        assert!((learning_rate("cosine", 1.0, 10, 10, 0.1) - 0.0).abs() < 1e-12);
        assert!((learning_rate("linear", 2.0, 4, 6, 0.0) - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(learning_rate("constant", 3.0, 9, 10, 0.0), 3.0);
    }
}
