//! A scoring forward's attention on the CPU, one task per (sequence, head, block of 64 queries):
//! the block's scores against the keys up to its last query (one small product), the soft cap,
//! the mask, the softmax in SIMD lanes and the value product, written straight into the
//! `[B, T, heads · head_dim]` rows the output projection reads. No `[T, T]` tensor, no candle
//! temporaries between the steps, and the tasks of every sequence and head spread over the
//! threads (candle's ops on one sequence's small products hardly used a second core).
//!
//! The same arithmetic as the composed ops (HF's eager attention): scores = q·kᵀ·scale, then
//! `cap · tanh(scores / cap)`, plus the additive mask, softmax in f32 (exp(x − max) / Σ), times v.

use super::exp;
use crate::error::{Error, Result};
use candle_core::{DType, Device, Storage, Tensor};
use rayon::prelude::*;

/// Queries per task.
const BLOCK: usize = 64;

/// What a layer's attention does to its scores.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    pub scale: f32,
    /// Gemma 2: cap · tanh(scores / cap), after the scale and before the mask.
    pub softcap: Option<f32>,
}

/// One sequence: its batch row, its first position in that row and its length.
#[derive(Debug, Clone, Copy)]
pub struct Segment {
    pub row: usize,
    pub start: usize,
    pub len: usize,
}

/// Whether [`attend`] takes q: f32 on the CPU, not tracked for a gradient (it has no backward),
/// unless `REFDPO_FUSED=0` asks for candle's ops.
pub fn covers(q: &Tensor) -> bool {
    q.device().is_cpu()
        && q.dtype() == DType::F32
        && !q.track_op()
        && !crate::model::fused::disabled()
}

/// q [B, nh, T, hd], k and v [B, kv, T, hd] (contiguous f32 on the CPU), `mask` [M, M]
/// additive f32 (each sequence attends under its [len, len] prefix) → [B, T, nh · hd].
pub fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    segments: &[Segment],
    spec: Spec,
) -> Result<Tensor> {
    let (b, nh, t, hd) = q.dims4()?;
    let (kb, kv, kt, khd) = k.dims4()?;
    let (mr, mc) = mask.dims2()?;
    let shape_err = |what: String| Err(Error::Model(format!("CPU attention: {what}")));
    if (kb, kt, khd) != (b, t, hd) || v.dims4()? != k.dims4()? || kv == 0 || nh % kv != 0 {
        return shape_err(format!(
            "q {:?}, k {:?}, v {:?} are not [B, heads, T, head_dim] with whole groups",
            q.dims(),
            k.dims(),
            v.dims()
        ));
    }
    for s in segments {
        if s.row >= b || s.start + s.len > t || s.len > mr.min(mc) {
            return shape_err(format!(
                "segment {s:?} outside [{b}, {t}] or its mask [{mr}, {mc}]"
            ));
        }
    }
    let (q, k, v, mask) = (
        q.contiguous()?,
        k.contiguous()?,
        v.contiguous()?,
        mask.to_dtype(DType::F32)?.contiguous()?,
    );
    let guards = [&q, &k, &v, &mask].map(|x| x.storage_and_layout());
    let slices: Vec<&[f32]> = guards
        .iter()
        .map(|(s, l)| match &**s {
            Storage::Cpu(cpu) => Ok(&cpu.as_slice::<f32>()?[l.start_offset()..]),
            _ => Err(Error::Model(
                "CPU attention: a tensor is not on the CPU".into(),
            )),
        })
        .collect::<Result<_>>()?;
    let (qs, ks, vs, ms) = (slices[0], slices[1], slices[2], slices[3]);

    let width = nh * hd;
    let mut out = vec![0f32; b * t * width];
    let dst = SharedOut(out.as_mut_ptr());
    let tasks: Vec<(Segment, usize, usize)> = segments
        .iter()
        .flat_map(|&s| {
            (0..nh).flat_map(move |h| (0..s.len).step_by(BLOCK).map(move |r0| (s, h, r0)))
        })
        .collect();
    let group = nh / kv;
    tasks
        .par_iter()
        .for_each_init(Vec::new, |scores, &(s, h, r0)| {
            let rows = BLOCK.min(s.len - r0);
            let keys_end = r0 + rows;
            let mask_row = |i: usize| &ms[i * mc..i * mc + keys_end];
            // the first key any query of the block sees (a sliding window's lower edge)
            let first = (r0..keys_end)
                .map(|i| mask_row(i).iter().position(|m| m.is_finite()).unwrap_or(i))
                .min()
                .unwrap_or(0);
            let keys = keys_end - first;
            fn head(
                x: &[f32],
                (s, heads, h, t, hd): (Segment, usize, usize, usize, usize),
            ) -> &[f32] {
                let at = ((s.row * heads + h) * t + s.start) * hd;
                &x[at..at + s.len * hd]
            }
            let (qh, kh, vh) = (
                head(qs, (s, nh, h, t, hd)),
                head(ks, (s, kv, h / group, t, hd)),
                head(vs, (s, kv, h / group, t, hd)),
            );
            scores.clear();
            scores.resize(rows * keys, 0.0);
            // SAFETY: every pointer spans its stated rows and strides within the slices above, and
            // `scores` holds rows × keys.
            unsafe {
                gemm::gemm(
                    rows,
                    keys,
                    hd,
                    scores.as_mut_ptr(),
                    1,
                    keys as isize,
                    false,
                    qh[r0 * hd..].as_ptr(),
                    1,
                    hd as isize,
                    kh[first * hd..].as_ptr(),
                    hd as isize,
                    1,
                    0.0,
                    spec.scale,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            for (i, row) in scores.chunks_exact_mut(keys).enumerate() {
                if let Some(cap) = spec.softcap {
                    for x in row.iter_mut() {
                        *x = (*x / cap).tanh() * cap;
                    }
                }
                for (x, m) in row.iter_mut().zip(&mask_row(r0 + i)[first..]) {
                    *x += m;
                }
                let max = exp::max(row);
                let sum = exp::exp_shifted_sum(row, max);
                for x in row.iter_mut() {
                    *x /= sum;
                }
            }
            let out_at = (s.row * t + s.start + r0) * width + h * hd;
            // SAFETY: this task alone writes rows r0..r0 + rows of its sequence, columns of head h;
            // `out` outlives the parallel loop.
            unsafe {
                gemm::gemm(
                    rows,
                    hd,
                    keys,
                    dst.at(out_at),
                    1,
                    width as isize,
                    false,
                    scores.as_ptr(),
                    1,
                    keys as isize,
                    vh[first * hd..].as_ptr(),
                    1,
                    hd as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        });
    drop(guards);
    Ok(Tensor::from_vec(out, (b, t, width), &Device::Cpu)?)
}

/// The output's base pointer, shared by tasks that write disjoint parts of it.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);

impl SharedOut {
    /// SAFETY: `i` is within the buffer.
    unsafe fn at(self, i: usize) -> *mut f32 {
        self.0.add(i)
    }
}
// SAFETY: the tasks write disjoint elements (see `attend`) and the buffer outlives them.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tables::additive_mask;

    /// HF's eager attention in f64, one query at a time.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        (nh, kv, t, hd): (usize, usize, usize, usize),
        s: Segment,
        window: usize,
        spec: Spec,
        out: &mut [f64],
    ) {
        for h in 0..nh {
            let kh = h / (nh / kv);
            for i in 0..s.len {
                let qi = &q[((s.row * nh + h) * t + s.start + i) * hd..][..hd];
                let lo = (i + 1).saturating_sub(window);
                let scores: Vec<f64> = (lo..=i)
                    .map(|j| {
                        let kj = &k[((s.row * kv + kh) * t + s.start + j) * hd..][..hd];
                        let mut x = qi
                            .iter()
                            .zip(kj)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                            * spec.scale as f64;
                        if let Some(cap) = spec.softcap {
                            x = (x / cap as f64).tanh() * cap as f64;
                        }
                        x
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = scores.iter().map(|x| (x - max).exp()).sum();
                for d in 0..hd {
                    out[((s.row * t + s.start + i) * nh + h) * hd + d] = (lo..=i)
                        .map(|j| {
                            (scores[j - lo] - max).exp() / sum
                                * v[((s.row * kv + kh) * t + s.start + j) * hd + d] as f64
                        })
                        .sum();
                }
            }
        }
    }

    #[test]
    fn packed_windowed_capped_grouped_attention_equals_the_formula() {
        let (nh, kv, hd) = (6, 2, 16);
        let rnd = |n: usize, seed: u64| -> Vec<f32> {
            let mut x = seed;
            (0..n)
                .map(|_| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
                })
                .collect()
        };
        // one packed row of ragged sequences (a block boundary inside and at its edges), and a
        // padded batch of two rows
        for (b, t, segs) in [
            (
                1,
                64 + 150 + 1 + 64,
                vec![(0, 0, 64), (0, 64, 150), (0, 214, 1), (0, 215, 64)],
            ),
            (2, 131, vec![(0, 0, 131), (1, 0, 131)]),
        ] {
            let segs: Vec<Segment> = segs
                .into_iter()
                .map(|(row, start, len)| Segment { row, start, len })
                .collect();
            for (window, softcap) in [(usize::MAX, None), (37, None), (37, Some(3.0f32))] {
                let spec = Spec {
                    scale: 0.3,
                    softcap,
                };
                let (qv, kv_, vv) = (
                    rnd(b * nh * t * hd, 1),
                    rnd(b * kv * t * hd, 2),
                    rnd(b * kv * t * hd, 3),
                );
                let q = Tensor::from_vec(qv.clone(), (b, nh, t, hd), &Device::Cpu).unwrap();
                let k = Tensor::from_vec(kv_.clone(), (b, kv, t, hd), &Device::Cpu).unwrap();
                let v = Tensor::from_vec(vv.clone(), (b, kv, t, hd), &Device::Cpu).unwrap();
                let mask = additive_mask(t + 5, window, &Device::Cpu).unwrap();
                let got = attend(&q, &k, &v, &mask, &segs, spec).unwrap();
                assert_eq!(got.dims(), &[b, t, nh * hd]);
                let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
                let mut want = vec![0f64; got.len()];
                for &s in &segs {
                    reference(&qv, &kv_, &vv, (nh, kv, t, hd), s, window, spec, &mut want);
                }
                let worst = got
                    .iter()
                    .zip(&want)
                    .map(|(g, w)| (*g as f64 - w).abs())
                    .fold(0f64, f64::max);
                assert!(
                    worst < 2e-5,
                    "b {b}, window {window}, cap {softcap:?}: {worst}"
                );
            }
        }
    }

    #[test]
    fn segments_outside_the_batch_or_mask_are_errors() {
        let x = Tensor::zeros((1, 2, 8, 4), DType::F32, &Device::Cpu).unwrap();
        let mask = additive_mask(8, usize::MAX, &Device::Cpu).unwrap();
        let spec = Spec {
            scale: 1.0,
            softcap: None,
        };
        for s in [
            Segment {
                row: 1,
                start: 0,
                len: 8,
            },
            Segment {
                row: 0,
                start: 4,
                len: 5,
            },
        ] {
            let err = attend(&x, &x, &x, &mask, &[s], spec)
                .unwrap_err()
                .to_string();
            assert!(err.contains("segment"), "{err}");
        }
        let small = additive_mask(4, usize::MAX, &Device::Cpu).unwrap();
        let s = Segment {
            row: 0,
            start: 0,
            len: 8,
        };
        assert!(attend(&x, &x, &x, &small, &[s], spec).is_err());
    }
}
