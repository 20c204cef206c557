//! SVG charts for `refdpo stats --plot DIR` (plotters): completion lengths chosen vs rejected, the
//! longer answer's win rate per length-difference decile, and margin vs length difference.

use super::queries::Stats;
use crate::charts::{self, canvas, e, frame, legend, Res, CHOSEN, POLICY, REJECTED};
use crate::error::{fs, Result};
use plotters::prelude::*;
use std::path::{Path, PathBuf};

/// Writes every chart into `dir`; returns their paths.
pub fn write_all(dir: &Path, s: &Stats) -> Result<Vec<PathBuf>> {
    fs::create_dir_all(dir)?;
    let files = vec![
        dir.join("lengths.svg"),
        dir.join("longer_win_rate.svg"),
        dir.join("margin_vs_length.svg"),
    ];
    lengths(&files[0], s)?;
    charts::write(&files[1], |p| win_rate(p, s))?;
    charts::write(&files[2], |p| margins(p, s))?;
    Ok(files)
}

/// A labelled, coloured point cloud.
type Series<'a> = (&'a str, RGBColor, Vec<(f64, f64)>);

fn lengths(path: &Path, s: &Stats) -> Result<()> {
    let series = [
        ("chosen", CHOSEN, s.chosen_len.clone()),
        ("rejected", REJECTED, s.rejected_len.clone()),
    ];
    charts::histogram(
        path,
        "Completion length: chosen vs rejected",
        "completion tokens (after truncation)",
        "pairs",
        &series,
    )
}

fn win_rate(path: &Path, s: &Stats) -> Res {
    let root = canvas(path, 540)?;
    let title = "How often the longer answer is the chosen one";
    let mut chart = frame(&root, title, 0.5..10.5, 0.0..1.0, 64)?;
    chart
        .configure_mesh()
        .x_desc("decile of |length difference| (1 = smallest)")
        .x_labels(10)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc("fraction of pairs where the longer answer won")
        .axis_desc_style(("sans-serif", 16))
        .draw()
        .map_err(e)?;
    chart
        .draw_series(LineSeries::new(
            [(0.5, 0.5), (10.5, 0.5)],
            BLACK.mix(0.4).stroke_width(1),
        ))
        .map_err(e)?
        .label("no length preference (0.5)")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 14, y)], BLACK.mix(0.4)));
    let pts: Vec<(f64, f64)> = s
        .deciles
        .iter()
        .map(|d| ((d.decile + 1) as f64, d.longer_wins))
        .collect();
    chart
        .draw_series(LineSeries::new(pts.clone(), CHOSEN.stroke_width(2)))
        .map_err(e)?
        .label("longer answer chosen")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 14, y)], CHOSEN.stroke_width(2)));
    chart
        .draw_series(pts.iter().map(|&p| Circle::new(p, 5, CHOSEN.filled())))
        .map_err(e)?;
    legend(&mut chart, SeriesLabelPosition::LowerRight)?;
    root.present().map_err(e)
}

fn margins(path: &Path, s: &Stats) -> Res {
    let mut series: Vec<Series> = vec![(
        "reference log-prob margin (ref_chosen - ref_rejected)",
        REJECTED,
        s.len_diff
            .iter()
            .copied()
            .zip(s.ref_margin.iter().copied())
            .collect(),
    )];
    if let Some(p) = &s.policy {
        series.push((
            "trained policy implicit reward margin",
            POLICY,
            p.points.clone(),
        ));
    }
    let all = series
        .iter()
        .flat_map(|(_, _, v)| v.iter())
        .filter(|(x, y)| x.is_finite() && y.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (-1.0f64, 1.0f64, -1.0f64, 1.0f64);
    for &(x, y) in all {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    let pad = |a: f64, b: f64| (b - a) * 0.05;
    let (px, py) = (pad(x0, x1), pad(y0, y1));
    let root = canvas(path, 600)?;
    let title = "Margin vs length difference (chosen - rejected)";
    let mut chart = frame(&root, title, (x0 - px)..(x1 + px), (y0 - py)..(y1 + py), 72)?;
    chart
        .configure_mesh()
        .x_desc("len(chosen) - len(rejected), tokens")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc("margin (nats; policy: beta-scaled)")
        .axis_desc_style(("sans-serif", 16))
        .draw()
        .map_err(e)?;
    for (label, color, pts) in series {
        chart
            .draw_series(
                pts.into_iter()
                    .map(move |p| Circle::new(p, 2, color.mix(0.5).filled())),
            )
            .map_err(e)?
            .label(label)
            .legend(move |(x, y)| Circle::new((x + 7, y), 4, color.filled()));
    }
    legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
    root.present().map_err(e)
}
