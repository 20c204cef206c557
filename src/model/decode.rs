//! Incremental decoding: the forward of new positions against the keys and values so far
//! ([`KvCache`]), and the next token's logits.

use super::kv_cache::{KvCache, LayerKv};
use super::rope::Rope;
use super::{cpu, OpMode, Transformer};
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};

/// One incremental forward beside its ids [B, t]: each new slot's position (row-major, B·t),
/// and the additive masks [B, 1, t, T] over all T slots so far of full and sliding layers.
pub struct DecodeStep {
    pub positions: Vec<u32>,
    pub batch: usize,
    pub len: usize,
    pub mask: Tensor,
    pub sliding_mask: Option<Tensor>,
}

impl DecodeStep {
    /// One new slot per row, `slot`, against key slots `0..=slot`, for rows left-padded by
    /// `pads`: each sees its real keys up to itself, within `window` positions on sliding layers.
    pub fn one_slot(
        pads: &[usize],
        slot: usize,
        window: Option<usize>,
        device: &Device,
    ) -> Result<Self> {
        let (b, end) = (pads.len(), slot + 1);
        let mut positions = Vec::with_capacity(b);
        let mut full = Vec::with_capacity(b * end);
        let mut sliding = Vec::with_capacity(if window.is_some() { b * end } else { 0 });
        for &pad in pads {
            positions.push((slot - pad) as u32);
            for j in 0..end {
                let seen = j >= pad;
                let near = window.is_none_or(|w| slot - j < w);
                let add = |ok: bool| if ok { 0.0 } else { f32::NEG_INFINITY };
                full.push(add(seen));
                if window.is_some() {
                    sliding.push(add(seen && near));
                }
            }
        }
        let shape = (b, 1, 1, end);
        Ok(Self {
            positions,
            batch: b,
            len: 1,
            mask: Tensor::from_vec(full, shape, device)?,
            sliding_mask: match window {
                Some(_) => Some(Tensor::from_vec(sliding, shape, device)?),
                None => None,
            },
        })
    }
}

impl Transformer {
    /// A decoding run's prefill: the prompts packed end to end in one row (no padding FLOP;
    /// each attends within itself), every layer's keys and values kept in `cache`, row i
    /// left-padded to the longest prompt → each prompt's last final-normed hidden state
    /// [B, 1, H]. Prompts are not empty.
    pub fn prefill(&self, prompts: &[&[u32]], cache: &mut KvCache) -> Result<Tensor> {
        let device = self.lm_head.device();
        let lens: Vec<usize> = prompts.iter().map(|p| p.len()).collect();
        if let Some(row) = lens.iter().position(|&n| n == 0) {
            return Err(Error::Model(format!(
                "prompt {row} of the batch is empty: there is nothing to continue"
            )));
        }
        let width = lens.iter().copied().max().unwrap_or(0);
        let ids: Vec<u32> = prompts.iter().flat_map(|p| p.iter().copied()).collect();
        let n = ids.len();
        let ctx = self.context(width, device)?.packed(&lens)?;
        let capacity = cache.capacity();
        cache.layers.resize_with(self.blocks.len(), || None);
        let mut x = self.embed(&Tensor::from_vec(ids, (1, n), device)?)?;
        for (block, kv) in self.blocks.iter().zip(cache.layers.iter_mut()) {
            let mut keep = |k: &Tensor, v: &Tensor| LayerKv::fill(kv, k, v, &lens, capacity);
            x = block.forward_keeping(&x, &ctx, &mut keep)?;
        }
        let last: Vec<u32> = lens
            .iter()
            .scan(0, |end, &len| {
                *end += len;
                Some(*end as u32 - 1)
            })
            .collect();
        let b = last.len();
        let x = x.index_select(&Tensor::from_vec(last, b, device)?, 1)?;
        self.final_norm(&x.reshape((b, 1, ()))?, OpMode::Fast)
    }

    /// Incremental forward for decoding: the new ids [B, t] at `step`'s positions against the
    /// keys and values in `cache` (extended here) → final-normed hidden [B, t, H]. Fused ops, no
    /// graph.
    pub fn forward_cached(
        &self,
        ids: &Tensor,
        step: &DecodeStep,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let (b, t, half) = (step.batch, step.len, self.cfg.head_dim / 2);
        let at = |rope: &Rope| -> Result<(Tensor, Tensor)> {
            let (cos, sin) = rope.at(&step.positions, self.dtype, ids.device())?;
            Ok((cos.reshape((b, 1, t, half))?, sin.reshape((b, 1, t, half))?))
        };
        let global = at(&self.rope)?;
        let local = self.local_rope.as_ref().map(at).transpose()?;
        let capacity = cache.capacity();
        cache.layers.resize_with(self.blocks.len(), || None);
        let mut x = self.embed(ids)?;
        for (block, kv) in self.blocks.iter().zip(cache.layers.iter_mut()) {
            let sliding = block.attn.sliding;
            let (cos, sin) = match (&local, sliding) {
                (Some((c, s)), true) => (c, s),
                _ => (&global.0, &global.1),
            };
            let mask = match (&step.sliding_mask, sliding) {
                (Some(m), true) => m,
                _ => &step.mask,
            };
            x = block.forward_cached(&x, (cos, sin), mask, kv, capacity)?;
        }
        self.final_norm(&x, OpMode::Fast)
    }

    /// The next token's logits [B, V] (f32, soft-capped) from each row's last hidden state [B, H].
    pub fn next_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let logits = if cpu::skinny::covers(hidden, &self.lm_head) {
            cpu::skinny::linear(hidden, &self.lm_head)?
        } else {
            hidden.matmul(&self.lm_head.t()?)?
        };
        Ok(super::softcap(logits, self.cfg.final_softcap)?.to_dtype(DType::F32)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{init, TransformerConfig};
    use candle_core::Device;

    /// Each prompt's forward alone, at its last position [1, H].
    fn alone(model: &Transformer, ids: &[u32]) -> Tensor {
        let ids = Tensor::new(ids, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let h = model.forward_hidden(&ids, OpMode::Fast).unwrap();
        h.narrow(1, ids.dim(1).unwrap() - 1, 1)
            .unwrap()
            .squeeze(0)
            .unwrap()
    }

    #[test]
    fn a_step_sees_its_real_keys_and_windows_slide() {
        let step = DecodeStep::one_slot(&[2, 0], 3, Some(2), &Device::Cpu).unwrap();
        let seen = |m: &Tensor| -> Vec<Vec<u8>> {
            let m: Vec<Vec<f32>> = m.squeeze(1).unwrap().squeeze(1).unwrap().to_vec2().unwrap();
            m.iter()
                .map(|r| r.iter().map(|&x| u8::from(x == 0.0)).collect())
                .collect()
        };
        // row 0: two pads, then positions 0, 1; row 1: no pads
        assert_eq!(seen(&step.mask), vec![vec![0, 0, 1, 1], vec![1, 1, 1, 1]]);
        // window 2 keeps the key itself and the one before
        let sliding = step.sliding_mask.unwrap();
        assert_eq!(seen(&sliding), vec![vec![0, 0, 1, 1], vec![0, 0, 1, 1]]);
        assert_eq!(step.positions, vec![1, 3]);
    }

    #[test]
    fn a_packed_prefill_and_a_step_equal_each_prompts_own_forward() {
        // a sliding window shorter than the longest prompt, grouped heads
        let cfg = TransformerConfig::from_json(
            r#"{"model_type":"mistral","vocab_size":29,"hidden_size":16,
            "intermediate_size":24,"num_hidden_layers":2,"num_attention_heads":4,
            "num_key_value_heads":2,"rms_norm_eps":1e-6,"rope_theta":10000.0,"sliding_window":4}"#,
        )
        .unwrap();
        let w = init::init_weights(&cfg, 7, 0.3).unwrap();
        let model = Transformer::new(&cfg, &w).unwrap();
        let prompts: [&[u32]; 3] = [&[1, 5, 7], &[3, 3, 8, 0, 2, 9, 4], &[6]];
        let mut cache = KvCache::with_capacity(2);
        let hidden = model.prefill(&prompts, &mut cache).unwrap();
        assert_eq!(hidden.dims(), &[3, 1, 16]);
        for (i, p) in prompts.iter().enumerate() {
            let got = hidden.narrow(0, i, 1).unwrap().squeeze(0).unwrap();
            let diff = crate::test_util::max_abs_diff(&got, &alone(&model, p));
            assert!(diff < 1e-5, "prompt {i}: {diff}");
        }
        // one more token per row, at slot 7 of rows left-padded by 4, 0 and 6
        let next = [11u32, 12, 13];
        let step = DecodeStep::one_slot(&[4, 0, 6], 7, Some(4), &Device::Cpu).unwrap();
        let ids = Tensor::new(&next, &Device::Cpu)
            .unwrap()
            .unsqueeze(1)
            .unwrap();
        let stepped = model.forward_cached(&ids, &step, &mut cache).unwrap();
        for (i, p) in prompts.iter().enumerate() {
            let longer: Vec<u32> = p.iter().copied().chain([next[i]]).collect();
            let got = stepped.narrow(0, i, 1).unwrap().squeeze(0).unwrap();
            let diff = crate::test_util::max_abs_diff(&got, &alone(&model, &longer));
            assert!(diff < 1e-5, "step of prompt {i}: {diff}");
        }
        let empty: [&[u32]; 2] = [&[1], &[]];
        let err = model.prefill(&empty, &mut KvCache::default()).unwrap_err();
        assert!(err.to_string().contains("prompt 1"), "{err}");
    }
}
