//! Gradients between the backward and the optimizer step: one slot per parameter, summed in f32
//! and stored in the trainer's state dtype (bf16 halves them; TRL's bf16-autocast gradients carry
//! no more precision than that).

use crate::error::{Error, Result};
use crate::model::fused;
use crate::profile::{self, Phase};
use candle_core::{DType, Device, Tensor};

/// Per-parameter gradients, accumulated over micro-batches.
pub struct Grads {
    dtype: DType,
    slots: Vec<Option<Slot>>,
}

/// A stored gradient.
enum Slot {
    /// The first gradient added, kept as it came: it may share its storage with a tensor the
    /// caller still holds, so the next add writes a new sum.
    Shared(Tensor),
    /// A sum this store made: later adds go into it in place (no new tensor per add).
    Owned(Tensor),
}

impl Slot {
    fn tensor(&self) -> &Tensor {
        match self {
            Slot::Shared(t) | Slot::Owned(t) => t,
        }
    }
}

impl Grads {
    /// `len` empty slots whose sums are stored in `dtype`.
    pub fn new(len: usize, dtype: DType) -> Self {
        Self {
            dtype,
            slots: std::iter::repeat_with(|| None).take(len).collect(),
        }
    }

    /// Adds `g` (any float dtype) into slot `i`: the sum is taken in f32, then stored; from the
    /// third add on, in place.
    ///
    /// `g` is detached first: candle's gradient for a variable can still carry the graph it was
    /// computed from (e.g. `x̂ᵀ·grad` keeps the block's activations), which would keep every
    /// block's activations alive until the optimizer step, and chain into the moments.
    pub fn add(&mut self, i: usize, g: &Tensor) -> Result<()> {
        let _phase = profile::scope(Phase::Grads);
        let g = g.detach();
        self.slots[i] = Some(match self.slots[i].take() {
            None if g.dtype() == self.dtype => Slot::Shared(g),
            None => Slot::Owned(g.to_dtype(self.dtype)?),
            Some(Slot::Shared(acc)) => {
                let sum = (acc.to_dtype(DType::F32)? + g.to_dtype(DType::F32)?)?;
                Slot::Owned(sum.to_dtype(self.dtype)?)
            }
            Some(Slot::Owned(acc)) => {
                fused::accumulate(&acc, &g)?;
                Slot::Owned(acc)
            }
        });
        Ok(())
    }

    /// Slot `i` as a sum this store owns and may change in place, of `shape`: zeros when it is
    /// empty, a copy when it still shares the caller's tensor.
    fn owned(&mut self, i: usize, shape: (usize, usize), dev: &Device) -> Result<Tensor> {
        let acc = match self.slots[i].take() {
            None => Tensor::zeros(shape, self.dtype, dev)?,
            // a shared gradient may be a strided view (a matmul's transposed weight gradient):
            // the in-place ops write rows
            Some(Slot::Shared(t)) if t.is_contiguous() => t.copy()?,
            Some(Slot::Shared(t)) => t.contiguous()?,
            Some(Slot::Owned(t)) => t,
        };
        if acc.dims() != [shape.0, shape.1] {
            return Err(Error::Train(format!(
                "gradient slot {i} holds {:?}, not the {shape:?} being added into its rows",
                acc.dims()
            )));
        }
        self.slots[i] = Some(Slot::Owned(acc.clone()));
        Ok(acc)
    }

    /// Adds `g` [len, H] into rows `start..start + len` of slot `i` (of `shape`), in place:
    /// the sum in f32, stored in the slot's dtype (a head's gradient, one vocabulary chunk at a
    /// time, with no full-size gradient besides the slot).
    pub fn add_rows(
        &mut self,
        i: usize,
        start: usize,
        g: &Tensor,
        shape: (usize, usize),
    ) -> Result<()> {
        let _phase = profile::scope(Phase::Grads);
        let acc = self.owned(i, shape, g.device())?;
        fused::accumulate(&acc.narrow(0, start, g.dim(0)?)?, &g.detach())?;
        Ok(())
    }

    /// Scatter-adds `rows` [n, H] into the rows `ids` [n] of slot `i` (of `shape`; an
    /// embedding's gradient), on top of what the slot holds, in place: rows of the same id are
    /// summed in f32 first, then each touched row of the slot gets its sum, in f32, stored once
    /// in the slot's dtype. Rows whose id is `skip` add nothing (the pad row, as HF's
    /// `padding_idx`). The fused op does it in one pass ([`fused::embed_grad`]); composed
    /// (`REFDPO_FUSED=-accumulate`), only [distinct ids, H] exists besides the slot.
    pub fn index_add(
        &mut self,
        i: usize,
        ids: &[u32],
        skip: Option<u32>,
        rows: &Tensor,
        shape: (usize, usize),
    ) -> Result<()> {
        let _phase = profile::scope(Phase::Grads);
        let (n, h) = rows.dims2()?;
        if ids.len() != n || h != shape.1 {
            return Err(Error::Train(format!(
                "embedding gradient: {} ids for rows {:?} into a {shape:?} table",
                ids.len(),
                rows.dims()
            )));
        }
        let dev = rows.device();
        let acc = self.owned(i, shape, dev)?;
        // the distinct ids, sorted, and where each row's sum goes: its id's place among them,
        // or (skipped) one extra row that is dropped
        let mut distinct: Vec<u32> = ids.iter().copied().filter(|&t| Some(t) != skip).collect();
        distinct.sort_unstable();
        distinct.dedup();
        let u = distinct.len();
        if u == 0 {
            return Ok(());
        }
        if let Some(&bad) = distinct.last().filter(|&&t| t as usize >= shape.0) {
            return Err(Error::Train(format!(
                "embedding gradient: token id {bad} is outside the {}-row table",
                shape.0
            )));
        }
        if !fused::leaves_out(fused::Kernel::Accumulate) {
            // one launch: each token's rows summed and added into its row
            return Ok(fused::embed_grad(&acc, ids, skip, &rows.detach())?);
        }
        let at: Vec<u32> = ids
            .iter()
            .map(|t| match distinct.binary_search(t) {
                Ok(k) if Some(*t) != skip => k as u32,
                _ => u as u32,
            })
            .collect();
        let at = Tensor::from_vec(at, n, dev)?;
        let sums = Tensor::zeros((u + 1, h), DType::F32, dev)?
            .index_add(&at, &rows.detach().to_dtype(DType::F32)?, 0)?
            .narrow(0, 0, u)?;
        let distinct = Tensor::from_vec(distinct, u, dev)?;
        let new =
            (acc.index_select(&distinct, 0)?.to_dtype(DType::F32)? + sums)?.to_dtype(self.dtype)?;
        let places = distinct.unsqueeze(1)?.broadcast_as((u, h))?.contiguous()?;
        acc.scatter_set(&places, &new, 0)?;
        Ok(())
    }

    /// Adds every gradient of `other` into this store.
    pub fn merge(&mut self, other: Grads) -> Result<()> {
        for (i, g) in other.slots.into_iter().enumerate() {
            if let Some(g) = g {
                self.add(i, g.tensor())?;
            }
        }
        Ok(())
    }

    pub fn get(&self, i: usize) -> Option<&Tensor> {
        self.slots[i].as_ref().map(Slot::tensor)
    }

    pub fn iter(&self) -> impl Iterator<Item = Option<&Tensor>> {
        self.slots.iter().map(|s| s.as_ref().map(Slot::tensor))
    }

    /// L2 norm over all gradients (each tensor's sum of squares in f32, the total in f64),
    /// with one device-to-host copy for the whole store.
    pub fn norm(&self) -> Result<f64> {
        let sums = self
            .iter()
            .flatten()
            .map(|g| g.to_dtype(DType::F32)?.sqr()?.sum_all())
            .collect::<candle_core::Result<Vec<_>>>()?;
        if sums.is_empty() {
            return Ok(0.0);
        }
        let sq = Tensor::stack(&sums, 0)?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        Ok(sq.iter().sum::<f64>().sqrt())
    }

    /// Bytes held by the stored gradients.
    pub fn bytes(&self) -> usize {
        self.iter()
            .flatten()
            .map(|g| g.elem_count() * g.dtype().size_in_bytes())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn sums_in_f32_and_stores_in_dtype() {
        let dev = Device::Cpu;
        let mut g = Grads::new(2, DType::BF16);
        let a = Tensor::new(&[1.0f32, -2.0, 0.5], &dev).unwrap();
        g.add(1, &a).unwrap();
        g.add(1, &a).unwrap();
        // f32: the first add keeps the caller's tensor, the second makes a sum, the third adds
        // into that sum in place; the caller's tensor never changes
        let mut f = Grads::new(1, DType::F32);
        for _ in 0..3 {
            f.add(0, &a).unwrap();
        }
        assert_eq!(
            f.get(0).unwrap().to_vec1::<f32>().unwrap(),
            vec![3.0, -6.0, 1.5]
        );
        assert_eq!(a.to_vec1::<f32>().unwrap(), vec![1.0, -2.0, 0.5]);
        assert!(g.get(0).is_none());
        let s = g.get(1).unwrap();
        assert_eq!(s.dtype(), DType::BF16);
        assert_eq!(
            s.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap(),
            vec![2.0, -4.0, 1.0]
        );
        assert!((g.norm().unwrap() - 21f64.sqrt()).abs() < 1e-9);
        assert_eq!(g.bytes(), 6);
    }

    fn rows_of(t: &Tensor) -> Vec<Vec<f32>> {
        t.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap()
    }

    #[test]
    fn head_chunks_and_embedding_rows_go_into_one_slot_in_place() {
        let dev = Device::Cpu;
        // a tied [4, 2] table: the head's gradient in two chunks, then the lookup's rows
        let mut g = Grads::new(1, DType::F32);
        let chunk = |v: &[[f32; 2]]| Tensor::from_vec(v.concat(), (v.len(), 2), &dev).unwrap();
        g.add_rows(0, 0, &chunk(&[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), (4, 2))
            .unwrap();
        g.add_rows(0, 3, &chunk(&[[7.0, 8.0]]), (4, 2)).unwrap();
        let slot = g.get(0).unwrap().clone();
        // ids 2, 0, 2, 3 (3 is the pad: skipped); rows of id 2 summed
        let rows = chunk(&[[0.5, 0.5], [1.0, -1.0], [0.25, 0.0], [100.0, 100.0]]);
        g.index_add(0, &[2, 0, 2, 3], Some(3), &rows, (4, 2))
            .unwrap();
        let want = vec![
            vec![2.0, 1.0],
            vec![3.0, 4.0],
            vec![5.75, 6.5],
            vec![7.0, 8.0],
        ];
        assert_eq!(rows_of(g.get(0).unwrap()), want);
        // in place: the tensor taken before sees the sums (no new full-size tensor)
        assert_eq!(rows_of(&slot), want);
        // a second micro-batch adds on top
        g.add_rows(0, 1, &chunk(&[[1.0, 1.0]]), (4, 2)).unwrap();
        assert_eq!(rows_of(g.get(0).unwrap())[1], vec![4.0, 5.0]);
    }

    #[test]
    fn embedding_rows_are_summed_in_f32_and_rounded_once() {
        let dev = Device::Cpu;
        // bf16: 256 + 1 + 1 is 258 when the ones are summed first; adding them one at a time
        // in bf16 would round each 257 back to 256
        let mut g = Grads::new(1, DType::BF16);
        let base = Tensor::new(&[[256f32], [0.0]], &dev).unwrap();
        g.add(0, &base).unwrap();
        let ones = Tensor::new(&[[1f32], [1.0], [1.0]], &dev).unwrap();
        g.index_add(0, &[0, 0, 1], None, &ones, (2, 1)).unwrap();
        assert_eq!(rows_of(g.get(0).unwrap()), vec![vec![258.0], vec![1.0]]);
        // the caller's tensor, first stored as it came, is not written
        assert_eq!(rows_of(&base), vec![vec![256.0], vec![0.0]]);
    }

    #[test]
    fn a_shared_strided_gradient_is_copied_before_rows_are_added() {
        let dev = Device::Cpu;
        let mut g = Grads::new(1, DType::F32);
        // [[1, 3], [2, 4]] as a transposed view, kept as it came
        let view = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &dev)
            .unwrap()
            .t()
            .unwrap();
        g.add(0, &view).unwrap();
        let one = Tensor::new(&[[10f32, 20.0]], &dev).unwrap();
        g.add_rows(0, 1, &one, (2, 2)).unwrap();
        assert_eq!(
            rows_of(g.get(0).unwrap()),
            vec![vec![1.0, 3.0], vec![12.0, 24.0]]
        );
        assert_eq!(rows_of(&view), vec![vec![1.0, 3.0], vec![2.0, 4.0]]);
    }

    #[test]
    fn rows_out_of_the_table_are_errors() {
        let dev = Device::Cpu;
        let mut g = Grads::new(1, DType::F32);
        let rows = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
        let e = g.index_add(0, &[1, 9], None, &rows, (4, 3)).unwrap_err();
        assert!(e.to_string().contains("token id 9"), "{e}");
        let e = g.index_add(0, &[1], None, &rows, (4, 3)).unwrap_err();
        assert!(e.to_string().contains("1 ids for rows [2, 3]"), "{e}");
        let e = g.add_rows(0, 0, &rows, (4, 2)).unwrap_err();
        assert!(e.to_string().contains("slot 0 holds [4, 3]"), "{e}");
    }
}
