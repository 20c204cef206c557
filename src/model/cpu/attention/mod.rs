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

/// One sequence: its batch row, where its queries and its keys start in that row, its
/// positions, and how many of the first have no query (their keys are another sequence's rows:
/// a prompt shared by a pair's two sequences, or a decoding cache).
#[derive(Debug, Clone, Copy)]
pub struct Segment {
    pub row: usize,
    /// Its first query's row in q and in the output.
    pub start: usize,
    /// Its first key's row in k and v.
    pub keys: usize,
    /// Its positions, all of them keys.
    pub len: usize,
    /// The positions before its first query: its queries are positions `offset..len`.
    pub offset: usize,
}

impl Segment {
    /// A sequence at `start` of `row` whose every position is a query and a key.
    pub fn whole(row: usize, start: usize, len: usize) -> Self {
        Self {
            row,
            start,
            keys: start,
            len,
            offset: 0,
        }
    }

    /// Its queries.
    fn queries(&self) -> usize {
        self.len - self.offset
    }
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
/// `mask` is [M, M] and each segment's queries attend under their rows of its [len, len] prefix
/// (a scoring forward, padded or packed, its sequences whole or sharing a prompt's keys), or
/// `mask` is [B, 1, Tq, Tk] and each segment is a whole row whose queries are the last Tq of
/// its Tk positions (a cached decoding step or prefill).
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
    if (kb, khd) != (b, hd) || v.dims4()? != k.dims4()? || kv == 0 || nh % kv != 0 {
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
    for s in segments {
        let fits = if per_row {
            s.start == 0 && s.keys == 0 && s.len == tk && tk.checked_sub(tq) == Some(s.offset)
        } else {
            s.len <= mask_rows.min(mask_cols)
        };
        if s.row >= b
            || s.offset > s.len
            || s.start + s.queries() > tq
            || s.keys + s.len > tk
            || !fits
        {
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
    // tasks: (segment, head, first query of the block); a segment's queries are its positions
    // offset..len
    let tasks: Vec<(Segment, usize, usize)> = segments
        .iter()
        .flat_map(|&s| {
            (0..nh).flat_map(move |h| (0..s.queries()).step_by(BLOCK).map(move |r0| (s, h, r0)))
        })
        .collect();
    let group = nh / kv;
    tasks
        .par_iter()
        .for_each_init(Vec::new, |scores, &(s, h, r0)| {
            let rows = BLOCK.min(s.queries() - r0);
            let keys_end = s.offset + r0 + rows;
            let mask_row = |i: usize| -> &[f32] {
                let row = if per_row {
                    s.row * tq + i
                } else {
                    s.offset + i
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
                        .unwrap_or(s.offset + i)
                })
                .min()
                .unwrap_or(0);
            let keys = keys_end - first;
            let q_at = ((s.row * nh + h) * tq + s.start + r0) * hd;
            let at =
                |[row, head]: [usize; 2]| s.row * row + (h / group) * head + (s.keys + first) * hd;
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
mod tests;
