//! SVG charts for `refdpo stats --plot DIR` (plotters): completion lengths chosen vs rejected, the
//! longer answer's win rate per length-difference decile, and margin vs length difference.

use super::queries::Stats;
use crate::error::{fs, Error, Result};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use std::path::{Path, PathBuf};

const CHOSEN: RGBColor = RGBColor(31, 119, 180);
const REJECTED: RGBColor = RGBColor(214, 39, 40);
pub const POLICY: RGBColor = RGBColor(44, 160, 44);
pub const REFERENCE: RGBColor = RGBColor(127, 127, 127);

fn err(path: &Path) -> impl Fn(String) -> Error + '_ {
    move |msg| Error::Plot {
        path: path.to_path_buf(),
        msg,
    }
}

/// Writes every chart into `dir`; returns their paths.
pub fn write_all(dir: &Path, s: &Stats) -> Result<Vec<PathBuf>> {
    fs::create_dir_all(dir)?;
    let files = vec![
        dir.join("lengths.svg"),
        dir.join("longer_win_rate.svg"),
        dir.join("margin_vs_length.svg"),
    ];
    lengths(&files[0], s).map_err(err(&files[0]))?;
    win_rate(&files[1], s).map_err(err(&files[1]))?;
    margins(&files[2], s).map_err(err(&files[2]))?;
    Ok(files)
}

type Res = std::result::Result<(), String>;

type Chart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// The boxed legend every chart draws.
fn legend<'a, 'b: 'a>(chart: &mut Chart<'a, 'b>, position: SeriesLabelPosition) -> Res {
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .draw()
        .map_err(e)
}

/// A labelled, coloured point cloud.
type Series<'a> = (&'a str, RGBColor, Vec<(f64, f64)>);

fn e<E: std::fmt::Display>(x: E) -> String {
    x.to_string()
}

fn lengths(path: &Path, s: &Stats) -> Res {
    let series = [
        ("chosen", CHOSEN, s.chosen_len.clone()),
        ("rejected", REJECTED, s.rejected_len.clone()),
    ];
    draw_histogram(
        path,
        "Completion length: chosen vs rejected",
        "completion tokens (after truncation)",
        "pairs",
        &series,
    )
}

/// A labelled, coloured set of values for [`histogram`].
pub type Values<'a> = (&'a str, RGBColor, Vec<f64>);

/// Overlaid histograms (30 bins from 0) of labelled series.
pub fn histogram(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Values],
) -> Result<()> {
    draw_histogram(path, title, x_desc, y_desc, series).map_err(err(path))
}

fn draw_histogram(path: &Path, title: &str, x_desc: &str, y_desc: &str, series: &[Values]) -> Res {
    let max = series
        .iter()
        .flat_map(|(_, _, v)| v.iter())
        .cloned()
        .fold(1.0, f64::max);
    let bins = 30usize;
    let width = (max / bins as f64).ceil().max(1.0);
    let hists: Vec<Vec<u32>> = series
        .iter()
        .map(|(_, _, v)| {
            let mut h = vec![0u32; bins + 1];
            for x in v {
                h[((x / width) as usize).min(bins)] += 1;
            }
            h
        })
        .collect();
    let top = hists.iter().flatten().copied().max().unwrap_or(1) as f64 * 1.1;
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..(width * (bins + 1) as f64), 0.0..top)
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .axis_desc_style(("sans-serif", 16))
        .draw()
        .map_err(e)?;
    for ((label, color, _), h) in series.iter().zip(&hists) {
        let color = *color;
        chart
            .draw_series(h.iter().enumerate().map(|(i, &n)| {
                let x0 = i as f64 * width;
                Rectangle::new(
                    [(x0, 0.0), (x0 + width, n as f64)],
                    color.mix(0.45).filled(),
                )
            }))
            .map_err(e)?
            .label(*label)
            .legend(move |(x, y)| {
                Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.mix(0.6).filled())
            });
    }
    legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    root.present().map_err(e)
}

fn win_rate(path: &Path, s: &Stats) -> Res {
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "How often the longer answer is the chosen one",
            ("sans-serif", 24),
        )
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(0.5f64..10.5, 0.0f64..1.0)
        .map_err(e)?;
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
    let root = SVGBackend::new(path, (900, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Margin vs length difference (chosen - rejected)",
            ("sans-serif", 24),
        )
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d((x0 - px)..(x1 + px), (y0 - py)..(y1 + py))
        .map_err(e)?;
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
