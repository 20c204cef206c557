//! Gradients between the backward and the optimizer step: one slot per parameter, summed in f32
//! and stored in the trainer's state dtype (bf16 halves them; TRL's bf16-autocast gradients carry
//! no more precision than that).

use crate::error::Result;
use crate::model::fused;
use crate::profile::{self, Phase};
use candle_core::{DType, Tensor};

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

    /// Scatter-adds `rows` [n, H] into slot `i`'s rows `ids` [n] (an embedding's gradient), on
    /// top of what the slot holds, without a separate full-size gradient for the embedding.
    pub fn index_add(
        &mut self,
        i: usize,
        ids: &Tensor,
        rows: &Tensor,
        shape: (usize, usize),
    ) -> Result<()> {
        let _phase = profile::scope(Phase::Grads);
        let rows = rows.detach().to_dtype(DType::F32)?;
        let base = match self.slots[i].take() {
            Some(acc) => acc.tensor().to_dtype(DType::F32)?,
            None => Tensor::zeros(shape, DType::F32, rows.device())?,
        };
        let sum = base.index_add(ids, &rows, 0)?.to_dtype(self.dtype)?;
        self.slots[i] = Some(Slot::Owned(sum));
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
}
