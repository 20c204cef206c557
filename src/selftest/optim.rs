//! The optimizer's selftest cases: one step over several tensors at once on a device, run the
//! same way on the CPU (the kernels' loops) for the reference.

use super::values;
use crate::error::Result;
use crate::model::fused;
use candle_core::{DType, Device, Tensor};

/// Values of four scales per 256-value block (70,001 of them, the last block short) stored as
/// 8-bit first and second moments on `device` and read back.
pub(super) fn quantized_round_trip(device: &Device) -> Result<Tensor> {
    use crate::train::quant8::{Blockwise, Map};
    let n = 70_001;
    let scales: Vec<f32> = (0..n)
        .map(|i| [1e-6f32, 1.0, 3e-2, 0.0][(i / 256) % 4])
        .collect();
    let x =
        (values(&[n], 33)? * Tensor::new(scales.as_slice(), &Device::Cpu)?)?.to_device(device)?;
    let m =
        Blockwise::quantize(&x, &Map::new(true, device)?)?.dequantize(&Map::new(true, device)?)?;
    let v = Blockwise::quantize(&x.abs()?, &Map::new(false, device)?)?
        .dequantize(&Map::new(false, device)?)?;
    Ok(Tensor::cat(&[m, v], 0)?)
}

/// One AdamW step (lr 1e-3, f32 state) on weights in [1, 2), where bf16's spacing is 2^-7 and
/// round-to-nearest would drop the step, stored in `weights` (bf16 or f32) from the same bf16
/// values: the change's means over the two halves.
pub(super) fn bf16_weights_step(device: &Device, weights: DType) -> Result<Tensor> {
    use fused::adamw_step::{step, Hyper, Slot};
    let n = 1 << 16;
    let w0 = (values(&[n], 31)?.abs()? + 1.0)?
        .to_dtype(DType::BF16)?
        .to_dtype(DType::F32)?;
    let w = w0.to_dtype(weights)?.to_device(device)?.copy()?;
    let g = (values(&[n], 32)?.abs()? + 0.1)?.to_device(device)?;
    let (m, v) = (g.zeros_like()?, g.zeros_like()?);
    let slot = Slot {
        w: &w,
        m: &m,
        v: &v,
        g: &g,
        decays: false,
        seeds: [5, 6, 7],
    };
    let (beta1, beta2, lr) = (0.9f64, 0.999f64, 1e-3);
    let hyper = Hyper {
        beta1,
        beta2,
        eps: 1e-8,
        decay: 1.0,
        lr_bc1: lr / (1.0 - beta1),
        inv_sqrt_bc2: 1.0 / (1.0 - beta2).sqrt(),
    };
    step(&[slot], hyper, 0.0)?;
    let delta = (w.to_device(&Device::Cpu)?.to_dtype(DType::F32)? - w0)?;
    Ok(delta.reshape((2, n / 2))?.mean(1)?)
}

/// Two optimizer steps over all tensors at once (f32 weights, moments and gradients, the
/// gradients rounded through `dtype`) on `device`, the second one clipped: the weights' change
/// ([64, 33] and [70000], the second two chunks long, without weight decay) and the norms.
pub(super) fn optimizer_step(device: &Device, dtype: DType) -> Result<(Tensor, Tensor)> {
    use fused::adamw_step::{step, Slot};
    let shapes: [&[usize]; 2] = [&[64, 33], &[70_000]];
    let w0 = [values(shapes[0], 15)?, values(shapes[1], 16)?];
    let w: Vec<Tensor> = w0
        .iter()
        .map(|w| w.to_device(device)?.copy())
        .collect::<candle_core::Result<_>>()?;
    let zeros = |s: &[usize]| Tensor::zeros(s, DType::F32, device);
    let (m, v) = (
        [zeros(shapes[0])?, zeros(shapes[1])?],
        [zeros(shapes[0])?, zeros(shapes[1])?],
    );
    let mut norms = Vec::new();
    for t in 1..=2i32 {
        let g = (0..2)
            .map(|i| {
                let g = values(shapes[i], 20 + 2 * t as u64 + i as u64)?;
                Ok(g.to_dtype(dtype)?.to_dtype(DType::F32)?.to_device(device)?)
            })
            .collect::<Result<Vec<_>>>()?;
        let slots: Vec<Slot<'_>> = (0..2)
            .map(|i| Slot {
                w: &w[i],
                m: &m[i],
                v: &v[i],
                g: &g[i],
                decays: i == 0,
                seeds: [0; 3],
            })
            .collect();
        let hyper = step_hyper(t);
        let max_norm = if t == 2 { 1.0 } else { 0.0 };
        norms.push(step(&slots, hyper, max_norm)? as f32);
    }
    let delta = w
        .iter()
        .zip(&w0)
        .map(|(w, w0)| (w.to_device(&Device::Cpu)? - w0)?.flatten_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok((Tensor::cat(&delta, 0)?, Tensor::new(norms, &Device::Cpu)?))
}

/// Two steps (the second clipped) of a dense [64, 33] tensor and two with 8-bit moments ([70001]:
/// two chunks and a short last block; [64, 80] without weight decay) on `device`, f32 weights
/// and everything else in `state` (the gradients rounded through it), from zero moments:
/// (the weights' change, the 8-bit moments dequantized, the two norms), on the CPU in f32.
pub(super) fn eight_bit_step(device: &Device, state: DType) -> Result<(Tensor, Tensor, Tensor)> {
    use crate::train::adamw8;
    use crate::train::fused_step::step_8bit;
    use crate::train::moments::Maps;
    use crate::train::quant8::Blockwise;
    use fused::adamw_step::Slot;
    let shapes: [&[usize]; 3] = [&[64, 33], &[70_001], &[64, 80]];
    let w0: Vec<Tensor> = (0..3)
        .map(|i| values(shapes[i], 40 + i as u64))
        .collect::<Result<_>>()?;
    let w: Vec<Tensor> = w0
        .iter()
        .map(|w| w.to_device(device)?.copy())
        .collect::<candle_core::Result<_>>()?;
    let zeros = Tensor::zeros(shapes[0], state, device)?;
    let (m, v) = (zeros.copy()?, zeros);
    let q8: Vec<(Blockwise, Blockwise)> = [shapes[1], shapes[2]]
        .iter()
        .map(|s| {
            let n = s.iter().product();
            Ok((Blockwise::zeros(n, device)?, Blockwise::zeros(n, device)?))
        })
        .collect::<Result<_>>()?;
    let maps = Maps::new(device)?;
    let mut norms = Vec::new();
    for t in 1..=2i32 {
        let g: Vec<Tensor> = (0..3)
            .map(|i| {
                let g = values(shapes[i], 50 + 3 * t as u64 + i as u64)?;
                Ok(g.to_dtype(state)?.to_device(device)?)
            })
            .collect::<Result<_>>()?;
        let slot = Slot {
            w: &w[0],
            m: &m,
            v: &v,
            g: &g[0],
            decays: true,
            seeds: [1, 2, 3],
        };
        let eight: Vec<adamw8::Step<'_>> = (0..2)
            .map(|i| adamw8::Step {
                w: &w[i + 1],
                g: &g[i + 1],
                m: &q8[i].0,
                v: &q8[i].1,
                decays: i == 0,
                seed: 4 + i as u32,
            })
            .collect();
        let hyper = step_hyper(t);
        let max_norm = if t == 2 { 1.0 } else { 0.0 };
        let norm = step_8bit(&[slot], &eight, &maps, hyper, max_norm)?.ok_or_else(|| {
            crate::error::Error::Model(
                "selftest: the fused 8-bit step does not cover its tensors".into(),
            )
        })?;
        norms.push(norm as f32);
    }
    let cpu = |t: &Tensor| -> Result<Tensor> { Ok(t.to_device(&Device::Cpu)?.flatten_all()?) };
    let delta = w
        .iter()
        .zip(&w0)
        .map(|(w, w0)| Ok((cpu(w)? - w0.flatten_all()?)?))
        .collect::<Result<Vec<_>>>()?;
    let moments = q8
        .iter()
        .map(|(m, v)| {
            Ok(Tensor::cat(
                &[cpu(&m.dequantize(&maps.m)?)?, cpu(&v.dequantize(&maps.v)?)?],
                0,
            )?)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((
        Tensor::cat(&delta, 0)?,
        Tensor::cat(&moments, 0)?,
        Tensor::new(norms, &Device::Cpu)?,
    ))
}

/// The scalars of step `t` of the optimizer cases: lr 1e-3, β (0.9, 0.999), weight decay 0.01.
fn step_hyper(t: i32) -> fused::adamw_step::Hyper {
    let (lr, beta1, beta2) = (1e-3, 0.9f64, 0.999f64);
    let (bc1, bc2) = (1.0 - beta1.powi(t), 1.0 - beta2.powi(t));
    fused::adamw_step::Hyper {
        beta1,
        beta2,
        eps: 1e-8,
        decay: 1.0 - lr * 0.01,
        lr_bc1: lr / bc1,
        inv_sqrt_bc2: 1.0 / bc2.sqrt(),
    }
}
