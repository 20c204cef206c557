//! AdamW on the master weights (torch's update rule; f32, or bf16 rounded stochastically), its
//! moments in the state dtype, global-norm clipping and the LR schedule.

use super::grads::Grads;
use super::policy::Policy;
use crate::config::LrSchedule;
use crate::error::{Error, Result};
use crate::model::fused::{self, adamw_step};
use crate::profile::{self, Phase};
use candle_core::{DType, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Elements updated at once: large tensors (the embedding) are stepped in row slices, so the
/// step's f32 temporaries stay small next to the weights.
const UPDATE_CHUNK: usize = 1 << 24;

#[derive(Debug, Clone, Copy)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// First and second moments per parameter (stored in `dtype`), and the step count.
pub struct AdamW {
    pub params: AdamWParams,
    dtype: DType,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    pub step: u64,
}

/// HF's Trainer exempts biases and norm weights from weight decay.
fn decays(name: &str) -> bool {
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
    /// stochastically).
    pub fn new(policy: &Policy, params: AdamWParams, dtype: DType) -> Result<Self> {
        let zeros = |v: &candle_core::Var| Tensor::zeros(v.shape(), dtype, v.device());
        Ok(Self {
            params,
            dtype,
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

    /// Bytes held by the moments.
    pub fn bytes(&self) -> usize {
        self.m
            .iter()
            .chain(&self.v)
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
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
    /// Fused (CUDA and the CPU, unless `REFDPO_FUSED=0`): the whole step over all tensors at
    /// once, on CUDA in three launches ([`adamw_step`]); else the norm, then the composed update
    /// tensor by tensor.
    pub fn step(&mut self, policy: &Policy, grads: &Grads, lr: f64, max_norm: f64) -> Result<f64> {
        let p = self.params;
        let step = self.step + 1;
        let hyper = hyper(p, lr, step as i32);
        // the step over all tensors at once: CUDA's kernels, or the CPU's loops over its
        // threads (unless `REFDPO_FUSED=0`, as for the CPU's scoring kernels)
        let fused = policy
            .vars
            .first()
            .is_some_and(|v| v.device().is_cpu() || fused::enabled(v.device()))
            && !fused::disabled();
        if fused {
            // seeds of the bf16 moments' and weights' rounding: (step, tensor, which)
            let seed =
                |i: usize, which: u64| crate::rng::bits(step, ((i as u64) << 2 | which) + 1) as u32;
            // a stored gradient may be a view (a matmul's transposed weight gradient): the
            // kernels read rows
            let rows: Vec<Option<Tensor>> = grads
                .iter()
                .map(|g| g.map(Tensor::contiguous).transpose())
                .collect::<candle_core::Result<_>>()?;
            let slots: Vec<adamw_step::Slot<'_>> = policy
                .vars
                .iter()
                .enumerate()
                .filter_map(|(i, var)| {
                    Some(adamw_step::Slot {
                        w: var.as_tensor(),
                        m: &self.m[i],
                        v: &self.v[i],
                        g: rows[i].as_ref()?,
                        decays: p.weight_decay != 0.0 && decays(&policy.names[i]),
                        seeds: [seed(i, 0), seed(i, 1), seed(i, 2)],
                    })
                })
                .collect();
            match adamw_step::unsupported(&slots) {
                None => {
                    let _phase = profile::scope(Phase::Optimizer);
                    let norm = adamw_step::step(&slots, hyper, max_norm)?;
                    if norm.is_finite() {
                        self.step = step;
                    }
                    return Ok(norm);
                }
                Some(why) => profile::note_once(format!(
                    "the optimizer step takes the composed ops: the fused step does not cover {why}"
                )),
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
            self.update_composed(i, var.as_tensor(), g, lr, decay, grad_scale)?;
        }
        Ok(norm)
    }

    /// torch's AdamW on tensor `i` with composed ops, one row slice at a time (one slice for all
    /// but the largest tensors), in place.
    fn update_composed(
        &self,
        i: usize,
        w: &Tensor,
        g: &Tensor,
        lr: f64,
        decay: f64,
        grad_scale: f64,
    ) -> Result<()> {
        let rows = w.dim(0)?;
        let row_len = w.elem_count() / rows.max(1);
        let step_rows = (UPDATE_CHUNK / row_len.max(1)).max(1);
        for start in (0..rows).step_by(step_rows) {
            let len = step_rows.min(rows - start);
            let part = |t: &Tensor| t.narrow(0, start, len);
            let (w_new, m, v) = self.adam(
                &part(w)?,
                &part(&self.m[i])?,
                &part(&self.v[i])?,
                &part(g)?,
                lr,
                decay,
                grad_scale,
            )?;
            w.slice_set(&w_new, 0, start)?;
            self.m[i].slice_set(&m, 0, start)?;
            self.v[i].slice_set(&v, 0, start)?;
        }
        Ok(())
    }

    /// torch's AdamW on one tensor (or row slice), in f32: returns (w, m, v), the weights in
    /// their own dtype and the moments in the state dtype (bf16 rounded stochastically).
    #[allow(clippy::too_many_arguments)]
    fn adam(
        &self,
        w: &Tensor,
        m: &Tensor,
        v: &Tensor,
        g: &Tensor,
        lr: f64,
        decay: f64,
        grad_scale: f64,
    ) -> Result<(Tensor, Tensor, Tensor)> {
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
        Ok((w_new, self.store(m)?, self.store(v)?))
    }

    /// Writes the moments (in their state dtype) and step as safetensors (`m.<name>`,
    /// `v.<name>`, `step`).
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
            for (moment, slot) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                let key = format!("{moment}.{name}");
                let t = get(&key)?;
                if t.dims() != policy.vars[i].dims() {
                    return Err(Error::Train(format!(
                        "optimizer state `{}` holds `{key}` of shape {:?} for weights of shape \
                         {:?}: the checkpoint is damaged or from another model",
                        path.display(),
                        t.dims(),
                        policy.vars[i].dims()
                    )));
                }
                *slot = t.to_dtype(self.dtype)?;
            }
        }
        let step = get("step")?
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        self.step = match step[..] {
            // an integer below 2^53, as written
            [s] if s >= 0.0 && s.fract() == 0.0 && s < 9.007e15 => s as u64,
            _ => {
                return Err(Error::Train(format!(
                    "optimizer state `{}`: `step` is {step:?}, not one count of steps: the \
                     checkpoint is damaged",
                    path.display()
                )))
            }
        };
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
/// decay or cosine decay to 0. `step` is the 0-based optimizer step.
pub fn learning_rate(
    schedule: LrSchedule,
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
        LrSchedule::Constant => base,
        LrSchedule::Linear => base * (1.0 - progress).max(0.0),
        LrSchedule::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// torch's AdamW defaults with `weight_decay`.
    fn params(weight_decay: f64) -> AdamWParams {
        AdamWParams {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
        }
    }

    #[test]
    fn stochastic_bf16_rounding_is_unbiased() {
        let dev = candle_core::Device::Cpu;
        // 1 + 2^-9 lies a quarter of the way from 1 to the next bf16, 1 + 2^-7: nearest rounding
        // always gives 1; stochastic rounding averages to the value (σ of the mean 3.4e-6).
        let x = 1.0f32 + 2f32.powi(-9);
        let t = Tensor::full(x, 1_000_000, &dev).unwrap();
        let r = round_bf16_stochastic(&t).unwrap();
        let vals = r.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
        assert!(
            vals.iter().all(|&v| v == 1.0 || v == 1.0 + 2f32.powi(-7)),
            "{:?}",
            &vals[..4]
        );
        let mean = vals.iter().map(|&v| f64::from(v)).sum::<f64>() / vals.len() as f64;
        assert!((mean - f64::from(x)).abs() < 2e-5, "mean {mean} vs {x}");
        let nearest = t
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        assert_eq!(nearest.to_vec1::<f32>().unwrap()[0], 1.0);
        // zeros, negatives and exact bf16 values are kept
        let exact = Tensor::new(&[0f32, -2.5, 3.0, -0.0078125], &dev).unwrap();
        let r = round_bf16_stochastic(&exact)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        assert_eq!(
            r.to_vec1::<f32>().unwrap(),
            vec![0.0, -2.5, 3.0, -0.0078125]
        );
    }

    /// The second moment's EMA under a constant g² = 1 (exact value 1 − 0.999^t): stored in
    /// bf16 with round-to-nearest it stalls near 0.25; rounded stochastically it tracks f32.
    #[test]
    fn bf16_second_moment_tracks_f32_only_with_stochastic_rounding() {
        let dev = candle_core::Device::Cpu;
        let beta2 = 0.999f64;
        let steps = 2000;
        let mut nearest = Tensor::zeros(4096, DType::BF16, &dev).unwrap();
        let mut stochastic = nearest.clone();
        let ema = |v: &Tensor| -> Tensor {
            ((v.to_dtype(DType::F32).unwrap() * beta2).unwrap() + (1.0 - beta2)).unwrap()
        };
        for _ in 0..steps {
            nearest = ema(&nearest).to_dtype(DType::BF16).unwrap();
            stochastic = round_bf16_stochastic(&ema(&stochastic)).unwrap();
        }
        let exact = 1.0 - beta2.powi(steps);
        let mean = |t: &Tensor| {
            t.to_dtype(DType::F32)
                .unwrap()
                .mean_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        };
        let (n, s) = (mean(&nearest), mean(&stochastic));
        assert!(
            (s - exact).abs() < 0.01 * exact,
            "stochastic {s} vs exact {exact}"
        );
        assert!(
            n < 0.5 * exact,
            "nearest rounding was expected to stall: {n} vs {exact}"
        );
    }

    /// bf16 master weights in [1.25, 2) (spacing 2^-7) under three steps of lr 1e-3, each far below
    /// half a spacing: with the composed and the fused step alike, every weight stays within a
    /// spacing per step of the f32 masters' trajectory (each step rounds afresh) and the mean
    /// change equals theirs (round-to-nearest would not move one weight).
    #[test]
    fn bf16_master_weights_move_by_the_update_on_average() {
        let dev = candle_core::Device::Cpu;
        let params = params(0.0);
        let (n, lr) = (1 << 16, 1e-3);
        let w0 = (Tensor::rand(1.25f32, 2f32, n, &dev).unwrap())
            .to_dtype(DType::BF16)
            .unwrap();
        let run = |weights: DType, fused: bool| -> Tensor {
            // a copy: to_dtype into the same dtype shares w0's storage
            let w = w0.to_dtype(weights).unwrap().copy().unwrap();
            let mut opt = AdamW {
                params,
                dtype: DType::F32,
                m: vec![Tensor::zeros(n, DType::F32, &dev).unwrap()],
                v: vec![Tensor::zeros(n, DType::F32, &dev).unwrap()],
                step: 0,
            };
            for step in 1..=3u32 {
                let g = Tensor::full(0.5f32 + step as f32, n, &dev).unwrap();
                opt.step += 1;
                let t = opt.step as i32;
                if fused {
                    let slot = adamw_step::Slot {
                        w: &w,
                        m: &opt.m[0],
                        v: &opt.v[0],
                        g: &g,
                        decays: false,
                        seeds: [1, 2, step],
                    };
                    adamw_step::step(&[slot], hyper(params, lr, t), 0.0).unwrap();
                } else {
                    opt.update_composed(0, &w, &g, lr, 1.0, 1.0).unwrap();
                }
            }
            (w.to_dtype(DType::F32).unwrap() - w0.to_dtype(DType::F32).unwrap()).unwrap()
        };
        let exact = run(DType::F32, true);
        let mean = |t: &Tensor| t.mean_all().unwrap().to_scalar::<f32>().unwrap();
        let want = mean(&exact);
        assert!(
            (want + 3e-3).abs() < 1e-4,
            "about three steps of -lr: {want}"
        );
        for fused in [true, false] {
            let got = run(DType::BF16, fused);
            let worst = crate::test_util::max_abs_diff(&got, &exact);
            // a step's rounding moves a weight by at most one spacing; the composed rounding
            // takes the next binade's (twice the) spacing within 0.07% below a power of two
            let spacings = if fused { 3.0 } else { 6.0 };
            assert!(
                worst <= spacings * 2f32.powi(-7),
                "fused {fused}: {worst} from f32's"
            );
            let m = mean(&got);
            // σ of the mean: about a third of a spacing over √65,536 elements, 1.2e-5
            assert!((m - want).abs() < 6e-5, "fused {fused}: mean {m} vs {want}");
        }
        let w0 = w0.to_dtype(DType::F32).unwrap();
        let nearest = (&w0 - 3e-3)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        assert_eq!(crate::test_util::max_abs_diff(&nearest, &w0), 0.0);
    }

    /// The fused step (on the CPU the kernels' loops) against the composed one: equal with f32
    /// moments, step after step, with weight decay on one tensor and not the other, a clipped
    /// step and bf16-rounded gradients; close with bf16 moments (each rounds its own random
    /// bits).
    #[test]
    fn fused_step_equals_the_composed_one() {
        let dev = candle_core::Device::Cpu;
        let params = params(0.01);
        let lr = 1e-3;
        let shapes = [(37, 29), (1, 5)];
        for dtype in [DType::F32, DType::BF16] {
            let zeros = |s| Tensor::zeros(s, dtype, &dev).unwrap();
            let fresh = || AdamW {
                params,
                dtype,
                m: shapes.iter().map(|&s| zeros(s)).collect(),
                v: shapes.iter().map(|&s| zeros(s)).collect(),
                step: 0,
            };
            let (mut fused, mut composed) = (fresh(), fresh());
            let w0: Vec<Tensor> = shapes
                .iter()
                .map(|&s| Tensor::randn(0f32, 1.0, s, &dev).unwrap())
                .collect();
            let wf: Vec<Tensor> = w0.iter().map(|w| w.copy().unwrap()).collect();
            let wc: Vec<Tensor> = w0.iter().map(|w| w.copy().unwrap()).collect();
            for step in 1..=6 {
                let g: Vec<Tensor> = shapes
                    .iter()
                    .map(|&s| {
                        let g = Tensor::randn(0f32, 1.0, s, &dev).unwrap();
                        g.to_dtype(DType::BF16).unwrap().to_dtype(dtype).unwrap()
                    })
                    .collect();
                let max_norm = if step == 3 { 1.0 } else { 1e3 };
                fused.step += 1;
                composed.step += 1;
                let hyper = hyper(params, lr, fused.step as i32);
                let slots: Vec<_> = (0..2)
                    .map(|i| adamw_step::Slot {
                        w: &wf[i],
                        m: &fused.m[i],
                        v: &fused.v[i],
                        g: &g[i],
                        decays: i == 0,
                        seeds: [step, step + 7, step + 9],
                    })
                    .collect();
                let norm = adamw_step::step(&slots, hyper, max_norm).unwrap();
                let scale = adamw_step::clip_coefficient(norm, max_norm);
                assert_eq!(scale < 1.0, step == 3, "step {step}: norm {norm}");
                for i in 0..2 {
                    let decay = if i == 0 { hyper.decay } else { 1.0 };
                    composed
                        .update_composed(i, &wc[i], &g[i], lr, decay, scale)
                        .unwrap();
                }
                let vals = |t: &Tensor| {
                    t.to_dtype(DType::F32)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                };
                for i in 0..2 {
                    if dtype == DType::F32 {
                        assert_eq!(vals(&wf[i]), vals(&wc[i]), "weights {i}, step {step}");
                        assert_eq!(vals(&fused.m[i]), vals(&composed.m[i]), "m, step {step}");
                        assert_eq!(vals(&fused.v[i]), vals(&composed.v[i]), "v, step {step}");
                    } else {
                        // Each step's update differs by at most lr times the moments' relative
                        // rounding (one bf16 spacing, 2^-7, stochastically, in m and half in √v).
                        let d = crate::test_util::max_abs_diff(&wf[i], &wc[i]);
                        let bound = step as f32 * lr as f32 * 2f32.powi(-6);
                        assert!(d < bound, "step {step}: {d} (bound {bound})");
                        assert!(i == 1 || d > 0.0, "bf16 moments draw their own bits");
                    }
                }
            }
        }
    }
}
