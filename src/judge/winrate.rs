//! The judge's statistics over prompts, given each prompt's reward of the reference's and the
//! policy's continuation and their lengths (SPEC, "Judging generations"):
//!
//! - a prompt's win w_i: 1 when the policy's reward is higher, 0.5 on a tie, else 0;
//! - `win_rate` = mean w, with a seeded percentile bootstrap interval over prompts;
//! - `lc_win_rate`, the length-controlled win rate (AlpacaEval 2's construction without its
//!   per-instruction terms): with d_i = policy_tokens_i − reference_tokens_i, fit
//!   P(win) = σ(a + b·tanh(d_i / sd(d))) by unpenalized maximum likelihood (binomial, fractional
//!   w allowed; sd with n − 1) and report σ(a), the win probability at zero length difference;
//! - the win rate per quintile of d, and the Pearson correlation of reward gap and length gap.
//!
//! Checked against statsmodels' GLM and numpy on committed fixtures
//! (`tests/fixtures/judge/`, made by `tests/fixtures/gen_judge_fixtures.py`).

/// Prompt i's win: 1, 0.5 on equal rewards, or 0.
pub fn win(policy_reward: f64, reference_reward: f64) -> f64 {
    if policy_reward > reference_reward {
        1.0
    } else if policy_reward == reference_reward {
        0.5
    } else {
        0.0
    }
}

fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len().max(1) as f64
}

/// Sample standard deviation (n − 1); 0 for fewer than two values.
fn sd(x: &[f64]) -> f64 {
    if x.len() < 2 {
        return 0.0;
    }
    let m = mean(x);
    (x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (x.len() - 1) as f64).sqrt()
}

/// numpy's default ("linear") percentile of sorted values, q in [0, 100].
fn percentile(sorted: &[f64], q: f64) -> f64 {
    let pos = q / 100.0 * (sorted.len() - 1) as f64;
    let (lo, frac) = (pos.floor() as usize, pos - pos.floor());
    let hi = (lo + 1).min(sorted.len() - 1);
    sorted[lo] + (sorted[hi] - sorted[lo]) * frac
}

/// The 95% percentile bootstrap interval of the mean of `wins`: `resamples` resamples of n
/// prompts with replacement, prompt index `bits(seed, r·n + j + 1) mod n` for draw j of
/// resample r (`crate::rng::bits`, which the fixture script reproduces).
pub fn bootstrap_ci(wins: &[f64], seed: u64, resamples: usize) -> (f64, f64) {
    let n = wins.len();
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let mut means: Vec<f64> = (0..resamples)
        .map(|r| {
            (0..n)
                .map(|j| {
                    let i = crate::rng::bits(seed, (r * n + j + 1) as u64) % n as u64;
                    wins[i as usize]
                })
                .sum::<f64>()
                / n as f64
        })
        .collect();
    means.sort_by(f64::total_cmp);
    (percentile(&means, 2.5), percentile(&means, 97.5))
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

/// The logistic fit P(w) = σ(a + b·x) of fractional outcomes `w` by Newton's method on the
/// binomial log-likelihood (what statsmodels' GLM Binomial maximizes): (a, b), or `None` when it
/// does not converge (separated data: the likelihood has no maximum).
pub fn logistic_fit(w: &[f64], x: &[f64]) -> Option<(f64, f64)> {
    let (mut a, mut b) = (0.0f64, 0.0f64);
    for _ in 0..100 {
        // gradient and Hessian of the log-likelihood
        let (mut ga, mut gb, mut haa, mut hab, mut hbb) = (0.0, 0.0, 0.0, 0.0, 0.0);
        for (&wi, &xi) in w.iter().zip(x) {
            let p = sigmoid(a + b * xi);
            let r = wi - p;
            let v = p * (1.0 - p);
            ga += r;
            gb += r * xi;
            haa += v;
            hab += v * xi;
            hbb += v * xi * xi;
        }
        let det = haa * hbb - hab * hab;
        if !det.is_finite() || det <= 1e-300 {
            return None;
        }
        let da = (hbb * ga - hab * gb) / det;
        let db = (haa * gb - hab * ga) / det;
        a += da;
        b += db;
        if !(a.is_finite() && b.is_finite()) || a.abs() > 50.0 || b.abs() > 50.0 {
            return None;
        }
        if da.abs().max(db.abs()) < 1e-12 {
            return Some((a, b));
        }
    }
    None
}

/// The length-controlled win rate σ(a) (see the module), the fitted (a, b), and why a fit was
/// not possible (then the raw win rate stands in: no length spread, or separated outcomes).
#[derive(Debug, Clone, PartialEq)]
pub struct LengthControlled {
    pub lc_win_rate: f64,
    pub a: f64,
    pub b: f64,
    pub note: Option<&'static str>,
}

pub fn length_controlled(wins: &[f64], length_diff: &[f64]) -> LengthControlled {
    let raw = mean(wins);
    let s = sd(length_diff);
    let fallback = |note| LengthControlled {
        lc_win_rate: raw,
        a: f64::NAN,
        b: f64::NAN,
        note: Some(note),
    };
    if s == 0.0 || !s.is_finite() {
        return fallback("no spread in length difference: the raw win rate");
    }
    let x: Vec<f64> = length_diff.iter().map(|d| (d / s).tanh()).collect();
    match logistic_fit(wins, &x) {
        Some((a, b)) => LengthControlled {
            lc_win_rate: sigmoid(a),
            a,
            b,
            note: None,
        },
        None => fallback("the fit does not converge (wins separated by length): the raw win rate"),
    }
}

/// The win rate per quintile of the length difference: (lowest d, highest d, win rate, prompts),
/// quintiles by rank (prompts sorted by d, ties in input order, split into five near-equal runs).
pub fn quintiles(wins: &[f64], length_diff: &[f64]) -> Vec<(f64, f64, f64, usize)> {
    let mut order: Vec<usize> = (0..wins.len()).collect();
    order.sort_by(|&i, &j| length_diff[i].total_cmp(&length_diff[j]));
    let n = order.len();
    (0..5)
        .filter_map(|q| {
            let (lo, hi) = (q * n / 5, (q + 1) * n / 5);
            let part = &order[lo..hi];
            (!part.is_empty()).then(|| {
                let w: Vec<f64> = part.iter().map(|&i| wins[i]).collect();
                (
                    length_diff[part[0]],
                    length_diff[part[part.len() - 1]],
                    mean(&w),
                    part.len(),
                )
            })
        })
        .collect()
}

/// Pearson's correlation; NaN when either side has no spread.
pub fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let (mx, my) = (mean(x), mean(y));
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx).powi(2);
        syy += (b - my).powi(2);
    }
    sxy / (sxx * syy).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn fixture(name: &str) -> Value {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/judge")
            .join(name);
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
    }

    fn floats(v: &Value) -> Vec<f64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    }

    fn close(got: f64, want: f64, what: &str) {
        assert!((got - want).abs() < 1e-6, "{what}: {got} vs {want}");
    }

    /// Each committed case against statsmodels' GLM (the fit), numpy (bootstrap percentiles from
    /// the same draws, quintiles, correlation).
    #[test]
    fn every_figure_equals_the_independent_computation() {
        let cases = fixture("winrate.json");
        for case in cases["cases"].as_array().unwrap() {
            let name = case["name"].as_str().unwrap();
            let (pr, rr) = (
                floats(&case["policy_reward"]),
                floats(&case["reference_reward"]),
            );
            let d = floats(&case["length_diff"]);
            let wins: Vec<f64> = pr.iter().zip(&rr).map(|(p, r)| win(*p, *r)).collect();
            assert_eq!(wins, floats(&case["wins"]), "{name}: wins");
            let want = &case["expected"];
            close(mean(&wins), want["win_rate"].as_f64().unwrap(), name);
            let seed = case["seed"].as_u64().unwrap();
            let resamples = case["resamples"].as_u64().unwrap() as usize;
            let (lo, hi) = bootstrap_ci(&wins, seed, resamples);
            let ci = floats(&want["win_rate_ci"]);
            close(lo, ci[0], &format!("{name}: ci low"));
            close(hi, ci[1], &format!("{name}: ci high"));
            let lc = length_controlled(&wins, &d);
            close(lc.lc_win_rate, want["lc_win_rate"].as_f64().unwrap(), name);
            close(lc.a, want["a"].as_f64().unwrap(), &format!("{name}: a"));
            close(lc.b, want["b"].as_f64().unwrap(), &format!("{name}: b"));
            let gaps: Vec<f64> = pr.iter().zip(&rr).map(|(p, r)| p - r).collect();
            close(
                pearson(&gaps, &d),
                want["reward_length_correlation"].as_f64().unwrap(),
                name,
            );
            let q = quintiles(&wins, &d);
            let wq = want["quintiles"].as_array().unwrap();
            assert_eq!(q.len(), wq.len(), "{name}");
            for ((lo, hi, rate, n), w) in q.iter().zip(wq) {
                let w = floats(w);
                close(*lo, w[0], name);
                close(*hi, w[1], name);
                close(*rate, w[2], name);
                assert_eq!(*n as f64, w[3], "{name}");
            }
        }
    }

    /// The policy wins because it writes longer: at equal length it is a coin flip.
    #[test]
    fn a_length_driven_win_rate_is_not_length_controlled() {
        let cases = fixture("winrate.json");
        let case = cases["cases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "longer_wins")
            .unwrap();
        let want = &case["expected"];
        let (raw, lc) = (
            want["win_rate"].as_f64().unwrap(),
            want["lc_win_rate"].as_f64().unwrap(),
        );
        assert!(raw > 0.7, "raw {raw}");
        assert!((lc - 0.5).abs() < 0.1, "length-controlled {lc}");
    }

    #[test]
    fn ties_half_and_degenerate_lengths_fall_back_to_the_raw_rate() {
        assert_eq!(win(1.0, 1.0), 0.5);
        assert_eq!(win(2.0, 1.0), 1.0);
        let lc = length_controlled(&[1.0, 0.0, 0.5], &[3.0, 3.0, 3.0]);
        assert_eq!(lc.lc_win_rate, 0.5);
        assert!(lc.note.is_some());
        // all wins: separated, no finite maximum
        let lc = length_controlled(&[1.0, 1.0, 1.0, 1.0], &[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(lc.lc_win_rate, 1.0);
        assert!(lc.note.unwrap().contains("converge"));
    }
}
