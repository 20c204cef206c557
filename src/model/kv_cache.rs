//! The keys and values of a decoding run, kept per layer in buffers written in place.

use crate::error::Result;
use candle_core::Tensor;

/// The keys and values of every layer so far, for incremental decoding: per layer a buffer
/// [B, kv_heads, capacity, hd] written in place, so a step appends its slots instead of copying
/// everything before them (a concatenation per layer and step made decoding quadratic in memory
/// traffic).
#[derive(Debug, Default)]
pub struct KvCache {
    pub(super) layers: Vec<Option<LayerKv>>,
    capacity: usize,
}

impl KvCache {
    /// A cache sized for `slots` positions per row (prompt and new tokens); it grows past them.
    pub fn with_capacity(slots: usize) -> Self {
        Self {
            layers: Vec::new(),
            capacity: slots,
        }
    }

    pub(super) fn capacity(&self) -> usize {
        self.capacity
    }
}

/// One layer's keys and values: buffers [B, kv_heads, capacity, hd], the first `len` slots filled.
#[derive(Debug)]
pub(super) struct LayerKv {
    k: Tensor,
    v: Tensor,
    len: usize,
}

impl LayerKv {
    /// The slots of a prefill: the packed sequences of `lens` in k and v [1, kv_heads, Σ, hd],
    /// each in its own batch row, left-padded to the longest (padding slots stay zero; the
    /// decoding masks never show them).
    pub(super) fn fill(
        slot: &mut Option<LayerKv>,
        k: &Tensor,
        v: &Tensor,
        lens: &[usize],
        capacity: usize,
    ) -> Result<()> {
        let (_, kv, _, hd) = k.dims4()?;
        let width = lens.iter().copied().max().unwrap_or(0);
        let cap = capacity.max(width);
        let fresh = || Tensor::zeros((lens.len(), kv, cap, hd), k.dtype(), k.device());
        let filled = LayerKv {
            k: fresh()?,
            v: fresh()?,
            len: width,
        };
        let mut start = 0;
        for (row, &len) in lens.iter().enumerate() {
            for (buf, src) in [(&filled.k, k), (&filled.v, v)] {
                let part = src.narrow(2, start, len)?.contiguous()?;
                buf.narrow(0, row, 1)?.slice_set(&part, 2, width - len)?;
            }
            start += len;
        }
        *slot = Some(filled);
        Ok(())
    }

    /// Appends k and v [B, kv_heads, t, hd] after the slots so far (a new buffer where `slot` is
    /// empty, a larger one where it is full) → views of every slot so far, [B, kv_heads, len, hd],
    /// contiguous in their last two dimensions.
    pub(super) fn append(
        slot: &mut Option<LayerKv>,
        k: &Tensor,
        v: &Tensor,
        capacity: usize,
    ) -> Result<(Tensor, Tensor)> {
        let (k, v) = (k.contiguous()?, v.contiguous()?);
        let t = k.dim(2)?;
        let len = slot.as_ref().map_or(0, |s| s.len);
        let have = slot.as_ref().map_or(0, |s| s.k.dim(2).unwrap_or(0));
        if len + t > have {
            let cap = capacity.max(len + t).max(2 * have);
            let (b, kv, _, hd) = k.dims4()?;
            let fresh = || Tensor::zeros((b, kv, cap, hd), k.dtype(), k.device());
            let grown = LayerKv {
                k: fresh()?,
                v: fresh()?,
                len,
            };
            if let Some(old) = slot.take() {
                grown
                    .k
                    .slice_set(&old.k.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
                grown
                    .v
                    .slice_set(&old.v.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
            }
            *slot = Some(grown);
        }
        let s = slot.as_mut().expect("filled above");
        s.k.slice_set(&k, 2, len)?;
        s.v.slice_set(&v, 2, len)?;
        s.len = len + t;
        Ok((s.k.narrow(2, 0, s.len)?, s.v.narrow(2, 0, s.len)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn seq(b: usize, t: usize, from: f32) -> Tensor {
        Tensor::arange(from, from + (b * 2 * t * 3) as f32, &Device::Cpu)
            .unwrap()
            .reshape((b, 2, t, 3))
            .unwrap()
    }

    #[test]
    fn appends_equal_the_concatenation_past_the_capacity() {
        let mut slot = None;
        let parts = [seq(2, 4, 0.0), seq(2, 1, 100.0), seq(2, 3, 200.0)];
        let mut want: Option<Tensor> = None;
        for part in &parts {
            // capacity 5: the third part grows the buffers, keeping what came before
            let (k, v) = LayerKv::append(&mut slot, part, &(part * 2.0).unwrap(), 5).unwrap();
            want = Some(match want {
                Some(w) => Tensor::cat(&[&w, part], 2).unwrap(),
                None => part.clone(),
            });
            let w = want.as_ref().unwrap();
            let same = |a: &Tensor, b: &Tensor| -> bool {
                let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
                let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
                a == b
            };
            assert!(same(&k, w));
            assert!(same(&v, &(w * 2.0).unwrap()));
        }
        assert_eq!(slot.unwrap().len, 8);
    }

    #[test]
    fn a_prefill_left_pads_each_packed_sequence_into_its_row() {
        let mut slot = None;
        // sequences of 2 and 3 positions packed in one row
        let k = seq(1, 5, 1.0);
        LayerKv::fill(&mut slot, &k, &k, &[2, 3], 6).unwrap();
        let s = slot.unwrap();
        assert_eq!((s.len, s.k.dims()), (3, &[2, 2, 6, 3][..]));
        let row = |r: usize, slot: usize| -> Vec<f32> {
            s.k.narrow(0, r, 1)
                .unwrap()
                .narrow(2, slot, 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let packed = |p: usize| -> Vec<f32> {
            k.narrow(2, p, 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        // row 0: one padding slot, then packed positions 0 and 1; row 1: positions 2, 3, 4
        assert_eq!(row(0, 0), vec![0.0; 6]);
        assert_eq!((row(0, 1), row(0, 2)), (packed(0), packed(1)));
        assert_eq!((row(1, 0), row(1, 2)), (packed(2), packed(4)));
        assert_eq!(s.k.dtype(), DType::F32);
    }
}
