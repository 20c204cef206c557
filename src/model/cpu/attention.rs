//! A scoring forward's attention on the CPU, one task per (sequence, head, block of 64 queries):
//! the block's scores against the keys up to its last query (one small product), the soft cap,
//! the mask, the softmax in SIMD lanes and the value product, written straight into the
//! `[B, T, heads · head_dim]` rows the output projection reads. No `[T, T]` tensor, no candle
//! temporaries between the steps, and the tasks of every sequence and head spread over the
//! threads (candle's ops on one sequence's small products hardly used a second core).
//!
//! The same arithmetic as the composed ops (HF's eager attention): scores = q·kᵀ·scale, then
//! `cap · tanh(scores / cap)`, plus the additive mask, softmax in f32 (exp(x − max) / Σ), times v.

use super::{exp, SharedOut};
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

/// q [B, nh, Tq, hd], k and v [B, kv, Tk, hd] (f32 on the CPU) → [B, Tq, nh · hd]. Either
/// `mask` is [M, M] and each segment attends under its [len, len] prefix (Tq = Tk: a scoring
/// forward, padded or packed), or `mask` is [B, 1, Tq, Tk] and each segment is a whole row whose
/// queries are the last Tq of its Tk positions (a cached decoding step or prefill).
pub fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    segments: &[Segment],
    spec: Spec,
) -> Result<Tensor> {
    let (b, nh, tq, hd) = q.dims4()?;
    let (kb, kv, tk, khd) = k.dims4()?;
    let shape_err = |what: String| Err(Error::Model(format!("CPU attention: {what}")));
    if (kb, khd) != (b, hd) || tq > tk || v.dims4()? != k.dims4()? || kv == 0 || nh % kv != 0 {
        return shape_err(format!(
            "q {:?}, k {:?}, v {:?} are not [B, heads, T, head_dim] with whole groups",
            q.dims(),
            k.dims(),
            v.dims()
        ));
    }
    // the mask row of query i of segment s: its additive values over the keys of s
    let per_row = mask.rank() == 4;
    let (mask_rows, mask_cols) = if per_row {
        if mask.dims4()? != (b, 1, tq, tk) {
            return shape_err(format!(
                "mask {:?} is not [{b}, 1, {tq}, {tk}]",
                mask.dims()
            ));
        }
        (tq, tk)
    } else {
        mask.dims2()?
    };
    let q_offset = tk - tq;
    for s in segments {
        let whole_row = s.start == 0 && s.len == tk;
        let fits = if per_row {
            whole_row
        } else {
            tq == tk && s.len <= mask_rows.min(mask_cols)
        };
        if s.row >= b || s.start + s.len > tk || !fits {
            return shape_err(format!(
                "segment {s:?} outside [{b}, {tq}/{tk}] or its mask {:?}",
                mask.dims()
            ));
        }
    }
    // a [M, M] mask narrowed from a larger one is read through its row stride, not copied
    let mask = mask.to_dtype(DType::F32)?;
    let mask = if !per_row && mask.stride()[1] == 1 {
        mask
    } else {
        mask.contiguous()?
    };
    let mask_stride = if per_row { tk } else { mask.stride()[0] };
    // k and v may be views of a decoding cache's larger buffers: read through their head and
    // row strides where each position's head_dim values are contiguous
    let rows_contiguous = |t: &Tensor| -> Result<Tensor> {
        Ok(match t.stride() {
            [_, _, s2, 1] if *s2 == hd => t.clone(),
            _ => t.contiguous()?,
        })
    };
    let (q, k, v) = (q.contiguous()?, rows_contiguous(k)?, rows_contiguous(v)?);
    let (k_strides, v_strides) = (
        [k.stride()[0], k.stride()[1]],
        [v.stride()[0], v.stride()[1]],
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
    let mut out = vec![0f32; b * tq * width];
    let dst = SharedOut(out.as_mut_ptr());
    // tasks: (segment, head, first query of the block); a segment's queries are its last
    // len − q_offset positions
    let tasks: Vec<(Segment, usize, usize)> = segments
        .iter()
        .flat_map(|&s| {
            (0..nh).flat_map(move |h| {
                (0..s.len - q_offset)
                    .step_by(BLOCK)
                    .map(move |r0| (s, h, r0))
            })
        })
        .collect();
    let group = nh / kv;
    tasks
        .par_iter()
        .for_each_init(Vec::new, |scores, &(s, h, r0)| {
            let rows = BLOCK.min(s.len - q_offset - r0);
            let keys_end = q_offset + r0 + rows;
            let mask_row = |i: usize| -> &[f32] {
                let row = if per_row {
                    s.row * tq + i
                } else {
                    q_offset + i
                };
                let at = row * mask_stride;
                &ms[at..at + keys_end]
            };
            // the first key any query of the block sees (a window's lower edge, left padding)
            let first = (r0..r0 + rows)
                .map(|i| {
                    let row = mask_row(i);
                    row.iter()
                        .position(|m| m.is_finite())
                        .unwrap_or(q_offset + i)
                })
                .min()
                .unwrap_or(0);
            let keys = keys_end - first;
            let q_at = ((s.row * nh + h) * tq + s.start + r0) * hd;
            let at =
                |[row, head]: [usize; 2]| s.row * row + (h / group) * head + (s.start + first) * hd;
            let (k_at, v_at) = (at(k_strides), at(v_strides));
            let (qb, kb, vb) = (
                &qs[q_at..q_at + rows * hd],
                &ks[k_at..k_at + keys * hd],
                &vs[v_at..v_at + keys * hd],
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
                    qb.as_ptr(),
                    1,
                    hd as isize,
                    kb.as_ptr(),
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
            let out_at = (s.row * tq + s.start + r0) * width + h * hd;
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
                    vb.as_ptr(),
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
    Ok(Tensor::from_vec(out, (b, tq, width), &Device::Cpu)?)
}

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
                // a prefix of a larger mask, as contexts narrow it: read through its stride
                let mask = additive_mask(t + 5, window, &Device::Cpu)
                    .unwrap()
                    .narrow(0, 0, t)
                    .unwrap()
                    .narrow(1, 0, t)
                    .unwrap();
                assert!(!mask.is_contiguous());
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
    fn cached_queries_under_a_per_row_mask_equal_the_formula() {
        // a decoding step's last tq queries of tk keys, rows left-padded by 0, 3 and 70 keys
        let (b, nh, kv, hd, tk) = (3, 4, 2, 8, 90);
        let rnd = |n: usize, seed: u64| -> Vec<f32> {
            (0..n)
                .map(|i| (((i as u64 * 2654435761 + seed * 97) % 1000) as f32 / 250.0) - 2.0)
                .collect()
        };
        let pads = [0usize, 3, 70];
        for tq in [1, 5, 90] {
            let q_offset = tk - tq;
            let (qv, kv_, vv) = (
                rnd(b * nh * tq * hd, 1),
                rnd(b * kv * tk * hd, 2),
                rnd(b * kv * tk * hd, 3),
            );
            let mask: Vec<f32> = (0..b)
                .flat_map(|r| {
                    (0..tq).flat_map(move |i| {
                        (0..tk).map(move |j| {
                            if j >= pads[r] && j <= q_offset + i {
                                0.0
                            } else {
                                f32::NEG_INFINITY
                            }
                        })
                    })
                })
                .collect();
            let t = |v: Vec<f32>, s: (usize, usize, usize, usize)| {
                Tensor::from_vec(v, s, &Device::Cpu).unwrap()
            };
            let q = t(qv.clone(), (b, nh, tq, hd));
            let k = t(kv_.clone(), (b, kv, tk, hd));
            let v = t(vv.clone(), (b, kv, tk, hd));
            let mask = t(mask, (b, 1, tq, tk));
            let rows: Vec<Segment> = (0..b)
                .map(|row| Segment {
                    row,
                    start: 0,
                    len: tk,
                })
                .collect();
            let spec = Spec {
                scale: 0.4,
                softcap: None,
            };
            let got: Vec<f32> = attend(&q, &k, &v, &mask, &rows, spec)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            // k and v as a decoding cache holds them: views of larger buffers, read in place
            let view = |x: &Tensor| {
                let buf = Tensor::zeros((b, kv, tk + 7, hd), DType::F32, &Device::Cpu).unwrap();
                buf.slice_set(x, 2, 0).unwrap();
                buf.narrow(2, 0, tk).unwrap()
            };
            let (kw, vw) = (view(&k), view(&v));
            assert!(!kw.is_contiguous());
            let in_place: Vec<f32> = attend(&q, &kw, &vw, &mask, &rows, spec)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(
                in_place.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                got.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
            let mut worst = 0f64;
            for r in 0..b {
                for h in 0..nh {
                    let kh = h / (nh / kv);
                    for i in 0..tq {
                        if pads[r] > q_offset + i {
                            continue; // a padded query sees nothing (NaN, as the composed ops)
                        }
                        let qi = &qv[((r * nh + h) * tq + i) * hd..][..hd];
                        let keys = pads[r]..=q_offset + i;
                        let sc: Vec<f64> = keys
                            .clone()
                            .map(|j| {
                                let kj = &kv_[((r * kv + kh) * tk + j) * hd..][..hd];
                                qi.iter()
                                    .zip(kj)
                                    .map(|(a, b)| *a as f64 * *b as f64)
                                    .sum::<f64>()
                                    * 0.4
                            })
                            .collect();
                        let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
                        for d in 0..hd {
                            let want: f64 = keys
                                .clone()
                                .zip(&sc)
                                .map(|(j, x)| {
                                    (x - m).exp() / z * vv[((r * kv + kh) * tk + j) * hd + d] as f64
                                })
                                .sum();
                            let g = got[((r * tq + i) * nh + h) * hd + d] as f64;
                            worst = worst.max((g - want).abs());
                        }
                    }
                }
            }
            assert!(worst < 2e-5, "tq {tq}: {worst}");
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
