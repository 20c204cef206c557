//! SVG charts for `refdpo judge --plot DIR`: each prompt's reward gap against its length
//! difference, and the win rate per quintile of the length difference beside the raw and
//! length-controlled win rates.

use super::report::Judgement;
use crate::charts::{self, canvas, e, frame, legend, Res, CHOSEN, POLICY, REFERENCE};
use crate::error::{fs, Result};
use plotters::prelude::*;
use std::path::{Path, PathBuf};

/// Writes both charts into `dir`; returns their paths.
pub fn write_all(dir: &Path, j: &Judgement) -> Result<Vec<PathBuf>> {
    fs::create_dir_all(dir)?;
    let files = vec![
        dir.join("judge_reward_vs_length.svg"),
        dir.join("judge_win_rate_by_length.svg"),
    ];
    charts::write(&files[0], |p| gaps(p, j))?;
    charts::write(&files[1], |p| quintiles(p, j))?;
    Ok(files)
}

/// The extent of `v` padded by 5%, at least [-1, 1].
fn extent(v: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = v
        .filter(|x| x.is_finite())
        .fold((-1.0f64, 1.0f64), |(a, b), x| (a.min(x), b.max(x)));
    let pad = (hi - lo) * 0.05;
    (lo - pad, hi + pad)
}

fn gaps(path: &Path, j: &Judgement) -> Res {
    let pts: Vec<(f64, f64)> = j
        .lines
        .iter()
        .map(|l| {
            (
                l.policy_tokens as f64 - l.reference_tokens as f64,
                l.policy_reward - l.reference_reward,
            )
        })
        .collect();
    let (x0, x1) = extent(pts.iter().map(|p| p.0));
    let (y0, y1) = extent(pts.iter().map(|p| p.1));
    let root = canvas(path, 600)?;
    let title = "Reward gap vs length difference (policy - reference)";
    let mut chart = frame(&root, title, x0..x1, y0..y1, 72)?;
    chart
        .configure_mesh()
        .x_desc("policy tokens - reference tokens")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc("policy reward - reference reward")
        .axis_desc_style(("sans-serif", 16))
        .draw()
        .map_err(e)?;
    chart
        .draw_series(LineSeries::new([(x0, 0.0), (x1, 0.0)], BLACK.mix(0.4)))
        .map_err(e)?;
    chart
        .draw_series(
            pts.iter()
                .map(|&p| Circle::new(p, 3, POLICY.mix(0.6).filled())),
        )
        .map_err(e)?
        .label(format!(
            "one prompt (correlation {:.2})",
            j.reward_length_correlation
        ))
        .legend(|(x, y)| Circle::new((x + 7, y), 4, POLICY.filled()));
    legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
    root.present().map_err(e)
}

fn quintiles(path: &Path, j: &Judgement) -> Res {
    let root = canvas(path, 540)?;
    let title = "Policy win rate by quintile of length difference";
    let mut chart = frame(&root, title, 0.5..5.5, 0.0..1.0, 64)?;
    let labels: Vec<String> = j
        .quintiles
        .iter()
        .map(|(lo, hi, _, _)| format!("{lo:.0}..{hi:.0}"))
        .collect();
    chart
        .configure_mesh()
        .x_desc("quintile of policy - reference tokens")
        .x_labels(5)
        .x_label_formatter(&|x| {
            let i = x.round() as usize;
            labels.get(i.wrapping_sub(1)).cloned().unwrap_or_default()
        })
        .y_desc("fraction of prompts the policy won")
        .axis_desc_style(("sans-serif", 16))
        .draw()
        .map_err(e)?;
    for (value, label, color) in [
        (
            j.win_rate,
            format!("raw win rate {:.3}", j.win_rate),
            REFERENCE,
        ),
        (
            j.lc.lc_win_rate,
            format!("length-controlled {:.3}", j.lc.lc_win_rate),
            CHOSEN,
        ),
    ] {
        chart
            .draw_series(LineSeries::new(
                [(0.5, value), (5.5, value)],
                color.stroke_width(2),
            ))
            .map_err(e)?
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 14, y)], color.stroke_width(2)));
    }
    let pts: Vec<(f64, f64)> = j
        .quintiles
        .iter()
        .enumerate()
        .map(|(i, q)| ((i + 1) as f64, q.2))
        .collect();
    chart
        .draw_series(LineSeries::new(pts.clone(), POLICY.stroke_width(2)))
        .map_err(e)?
        .label("per quintile")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 14, y)], POLICY.stroke_width(2)));
    chart
        .draw_series(pts.iter().map(|&p| Circle::new(p, 5, POLICY.filled())))
        .map_err(e)?;
    legend(&mut chart, SeriesLabelPosition::LowerRight)?;
    root.present().map_err(e)
}
