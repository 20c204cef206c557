//! DPO-family losses on per-sequence log-probs, as TRL 1.16 defines them (`DPOTrainer._compute_loss`;
//! SimPO from `CPOTrainer`), with the RPO term as TRL's `sft` loss weighted by `rpo_alpha`.
//! Plain f64 with analytic gradients d loss / d policy log-probs (checked against finite
//! differences): the trainer pushes those back through the model. (Autograd through
//! relu/abs-based log-sigmoid would give a zero gradient at Δ = 0 — exactly step 0.)

use crate::error::{Error, Result};

/// `train.loss`: TRL's `loss_type` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossKind {
    /// −log σ(βΔ); with `label_smoothing` ε > 0, conservative DPO: −(1−ε) log σ(βΔ) − ε log σ(−βΔ).
    #[default]
    Sigmoid,
    /// (Δ_avg − 1/(2β))², Δ on per-token averages (TRL's normalization).
    Ipo,
    /// relu(1 − βΔ).
    Hinge,
    /// (−(1−ε) log σ(βΔ) + ε log σ(−βΔ)) / (1 − 2ε).
    Robust,
    /// −log σ(βΔ_avg): the sigmoid loss on per-token averages.
    SigmoidNorm,
    /// Reference-free: −log σ(β(avg π(c) − avg π(r)) − γ) (label smoothing as in CPO).
    Simpo,
}

impl LossKind {
    pub const ALL: [LossKind; 6] = [
        LossKind::Sigmoid,
        LossKind::Ipo,
        LossKind::Hinge,
        LossKind::Robust,
        LossKind::SigmoidNorm,
        LossKind::Simpo,
    ];

    /// The name in configs and TRL (`loss_type`).
    pub fn name(self) -> &'static str {
        match self {
            LossKind::Sigmoid => "sigmoid",
            LossKind::Ipo => "ipo",
            LossKind::Hinge => "hinge",
            LossKind::Robust => "robust",
            LossKind::SigmoidNorm => "sigmoid_norm",
            LossKind::Simpo => "simpo",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct LossParams {
    pub kind: LossKind,
    pub beta: f64,
    pub label_smoothing: f64,
    pub simpo_gamma: f64,
    pub rpo_alpha: f64,
}

/// Per-pair inputs of one micro-batch.
#[derive(Debug, Clone, Default)]
pub struct PairLogps {
    pub policy_chosen: Vec<f64>,
    pub policy_rejected: Vec<f64>,
    pub ref_chosen: Vec<f64>,
    pub ref_rejected: Vec<f64>,
    /// Completion tokens in each sequence (normalizers of `ipo`, `sigmoid_norm`, `simpo`).
    pub chosen_len: Vec<f64>,
    pub rejected_len: Vec<f64>,
    /// Scored chosen tokens in the micro-batch (the `rpo_alpha` NLL's denominator).
    pub chosen_scored_tokens: f64,
}

#[derive(Debug, Clone)]
pub struct LossOutput {
    /// Mean over pairs, plus the weighted NLL term.
    pub loss: f64,
    pub losses: Vec<f64>,
    pub chosen_rewards: Vec<f64>,
    pub rejected_rewards: Vec<f64>,
    /// d loss / d policy_chosen[i] and d loss / d policy_rejected[i].
    pub grad_chosen: Vec<f64>,
    pub grad_rejected: Vec<f64>,
}

/// log σ(x), stable for large |x|.
fn log_sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        -(-x).exp().ln_1p()
    } else {
        x - x.exp().ln_1p()
    }
}

/// σ(x), stable for large |x|.
fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// −(1−ε) log σ(z) − ε log σ(−z) and its derivative in z.
fn smoothed_sigmoid(z: f64, eps: f64) -> (f64, f64) {
    let loss = -(1.0 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z);
    (loss, -(1.0 - eps) * sigmoid(-z) + eps * sigmoid(z))
}

pub fn dpo_loss(p: &LossParams, x: &PairLogps) -> Result<LossOutput> {
    let n = x.policy_chosen.len();
    if n == 0 {
        return Err(Error::Train("empty batch".into()));
    }
    let (beta, eps) = (p.beta, p.label_smoothing);
    let mut out = LossOutput {
        loss: 0.0,
        losses: Vec::with_capacity(n),
        chosen_rewards: Vec::with_capacity(n),
        rejected_rewards: Vec::with_capacity(n),
        grad_chosen: Vec::with_capacity(n),
        grad_rejected: Vec::with_capacity(n),
    };
    for i in 0..n {
        let (pc, pr) = (x.policy_chosen[i], x.policy_rejected[i]);
        let (lc, lr) = (x.chosen_len[i].max(1.0), x.rejected_len[i].max(1.0));
        let chosen_lr = pc - x.ref_chosen[i];
        let rejected_lr = pr - x.ref_rejected[i];
        let delta = chosen_lr - rejected_lr;
        let avg_delta = chosen_lr / lc - rejected_lr / lr;
        // (loss, d loss/d pc, d loss/d pr)
        let (loss, gc, gr) = match p.kind {
            LossKind::Sigmoid => {
                let (l, d) = smoothed_sigmoid(beta * delta, eps);
                (l, d * beta, -d * beta)
            }
            LossKind::Hinge => {
                let z = beta * delta;
                let d = if z < 1.0 { -beta } else { 0.0 };
                ((1.0 - z).max(0.0), d, -d)
            }
            LossKind::Ipo => {
                let r = avg_delta - 1.0 / (2.0 * beta);
                (r * r, 2.0 * r / lc, -2.0 * r / lr)
            }
            LossKind::Robust => {
                let z = beta * delta;
                let l = (-(1.0 - eps) * log_sigmoid(z) + eps * log_sigmoid(-z)) / (1.0 - 2.0 * eps);
                let d = (-(1.0 - eps) * sigmoid(-z) - eps * sigmoid(z)) / (1.0 - 2.0 * eps) * beta;
                (l, d, -d)
            }
            LossKind::SigmoidNorm => {
                let z = beta * avg_delta;
                let d = -sigmoid(-z) * beta;
                (-log_sigmoid(z), d / lc, -d / lr)
            }
            LossKind::Simpo => {
                let z = beta * (pc / lc - pr / lr) - p.simpo_gamma;
                let (l, d) = smoothed_sigmoid(z, eps);
                (l, d * beta / lc, -d * beta / lr)
            }
        };
        out.losses.push(loss);
        out.grad_chosen.push(gc / n as f64);
        out.grad_rejected.push(gr / n as f64);
        let (rc, rr) = match p.kind {
            LossKind::Simpo => (beta * pc / lc, beta * pr / lr),
            _ => (beta * chosen_lr, beta * rejected_lr),
        };
        out.chosen_rewards.push(rc);
        out.rejected_rewards.push(rr);
    }
    out.loss = out.losses.iter().sum::<f64>() / n as f64;
    if p.rpo_alpha != 0.0 {
        // TRL's `sft` term: mean NLL over every scored chosen token of the batch.
        let tokens = x.chosen_scored_tokens.max(1.0);
        out.loss += p.rpo_alpha * -x.policy_chosen.iter().sum::<f64>() / tokens;
        out.grad_chosen
            .iter_mut()
            .for_each(|g| *g -= p.rpo_alpha / tokens);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy(swap: bool) -> PairLogps {
        let (c, r) = (vec![-2.0, -1.5, -1.8], vec![-3.5, -3.0, -3.2]);
        let (policy_chosen, policy_rejected) = if swap { (r, c) } else { (c, r) };
        PairLogps {
            policy_chosen,
            policy_rejected,
            ref_chosen: vec![-2.5, -2.0, -2.3],
            ref_rejected: vec![-3.0, -2.8, -3.0],
            chosen_len: vec![4.0, 3.0, 5.0],
            rejected_len: vec![6.0, 2.0, 3.0],
            chosen_scored_tokens: 12.0,
        }
    }

    fn params(kind: LossKind, beta: f64) -> LossParams {
        LossParams {
            kind,
            beta,
            label_smoothing: 0.0,
            simpo_gamma: 0.5,
            rpo_alpha: 0.0,
        }
    }

    fn round4(x: f64) -> f64 {
        (x * 1e4).round() / 1e4
    }

    #[test]
    fn the_seed_toy_example() {
        let l = |swap, beta| {
            round4(
                dpo_loss(&params(LossKind::Sigmoid, beta), &toy(swap))
                    .unwrap()
                    .loss,
            )
        };
        assert_eq!(l(false, 0.1), 0.6540);
        assert_eq!(l(true, 0.1), 0.8055);
        assert_eq!(l(false, 1.0), 0.3732);
        assert_eq!(l(true, 1.0), 2.2460);
    }

    #[test]
    fn equal_policy_and_reference_give_ln2() {
        let mut x = toy(false);
        x.policy_chosen = x.ref_chosen.clone();
        x.policy_rejected = x.ref_rejected.clone();
        let out = dpo_loss(&params(LossKind::Sigmoid, 0.1), &x).unwrap();
        assert!((out.loss - std::f64::consts::LN_2).abs() < 1e-12);
        // d/dΔ of −log σ(βΔ) at 0 is −β/2, split over n pairs, +/− for chosen/rejected.
        assert!(out
            .grad_chosen
            .iter()
            .all(|g| (g + 0.1 / 2.0 / 3.0).abs() < 1e-12));
        assert!(out
            .grad_rejected
            .iter()
            .all(|g| (g - 0.1 / 2.0 / 3.0).abs() < 1e-12));
    }

    #[test]
    fn gradients_match_finite_differences_for_every_loss() {
        for kind in LossKind::ALL {
            for (eps, rpo) in [(0.0, 0.0), (0.2, 0.3)] {
                let mut p = params(kind, 0.7);
                p.label_smoothing =
                    if matches!(kind, LossKind::Sigmoid | LossKind::Robust | LossKind::Simpo) {
                        eps
                    } else {
                        0.0
                    };
                p.rpo_alpha = rpo;
                for x in [toy(false), toy(true)] {
                    let out = dpo_loss(&p, &x).unwrap();
                    for i in 0..3 {
                        for side in 0..2 {
                            let h = 1e-6;
                            let shifted = |d: f64| {
                                let mut y = x.clone();
                                if side == 0 {
                                    y.policy_chosen[i] += d
                                } else {
                                    y.policy_rejected[i] += d
                                }
                                dpo_loss(&p, &y).unwrap().loss
                            };
                            let fd = (shifted(h) - shifted(-h)) / (2.0 * h);
                            let g = if side == 0 {
                                out.grad_chosen[i]
                            } else {
                                out.grad_rejected[i]
                            };
                            assert!(
                                (fd - g).abs() < 1e-6,
                                "{} ε={eps} α={rpo} pair {i} side {side}: {g} vs {fd}",
                                kind.name()
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn rpo_term_adds_mean_chosen_nll() {
        let mut p = params(LossKind::Sigmoid, 0.1);
        let base = dpo_loss(&p, &toy(false)).unwrap();
        p.rpo_alpha = 0.5;
        let with = dpo_loss(&p, &toy(false)).unwrap();
        let nll = (2.0 + 1.5 + 1.8) / 12.0;
        assert!((with.loss - base.loss - 0.5 * nll).abs() < 1e-12);
        assert!((with.grad_chosen[0] - base.grad_chosen[0] + 0.5 / 12.0).abs() < 1e-12);
    }
}
