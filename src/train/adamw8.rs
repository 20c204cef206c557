//! The CPU's loops for the 8-bit AdamW step (`train.optim = "adamw_8bit"`), block by block over
//! its threads: the moments read from their codes, torch's update, the moments stored again. The
//! f32 operations are the composed ops' ([`super::optim`]), in their order and with their scalars
//! rounded as candle's affine ops round them, so the two give the same bits with f32 weights
//! (a test); bf16 weights are rounded stochastically from a seed, as the dense fused step does.

use super::quant8::{Blockwise, Map, BLOCK};
use crate::error::Result;
use crate::model::fused::adamw::bf16_stochastic;
use crate::model::fused::adamw_step::Hyper;
use candle_core::{DType, Tensor};
use half::bf16;
use rayon::prelude::*;

/// Values read, stepped and written back at once (whole blocks).
const CHUNK: usize = 1 << 20;

/// One tensor's step: weights `w` (f32 or bf16, contiguous), gradient `g`, the 8-bit moments,
/// the gradients' clipping coefficient `grad_scale` and the weights' rounding `seed`.
pub struct Step<'a> {
    pub w: &'a Tensor,
    pub g: &'a Tensor,
    pub m: &'a Blockwise,
    pub v: &'a Blockwise,
    pub decays: bool,
    pub seed: u32,
}

/// The f32 scalars, rounded from f64 as the composed ops' affine ops round theirs.
struct Scalars {
    grad_scale: f32,
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    inv_sqrt_bc2: f32,
    eps: f32,
    decay: f32,
    lr_bc1: f32,
}

/// Steps `s` in place on the CPU.
pub fn step(s: &Step<'_>, maps: (&Map, &Map), h: Hyper, grad_scale: f64) -> Result<()> {
    let k = Scalars {
        grad_scale: grad_scale as f32,
        beta1: h.beta1 as f32,
        one_minus_beta1: (1.0 - h.beta1) as f32,
        beta2: h.beta2 as f32,
        one_minus_beta2: (1.0 - h.beta2) as f32,
        inv_sqrt_bc2: h.inv_sqrt_bc2 as f32,
        eps: h.eps as f32,
        decay: if s.decays { h.decay as f32 } else { 1.0 },
        lr_bc1: h.lr_bc1 as f32,
    };
    if !s.w.is_contiguous() {
        // the step writes through a flattened view of the weight's storage
        return Err(crate::error::Error::Train(
            "8-bit AdamW needs contiguous weights".into(),
        ));
    }
    let (flat_w, flat_g) = (s.w.flatten_all()?, s.g.flatten_all()?);
    let n = flat_w.elem_count();
    for start in (0..n).step_by(CHUNK) {
        let len = CHUNK.min(n - start);
        let mut w = flat_w
            .narrow(0, start, len)?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        let g = flat_g
            .narrow(0, start, len)?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        let (m, v) = (s.m.narrow(start, len)?, s.v.narrow(start, len)?);
        let (mut mc, mut ma) = (m.codes.to_vec1::<u8>()?, m.absmax.to_vec1::<f32>()?);
        let (mut vc, mut va) = (v.codes.to_vec1::<u8>()?, v.absmax.to_vec1::<f32>()?);
        w.par_chunks_mut(BLOCK)
            .zip(g.par_chunks(BLOCK))
            .zip(mc.par_chunks_mut(BLOCK))
            .zip(ma.par_iter_mut())
            .zip(vc.par_chunks_mut(BLOCK))
            .zip(va.par_iter_mut())
            .for_each(|(((((w, g), mc), ma), vc), va)| {
                block(&k, maps, w, g, (mc, ma), (vc, va));
            });
        let dev = flat_w.device();
        let w = match s.w.dtype() {
            DType::BF16 => {
                let r: Vec<bf16> = w
                    .par_iter()
                    .enumerate()
                    .map(|(j, &x)| bf16_stochastic(x, s.seed, start + j))
                    .collect();
                Tensor::from_vec(r, len, dev)?
            }
            dtype => Tensor::from_vec(w, len, dev)?.to_dtype(dtype)?,
        };
        flat_w.slice_set(&w, 0, start)?;
        let part = |codes: Vec<u8>, absmax: Vec<f32>| -> Result<Blockwise> {
            let blocks = absmax.len();
            Ok(Blockwise {
                codes: Tensor::from_vec(codes, len, dev)?,
                absmax: Tensor::from_vec(absmax, blocks, dev)?,
            })
        };
        s.m.write(&part(mc, ma)?, start)?;
        s.v.write(&part(vc, va)?, start)?;
    }
    Ok(())
}

/// One block: the moments from their codes, torch's update of the weights (left in f32), the
/// moments' new absmax and codes.
fn block(
    k: &Scalars,
    (map_m, map_v): (&Map, &Map),
    w: &mut [f32],
    g: &[f32],
    (mc, ma): (&mut [u8], &mut f32),
    (vc, va): (&mut [u8], &mut f32),
) {
    let mut m = [0f32; BLOCK];
    let mut v = [0f32; BLOCK];
    for j in 0..w.len() {
        let g = g[j] * k.grad_scale;
        m[j] = map_m.host()[mc[j] as usize] * *ma * k.beta1 + g * k.one_minus_beta1;
        v[j] = map_v.host()[vc[j] as usize] * *va * k.beta2 + g * g * k.one_minus_beta2;
        let denom = v[j].sqrt() * k.inv_sqrt_bc2 + k.eps;
        w[j] = w[j] * k.decay - m[j] / denom * k.lr_bc1;
    }
    let len = w.len();
    store(&m[..len], map_m, mc, ma);
    store(&v[..len], map_v, vc, va);
}

/// `x` as codes and an absmax, as [`Blockwise::quantize`] stores it.
fn store(x: &[f32], map: &Map, codes: &mut [u8], absmax: &mut f32) {
    let top = x.iter().fold(0f32, |a, &b| a.max(b.abs()));
    let inv = 1.0 / top.max(1e-38);
    for (c, &x) in codes.iter_mut().zip(x) {
        *c = map.nearest_host((x * inv).clamp(-1.0, 1.0));
    }
    *absmax = top;
}
