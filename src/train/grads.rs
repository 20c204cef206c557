//! Gradients between the backward and the optimizer step: one slot per parameter, summed in f32
//! and stored in the trainer's state dtype (bf16 halves them; TRL's bf16-autocast gradients carry
//! no more precision than that).

use crate::error::Result;
use crate::profile::{self, Phase};
use candle_core::{DType, Tensor};

/// Per-parameter gradients, accumulated over micro-batches.
pub struct Grads {
    dtype: DType,
    slots: Vec<Option<Tensor>>,
}

impl Grads {
    /// `len` empty slots whose sums are stored in `dtype`.
    pub fn new(len: usize, dtype: DType) -> Self {
        Self {
            dtype,
            slots: vec![None; len],
        }
    }

    /// Adds `g` (any float dtype) into slot `i`: the sum is taken in f32, then stored.
    ///
    /// `g` is detached first: candle's gradient for a variable can still carry the graph it was
    /// computed from (e.g. `x̂ᵀ·grad` keeps the block's activations), which would keep every
    /// block's activations alive until the optimizer step, and chain into the moments.
    pub fn add(&mut self, i: usize, g: &Tensor) -> Result<()> {
        let _phase = profile::scope(Phase::Grads);
        let g = g.detach().to_dtype(DType::F32)?;
        let sum = match self.slots[i].take() {
            Some(acc) => (acc.to_dtype(DType::F32)? + g)?,
            None => g,
        };
        self.slots[i] = Some(sum.to_dtype(self.dtype)?);
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
            Some(acc) => acc.to_dtype(DType::F32)?,
            None => Tensor::zeros(shape, DType::F32, rows.device())?,
        };
        self.slots[i] = Some(base.index_add(ids, &rows, 0)?.to_dtype(self.dtype)?);
        Ok(())
    }

    /// Adds every gradient of `other` into this store.
    pub fn merge(&mut self, other: Grads) -> Result<()> {
        for (i, g) in other.slots.into_iter().enumerate() {
            if let Some(g) = g {
                self.add(i, &g)?;
            }
        }
        Ok(())
    }

    pub fn get(&self, i: usize) -> Option<&Tensor> {
        self.slots[i].as_ref()
    }

    pub fn iter(&self) -> impl Iterator<Item = Option<&Tensor>> {
        self.slots.iter().map(Option::as_ref)
    }

    /// L2 norm over all gradients (each tensor's sum of squares in f32, the total in f64).
    pub fn norm(&self) -> Result<f64> {
        let mut sq = 0.0;
        for g in self.slots.iter().flatten() {
            sq += g
                .to_dtype(DType::F32)?
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
        }
        Ok(sq.sqrt())
    }

    /// Bytes held by the stored gradients.
    pub fn bytes(&self) -> usize {
        self.slots
            .iter()
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
