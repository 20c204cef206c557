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
    /// EXO (pairwise): KL of softmax(β·logratios) from [1−ε, ε]; needs 0 < ε < 1.
    ExoPair,
    /// NCA (pairwise): −log σ(βc) − ½ log σ(−βc) − ½ log σ(−βr), c/r the log-ratios.
    NcaPair,
    /// BCO (pairwise, TRL 1.16's form): −log σ(βc) − log σ(−βr).
    BcoPair,
    /// SPPO with hard labels: (c − 1/(2β))² + (r + 1/(2β))².
    SppoHard,
    /// AOT: the sigmoid loss between the batch's sorted policy and sorted reference margins.
    Aot,
    /// AOT unpaired: the sigmoid loss between the batch's sorted chosen and sorted rejected
    /// log-ratios.
    AotUnpaired,
    /// APO-zero: 1 − σ(βc) + σ(βr).
    ApoZero,
    /// APO-down: σ(βc) + 1 − σ(βΔ).
    ApoDown,
    /// DiscoPOP: −log σ(βΔ)(1 − m) + e^(−βΔ) m, m = σ(βΔ / τ).
    Discopop,
    /// The mean NLL of the batch's chosen tokens (TRL's `sft`; beside a DPO loss in a list,
    /// the RPO term).
    Sft,
}

impl LossKind {
    pub const ALL: [LossKind; 16] = [
        LossKind::Sigmoid,
        LossKind::Ipo,
        LossKind::Hinge,
        LossKind::Robust,
        LossKind::SigmoidNorm,
        LossKind::Simpo,
        LossKind::ExoPair,
        LossKind::NcaPair,
        LossKind::BcoPair,
        LossKind::SppoHard,
        LossKind::Aot,
        LossKind::AotUnpaired,
        LossKind::ApoZero,
        LossKind::ApoDown,
        LossKind::Discopop,
        LossKind::Sft,
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
            LossKind::ExoPair => "exo_pair",
            LossKind::NcaPair => "nca_pair",
            LossKind::BcoPair => "bco_pair",
            LossKind::SppoHard => "sppo_hard",
            LossKind::Aot => "aot",
            LossKind::AotUnpaired => "aot_unpaired",
            LossKind::ApoZero => "apo_zero",
            LossKind::ApoDown => "apo_down",
            LossKind::Discopop => "discopop",
            LossKind::Sft => "sft",
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
    /// DiscoPOP's temperature τ (TRL's `discopop_tau`).
    pub discopop_tau: f64,
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

/// TRL's list of losses: Σ weight_k · loss_k over `loss_type`s and `loss_weights`, each with the
/// same β, ε and parameters; rewards are the first loss's, and `rpo_alpha` is added once.
#[derive(Debug, Clone)]
pub struct LossMix {
    pub parts: Vec<(LossKind, f64)>,
    pub params: LossParams,
}

impl LossMix {
    /// One loss (weight 1).
    pub fn single(params: LossParams) -> Self {
        Self {
            parts: vec![(params.kind, 1.0)],
            params,
        }
    }

    pub fn loss(&self, x: &PairLogps) -> Result<LossOutput> {
        let mut total: Option<LossOutput> = None;
        for (k, &(kind, w)) in self.parts.iter().enumerate() {
            let p = LossParams {
                kind,
                rpo_alpha: if k == 0 { self.params.rpo_alpha } else { 0.0 },
                ..self.params
            };
            let out = dpo_loss(&p, x)?;
            let scale = |v: &[f64]| v.iter().map(|g| g * w).collect::<Vec<f64>>();
            match &mut total {
                None => {
                    // the first loss's rpo term is not weighted
                    let rpo = out.loss - out.losses.iter().sum::<f64>() / out.losses.len() as f64;
                    total = Some(LossOutput {
                        loss: (out.loss - rpo) * w + rpo,
                        losses: scale(&out.losses),
                        grad_chosen: weighted_grads(&p, x, &out.grad_chosen, w),
                        grad_rejected: scale(&out.grad_rejected),
                        ..out
                    });
                }
                Some(t) => {
                    t.loss += out.loss * w;
                    for (a, b) in t.losses.iter_mut().zip(&out.losses) {
                        *a += b * w;
                    }
                    for (a, b) in t.grad_chosen.iter_mut().zip(&out.grad_chosen) {
                        *a += b * w;
                    }
                    for (a, b) in t.grad_rejected.iter_mut().zip(&out.grad_rejected) {
                        *a += b * w;
                    }
                }
            }
        }
        total.ok_or_else(|| Error::Train("no loss".into()))
    }
}

/// The first loss's chosen gradients weighted by `w`, its unweighted `rpo_alpha` term kept.
fn weighted_grads(p: &LossParams, x: &PairLogps, g: &[f64], w: f64) -> Vec<f64> {
    let rpo = if p.rpo_alpha != 0.0 {
        p.rpo_alpha / x.chosen_scored_tokens.max(1.0)
    } else {
        0.0
    };
    // g = g_loss − rpo (see dpo_loss): weight the loss part only
    g.iter().map(|gi| (gi + rpo) * w - rpo).collect()
}

/// AOT and AOT-unpaired over the whole micro-batch, as TRL sorts them: the sigmoid loss (with
/// label smoothing) of the k-th smallest policy margin against the k-th smallest reference
/// margin (unpaired: the k-th smallest chosen against the k-th smallest rejected log-ratio).
/// Returns the loss at each sorted position k and each pair's d loss / d policy log-probs
/// (undivided by the batch size).
fn aot(p: &LossParams, x: &PairLogps) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let n = x.policy_chosen.len();
    let argsort = |v: &[f64]| -> Vec<usize> {
        let mut idx: Vec<usize> = (0..n).collect();
        idx.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
        idx
    };
    let chosen_lr: Vec<f64> = (0..n)
        .map(|i| x.policy_chosen[i] - x.ref_chosen[i])
        .collect();
    let rejected_lr: Vec<f64> = (0..n)
        .map(|i| x.policy_rejected[i] - x.ref_rejected[i])
        .collect();
    // (the sorted values whose difference is δ_k: the first gets +d, the second −d)
    let (first, second, first_order, second_order): (Vec<f64>, Vec<f64>, _, _) =
        if p.kind == LossKind::Aot {
            let policy: Vec<f64> = (0..n)
                .map(|i| x.policy_chosen[i] - x.policy_rejected[i])
                .collect();
            let reference: Vec<f64> = (0..n)
                .map(|i| x.ref_chosen[i] - x.ref_rejected[i])
                .collect();
            let (po, ro) = (argsort(&policy), argsort(&reference));
            (policy, reference, po, ro)
        } else {
            let (co, ro) = (argsort(&chosen_lr), argsort(&rejected_lr));
            (chosen_lr, rejected_lr, co, ro)
        };
    let (beta, eps) = (p.beta, p.label_smoothing);
    let (mut losses, mut gc, mut gr) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
    for k in 0..n {
        let (i, j) = (first_order[k], second_order[k]);
        let (l, d) = smoothed_sigmoid(beta * (first[i] - second[j]), eps);
        losses[k] = l;
        let d = d * beta;
        if p.kind == LossKind::Aot {
            // δ_k moves with pair i's policy margin (pc − pr); the reference is fixed
            gc[i] += d;
            gr[i] -= d;
        } else {
            gc[i] += d;
            gr[j] -= d;
        }
    }
    (losses, gc, gr)
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
    // AOT's losses pair the batch's sorted values, not each pair's own: computed first.
    let sorted = match p.kind {
        LossKind::Aot | LossKind::AotUnpaired => Some(aot(p, x)),
        _ => None,
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
            LossKind::ExoPair => {
                let z = beta * delta;
                let (qw, ql) = (sigmoid(z), sigmoid(-z));
                let l = qw * (log_sigmoid(z) - (-eps).ln_1p()) + ql * (log_sigmoid(-z) - eps.ln());
                // d/dz = qw·ql·(z − log((1−ε)/ε)), since log σ(z) − log σ(−z) = z
                let d = qw * ql * (z - ((1.0 - eps) / eps).ln()) * beta;
                (l, d, -d)
            }
            LossKind::NcaPair => {
                let (a, b) = (beta * chosen_lr, beta * rejected_lr);
                let l = -log_sigmoid(a) - 0.5 * log_sigmoid(-a) - 0.5 * log_sigmoid(-b);
                (
                    l,
                    beta * (-sigmoid(-a) + 0.5 * sigmoid(a)),
                    beta * 0.5 * sigmoid(b),
                )
            }
            LossKind::BcoPair => {
                let (a, b) = (beta * chosen_lr, beta * rejected_lr);
                let l = -log_sigmoid(a) - log_sigmoid(-b);
                (l, -beta * sigmoid(-a), beta * sigmoid(b))
            }
            LossKind::SppoHard => {
                let (w, l) = (chosen_lr - 0.5 / beta, rejected_lr + 0.5 / beta);
                (w * w + l * l, 2.0 * w, 2.0 * l)
            }
            LossKind::Aot | LossKind::AotUnpaired => {
                let (losses, gc, gr) = sorted.as_ref().expect("computed above");
                (losses[i], gc[i], gr[i])
            }
            LossKind::ApoZero => {
                let (a, b) = (beta * chosen_lr, beta * rejected_lr);
                let l = 1.0 - sigmoid(a) + sigmoid(b);
                (
                    l,
                    -beta * sigmoid(a) * sigmoid(-a),
                    beta * sigmoid(b) * sigmoid(-b),
                )
            }
            LossKind::ApoDown => {
                let (a, z) = (beta * chosen_lr, beta * delta);
                let l = sigmoid(a) + 1.0 - sigmoid(z);
                let dz = sigmoid(z) * sigmoid(-z);
                (l, beta * (sigmoid(a) * sigmoid(-a) - dz), beta * dz)
            }
            LossKind::Sft => {
                // batch-level: every pair carries the batch's mean chosen NLL (TRL expands it
                // the same way); d/d pc_i = −1/tokens, here times n (divided by n below)
                let tokens = x.chosen_scored_tokens.max(1.0);
                let nll = -x.policy_chosen.iter().sum::<f64>() / tokens;
                (nll, -(n as f64) / tokens, 0.0)
            }
            LossKind::Discopop => {
                let z = beta * delta;
                let tau = p.discopop_tau;
                let m = sigmoid(z / tau);
                let dm = m * (1.0 - m) / tau;
                let e = (-z).exp();
                let l = -log_sigmoid(z) * (1.0 - m) + e * m;
                let d = -sigmoid(-z) * (1.0 - m) + log_sigmoid(z) * dm - e * m + e * dm;
                (l, d * beta, -d * beta)
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
            discopop_tau: 0.05,
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
                p.label_smoothing = match kind {
                    LossKind::Sigmoid
                    | LossKind::Robust
                    | LossKind::Simpo
                    | LossKind::Aot
                    | LossKind::AotUnpaired => eps,
                    // EXO needs 0 < ε < 1
                    LossKind::ExoPair => eps.max(1e-3),
                    _ => 0.0,
                };
                p.rpo_alpha = rpo;
                for mut x in [toy(false), toy(true)] {
                    if matches!(kind, LossKind::Aot | LossKind::AotUnpaired) {
                        // The toy's margins tie, and a sort has no derivative at a tie.
                        for (i, (c, r)) in [(0.0, 0.0), (0.05, 0.03), (0.11, -0.07)]
                            .into_iter()
                            .enumerate()
                        {
                            x.policy_chosen[i] += c;
                            x.policy_rejected[i] += r;
                        }
                    }
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
