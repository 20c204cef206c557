//! The optimizer step over all tensors at once: on CUDA the Triton kernels (the norm, the
//! clipping coefficient and AdamW in three launches, a fourth for 8-bit moments), on the CPU the
//! kernels' loops over its threads ([`adamw_step`], and [`adamw8`] for 8-bit moments). Where it
//! does not apply, [`AdamW::step`] runs the composed ops and says why once.

use super::adamw8;
use super::grads::Grads;
use super::moments::{Maps, Moments};
use super::optim::{decays, AdamW};
use super::policy::Policy;
use crate::error::Result;
use crate::model::fused::{self, adamw_step, Kernel};
use crate::profile::{self, Phase};
use candle_core::Tensor;

impl AdamW {
    /// The step over all tensors at once, as step number `step`: the gradients' global norm
    /// (nothing changes when it is not finite), or None where the fused step does not apply.
    pub(super) fn step_fused(
        &self,
        policy: &Policy,
        grads: &Grads,
        hyper: adamw_step::Hyper,
        max_norm: f64,
        step: u64,
    ) -> Result<Option<f64>> {
        let all_dense = self.moments.iter().all(|m| m.dense().is_some());
        if !all_dense && fused::leaves_out(Kernel::Adamw8) {
            profile::note_once(
                "the optimizer step takes the composed ops: REFDPO_FUSED leaves out the 8-bit \
                 step (adamw8)"
                    .into(),
            );
            return Ok(None);
        }
        // seeds of the bf16 moments' and weights' rounding: (step, tensor, which)
        let seed =
            |i: usize, which: u64| crate::rng::bits(step, ((i as u64) << 2 | which) + 1) as u32;
        // a stored gradient may be a view (a matmul's transposed weight gradient): the kernels
        // read rows
        let rows: Vec<Option<Tensor>> = grads
            .iter()
            .map(|g| g.map(Tensor::contiguous).transpose())
            .collect::<candle_core::Result<_>>()?;
        let p = self.params;
        let decays_at = |i: usize| p.weight_decay != 0.0 && decays(&policy.names[i]);
        let slots: Vec<adamw_step::Slot<'_>> = policy
            .vars
            .iter()
            .enumerate()
            .filter_map(|(i, var)| {
                let (m, v) = self.moments[i].dense()?;
                Some(adamw_step::Slot {
                    w: var.as_tensor(),
                    m,
                    v,
                    g: rows[i].as_ref()?,
                    decays: decays_at(i),
                    seeds: [seed(i, 0), seed(i, 1), seed(i, 2)],
                })
            })
            .collect();
        // each 8-bit tensor with a gradient
        let eight: Vec<adamw8::Step<'_>> = policy
            .vars
            .iter()
            .enumerate()
            .filter_map(|(i, var)| match (&self.moments[i], &rows[i]) {
                (Moments::Blockwise { m, v }, Some(g)) => Some(adamw8::Step {
                    w: var.as_tensor(),
                    g,
                    m,
                    v,
                    decays: decays_at(i),
                    seed: seed(i, 2),
                }),
                _ => None,
            })
            .collect();
        if let Some(why) = adamw_step::unsupported(&slots) {
            profile::note_once(format!(
                "the optimizer step takes the composed ops: the fused step does not cover {why}"
            ));
            return Ok(None);
        }
        if all_dense {
            let _phase = profile::scope(Phase::Optimizer);
            return Ok(Some(adamw_step::step(&slots, hyper, max_norm)?));
        }
        step_8bit(&slots, &eight, &self.maps, hyper, max_norm)
    }
}

/// The step over the dense `slots` and the tensors with 8-bit moments `eight` at once: the norm
/// over every gradient (nothing changes when it is not finite), torch's clipping coefficient,
/// then each tensor's update. On CUDA in four launches ([`adamw_step::step_8bit`]); on the CPU
/// the dense tensors' loops ([`adamw_step::cpu_update`]), then the 8-bit ones' ([`adamw8`]).
/// Returns the norm, or None where the CUDA kernels do not cover the tensors (said once).
pub fn step_8bit(
    slots: &[adamw_step::Slot<'_>],
    eight: &[adamw8::Step<'_>],
    maps: &Maps,
    hyper: adamw_step::Hyper,
    max_norm: f64,
) -> Result<Option<f64>> {
    let on_cpu = slots
        .first()
        .map(|s| s.w)
        .or(eight.first().map(|s| s.w))
        .is_none_or(|w| w.device().is_cpu());
    if !on_cpu {
        let slots8: Vec<adamw_step::Slot8<'_>> = eight
            .iter()
            .map(|s| adamw_step::Slot8 {
                w: s.w,
                g: s.g,
                m_codes: &s.m.codes,
                m_absmax: &s.m.absmax,
                v_codes: &s.v.codes,
                v_absmax: &s.v.absmax,
                decays: s.decays,
                seed: s.seed,
            })
            .collect();
        let (values, bounds) = maps.tables();
        let q8 = adamw_step::Eight {
            slots: &slots8,
            maps: values,
            bounds,
        };
        if let Some(why) = adamw_step::unsupported_8bit(slots, &q8) {
            profile::note_once(format!(
                "the optimizer step takes the composed ops: the fused 8-bit step does not cover \
                 {why}"
            ));
            return Ok(None);
        }
        let _phase = profile::scope(Phase::Optimizer);
        return Ok(Some(adamw_step::step_8bit(slots, &q8, hyper, max_norm)?));
    }
    let norm = {
        let _phase = profile::scope(Phase::Grads);
        let grads: Vec<&Tensor> = slots
            .iter()
            .map(|s| s.g)
            .chain(eight.iter().map(|s| s.g))
            .collect();
        adamw_step::cpu_grad_norm(&grads)?
    };
    if !norm.is_finite() {
        return Ok(Some(norm));
    }
    let grad_scale = adamw_step::clip_coefficient(norm, max_norm);
    let _phase = profile::scope(Phase::Optimizer);
    adamw_step::cpu_update(slots, hyper, grad_scale)?;
    for one in eight {
        adamw8::step(one, (&maps.m, &maps.v), hyper, grad_scale)?;
    }
    Ok(Some(norm))
}
