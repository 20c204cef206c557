//! AdamW on the master weights (torch's update rule; f32, or bf16 rounded stochastically), its
//! moments in the state dtype, global-norm clipping and the LR schedule.

use super::grads::Grads;
use super::moments::{self, Maps, Moments};
use super::policy::Policy;
use super::quant8::Blockwise;
use crate::config::LrSchedule;
use crate::error::{Error, Result};
use crate::model::fused::{self, adamw_step};
use crate::profile::{self, Phase};
use candle_core::{DType, Tensor};
use std::path::Path;

/// Elements updated at once by the composed ops: large tensors (the embedding) are stepped in
/// slices, so the step's f32 temporaries stay small next to the weights. On the CPU every
/// temporary is a fresh heap allocation, and a few dozen of them are live at once: smaller
/// slices there (the time is the same).
fn update_chunk(device: &candle_core::Device) -> usize {
    if device.is_cpu() {
        1 << 20
    } else {
        1 << 24
    }
}

#[derive(Debug, Clone, Copy)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// One tensor's composed update: the learning rate, the weight-decay factor (1 − lr·decay, or
/// 1) and the gradients' clipping coefficient.
#[derive(Debug, Clone, Copy)]
struct Update {
    lr: f64,
    decay: f64,
    grad_scale: f64,
}

/// First and second moments per parameter (dense in `dtype`, or 8-bit), and the step count.
pub struct AdamW {
    pub params: AdamWParams,
    dtype: DType,
    pub(super) moments: Vec<Moments>,
    pub(super) maps: Maps,
    pub step: u64,
}

/// HF's Trainer exempts biases and norm weights from weight decay.
pub(super) fn decays(name: &str) -> bool {
    !(name.ends_with(".bias") || name.ends_with("norm.weight"))
}

/// Rounds f32 to bf16 stochastically: up with probability equal to the distance from the bf16
/// value below (in bf16 spacings), so small EMA increments survive on average. Round-to-nearest
/// would freeze a bf16 second moment: with β2 = 0.999 a step moves it by 0.1%, below half of
/// bf16's 2^-8 relative spacing.
pub fn round_bf16_stochastic(x: &Tensor) -> Result<Tensor> {
    let ln2 = std::f64::consts::LN_2;
    let mag = x.abs()?;
    // bf16 keeps 8 significant bits: its spacing in the binade of |x| is 2^(floor(log2|x|) − 7).
    // The offset keeps exact powers of two in their binade; 1e-30 keeps zero finite.
    let exponent = ((((&mag + 1e-30)?.log()? / ln2)? + 1e-3)?.floor()? - 7.0)?;
    // exp(k·ln 2) is within an ulp of 2^k: the bf16 cast makes it exact.
    let spacing = (exponent * ln2)?
        .exp()?
        .to_dtype(DType::BF16)?
        .to_dtype(DType::F32)?;
    // floor(|x|/s + u)·s, u ~ U[0, 1): the grid point below, or the one above with
    // probability equal to the fraction; exact values stay.
    let u = Tensor::rand(0f32, 1f32, x.shape(), x.device())?;
    let rounded = ((mag / &spacing)? + u)?.floor()?.mul(&spacing)?;
    Ok((x.sign()? * rounded)?.to_dtype(DType::BF16)?)
}

impl AdamW {
    /// Zero moments stored in `dtype` (f32: torch's AdamW; bf16: half the memory, rounded
    /// stochastically), or with `eight_bit` blockwise in 8 bits where bitsandbytes' `AdamW8bit`
    /// keeps them so under transformers (the rest in `dtype`).
    pub fn new(
        policy: &Policy,
        params: AdamWParams,
        dtype: DType,
        eight_bit: bool,
    ) -> Result<Self> {
        let device = policy
            .vars
            .first()
            .map_or(candle_core::Device::Cpu, |v| v.device().clone());
        let moments = policy
            .vars
            .iter()
            .zip(&policy.names)
            .map(|(var, name)| {
                let q8 = moments::takes_8bit(eight_bit, name, var.elem_count());
                Moments::zeros(var.shape(), q8, dtype, var.device())
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            params,
            dtype,
            moments,
            maps: Maps::new(&device)?,
            step: 0,
        })
    }

    /// Bytes held by the moments.
    pub fn bytes(&self) -> usize {
        self.moments.iter().map(Moments::bytes).sum()
    }

    fn store(&self, x: Tensor) -> Result<Tensor> {
        match self.dtype {
            DType::BF16 => round_bf16_stochastic(&x),
            dtype => Ok(x.to_dtype(dtype)?),
        }
    }

    /// One optimizer step with learning rate `lr`: the gradients clipped to `max_norm` (torch's
    /// `clip_grad_norm_`; off when <= 0), then AdamW; parameters without a gradient are left
    /// alone. Returns the gradients' global norm; when it is not finite nothing is updated (the
    /// caller stops the run).
    ///
    /// Fused (CUDA and the CPU, unless `REFDPO_FUSED` is `0` or `-adamw`): the whole step over
    /// all tensors at once ([`Self::step_fused`]); else the norm, then the composed update tensor
    /// by tensor.
    pub fn step(&mut self, policy: &Policy, grads: &Grads, lr: f64, max_norm: f64) -> Result<f64> {
        let p = self.params;
        let step = self.step + 1;
        let hyper = hyper(p, lr, step as i32);
        // the step over all tensors at once: CUDA's kernels, or the CPU's loops over its
        // threads (unless `REFDPO_FUSED` leaves it out: `0` or `-adamw`)
        let fused = policy
            .vars
            .first()
            .is_some_and(|v| v.device().is_cpu() || fused::enabled(v.device()))
            && !fused::leaves_out(fused::Kernel::Adamw);
        if fused {
            if let Some(norm) = self.step_fused(policy, grads, hyper, max_norm, step)? {
                if norm.is_finite() {
                    self.step = step;
                }
                return Ok(norm);
            }
        }
        let norm = {
            let _phase = profile::scope(Phase::Grads);
            grads.norm()?
        };
        if !norm.is_finite() {
            return Ok(norm);
        }
        let grad_scale = adamw_step::clip_coefficient(norm, max_norm);
        self.step = step;
        let _phase = profile::scope(Phase::Optimizer);
        for (i, var) in policy.vars.iter().enumerate() {
            let Some(g) = grads.get(i) else { continue };
            let decay = if p.weight_decay != 0.0 && decays(&policy.names[i]) {
                1.0 - lr * p.weight_decay
            } else {
                1.0
            };
            let up = Update {
                lr,
                decay,
                grad_scale,
            };
            match &self.moments[i] {
                Moments::Dense { .. } => self.update_composed(i, var.as_tensor(), g, up)?,
                Moments::Blockwise { m, v } => self.update_8bit(m, v, var.as_tensor(), g, up)?,
            }
        }
        Ok(norm)
    }

    /// torch's AdamW on tensor `i` with composed ops, one row slice at a time (one slice for all
    /// but the largest tensors), in place.
    fn update_composed(&self, i: usize, w: &Tensor, g: &Tensor, up: Update) -> Result<()> {
        let Some((m_all, v_all)) = self.moments[i].dense() else {
            return Err(Error::Train(format!("tensor {i} keeps 8-bit moments")));
        };
        let rows = w.dim(0)?;
        let row_len = w.elem_count() / rows.max(1);
        let step_rows = (update_chunk(w.device()) / row_len.max(1)).max(1);
        for start in (0..rows).step_by(step_rows) {
            let len = step_rows.min(rows - start);
            let part = |t: &Tensor| t.narrow(0, start, len);
            let (w_new, m, v) =
                self.adam(&part(w)?, &part(m_all)?, &part(v_all)?, &part(g)?, up)?;
            w.slice_set(&w_new, 0, start)?;
            m_all.slice_set(&self.store(m)?, 0, start)?;
            v_all.slice_set(&self.store(v)?, 0, start)?;
        }
        Ok(())
    }

    /// bitsandbytes' 8-bit AdamW on one tensor, in place, a slice of whole 256-value blocks at a
    /// time: the moments dequantized to f32, torch's update, the moments quantized again.
    fn update_8bit(
        &self,
        m_all: &Blockwise,
        v_all: &Blockwise,
        w: &Tensor,
        g: &Tensor,
        up: Update,
    ) -> Result<()> {
        if !w.is_contiguous() {
            // the update writes through a flattened view of the weight's storage
            return Err(Error::Train("8-bit AdamW needs contiguous weights".into()));
        }
        let (flat_w, flat_g) = (w.flatten_all()?, g.flatten_all()?);
        let n = flat_w.elem_count();
        // half the dense chunk: the binary search's temporaries are several per value
        let chunk = update_chunk(w.device()) / 2;
        for start in (0..n).step_by(chunk) {
            let len = chunk.min(n - start);
            let (m, v) = (m_all.narrow(start, len)?, v_all.narrow(start, len)?);
            let (w_new, m, v) = self.adam(
                &flat_w.narrow(0, start, len)?,
                &m.dequantize(&self.maps.m)?,
                &v.dequantize(&self.maps.v)?,
                &flat_g.narrow(0, start, len)?,
                up,
            )?;
            // the flattened view shares the weight's storage
            flat_w.slice_set(&w_new, 0, start)?;
            m_all.write(&Blockwise::quantize(&m, &self.maps.m)?, start)?;
            v_all.write(&Blockwise::quantize(&v, &self.maps.v)?, start)?;
        }
        Ok(())
    }

    /// torch's AdamW on one tensor (or slice), in f32: returns (w, m, v), the weights in their
    /// own dtype (bf16 rounded stochastically) and the moments in f32.
    fn adam(
        &self,
        w: &Tensor,
        m: &Tensor,
        v: &Tensor,
        g: &Tensor,
        up: Update,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let Update {
            lr,
            decay,
            grad_scale,
        } = up;
        let p = self.params;
        let t = self.step as i32;
        let (bc1, bc2) = (1.0 - p.beta1.powi(t), 1.0 - p.beta2.powi(t));
        let g = (g.to_dtype(DType::F32)? * grad_scale)?;
        let m = ((m.to_dtype(DType::F32)? * p.beta1)? + (&g * (1.0 - p.beta1))?)?;
        let v = ((v.to_dtype(DType::F32)? * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
        let denom = ((v.sqrt()? / bc2.sqrt())? + p.eps)?;
        let w_new = ((w.to_dtype(DType::F32)? * decay)? - ((&m / denom)? * (lr / bc1))?)?;
        let w_new = match w.dtype() {
            DType::BF16 => round_bf16_stochastic(&w_new)?,
            dtype => w_new.to_dtype(dtype)?,
        };
        Ok((w_new, m, v))
    }

    /// Writes the moments (in their state dtype, or 8-bit) and step as safetensors
    /// ([`moments::save`]).
    pub fn save(&self, policy: &Policy, path: &Path) -> Result<()> {
        let shapes: Vec<&[usize]> = policy.vars.iter().map(|v| v.dims()).collect();
        moments::save(&self.moments, &policy.names, &shapes, self.step, path)
    }

    pub fn load(&mut self, policy: &Policy, path: &Path) -> Result<()> {
        let shapes: Vec<&[usize]> = policy.vars.iter().map(|v| v.dims()).collect();
        self.step = moments::load(&mut self.moments, &self.maps, &policy.names, &shapes, path)?;
        Ok(())
    }
}

/// The fused step's scalars for step `t` (1-based) at learning rate `lr`.
fn hyper(p: AdamWParams, lr: f64, t: i32) -> adamw_step::Hyper {
    adamw_step::Hyper {
        beta1: p.beta1,
        beta2: p.beta2,
        eps: p.eps,
        decay: 1.0 - lr * p.weight_decay,
        lr_bc1: lr / (1.0 - p.beta1.powi(t)),
        inv_sqrt_bc2: 1.0 / (1.0 - p.beta2.powi(t)).sqrt(),
    }
}

/// transformers' schedules: linear warmup over ceil(ratio·total) steps, then constant, linear
/// decay or cosine decay to 0; `constant` has no warmup (transformers' `get_constant_schedule`
/// never reads it). `step` is the 0-based optimizer step.
pub fn learning_rate(
    schedule: LrSchedule,
    base: f64,
    step: usize,
    total: usize,
    warmup_ratio: f64,
) -> f64 {
    let warmup = match schedule {
        LrSchedule::Constant => 0,
        _ => (warmup_ratio * total as f64).ceil() as usize,
    };
    if step < warmup {
        return base * step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    match schedule {
        LrSchedule::Constant | LrSchedule::ConstantWithWarmup => base,
        LrSchedule::Linear => base * (1.0 - progress).max(0.0),
        LrSchedule::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

#[cfg(test)]
mod tests;
