//! log p(target) and the log-sum-exp of rows of logits on the CPU in one pass per row: the max and
//! Σ exp(x − max) in SIMD lanes, no [N, V] temporaries (the composed ops wrote three: x − max,
//! its exp, and the gathered targets' copy), rows spread over the threads.

use super::exp;
use crate::error::{Error, Result};
use candle_core::{DType, Device, Storage, Tensor};
use rayon::prelude::*;

/// Whether [`logp_lse`] takes these logits: f32 on the CPU, not tracked for a gradient (it has
/// no backward), unless `REFDPO_FUSED=0`.
pub fn covers(logits: &Tensor) -> bool {
    logits.device().is_cpu()
        && logits.dtype() == DType::F32
        && !logits.track_op()
        && !crate::model::fused::disabled()
}

/// logits [N, V] f32 and targets [N] u32 → (log p(target) [N], log-sum-exp [N]), both f32:
/// lse = max + ln Σ exp(x − max), log p = x[target] − lse.
pub fn logp_lse(logits: &Tensor, targets: &Tensor) -> Result<(Tensor, Tensor)> {
    let (n, vocab) = logits.dims2()?;
    let targets: Vec<u32> = targets.to_dtype(DType::U32)?.to_vec1()?;
    if targets.len() != n {
        return Err(Error::Model(format!(
            "log-probs: {} targets for {n} rows of logits",
            targets.len()
        )));
    }
    if let Some(t) = targets.iter().find(|&&t| t as usize >= vocab) {
        return Err(Error::Model(format!(
            "log-probs: target id {t} outside the vocabulary of {vocab}"
        )));
    }
    let logits = logits.contiguous()?;
    let (storage, layout) = logits.storage_and_layout();
    let xs = match &*storage {
        Storage::Cpu(cpu) => &cpu.as_slice::<f32>()?[layout.start_offset()..][..n * vocab],
        _ => return Err(Error::Model("log-probs: logits are not on the CPU".into())),
    };
    let (logp, lse): (Vec<f32>, Vec<f32>) = xs
        .par_chunks(vocab.max(1))
        .zip(&targets)
        .map(|(row, &t)| {
            let max = exp::max(row);
            let lse = exp::sum_exp_shifted(row, max).ln() + max;
            (row[t as usize] - lse, lse)
        })
        .unzip();
    drop(storage);
    Ok((
        Tensor::from_vec(logp, n, &Device::Cpu)?,
        Tensor::from_vec(lse, n, &Device::Cpu)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_probs_and_lse_equal_the_composed_ops() {
        let (n, vocab) = (5, 1003);
        let xs: Vec<f32> = (0..n * vocab)
            .map(|i| ((i * 7919 % 2003) as f32 - 1000.0) / 37.0)
            .collect();
        let logits = Tensor::from_vec(xs, (n, vocab), &Device::Cpu).unwrap();
        let targets = Tensor::new(&[0u32, 1002, 17, 500, 3], &Device::Cpu).unwrap();
        let (lp, lse) = logp_lse(&logits, &targets).unwrap();
        let want_lse = logits
            .to_dtype(DType::F64)
            .unwrap()
            .exp()
            .unwrap()
            .sum(1)
            .unwrap()
            .log()
            .unwrap();
        let want_lp = (logits
            .to_dtype(DType::F64)
            .unwrap()
            .gather(&targets.unsqueeze(1).unwrap(), 1)
            .unwrap()
            .squeeze(1)
            .unwrap()
            - &want_lse)
            .unwrap();
        for (got, want) in [(lp, want_lp), (lse, want_lse)] {
            let got: Vec<f32> = got.to_vec1().unwrap();
            let want: Vec<f64> = want.to_vec1().unwrap();
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (*g as f64 - w).abs() < 1e-5 * w.abs().max(1.0),
                    "{g} vs {w}"
                );
            }
        }
        let bad = Tensor::new(&[0u32, 1, 2, 3, 1003], &Device::Cpu).unwrap();
        let err = logp_lse(&logits, &bad).unwrap_err().to_string();
        assert!(err.contains("1003") && err.contains("vocabulary"), "{err}");
    }
}
