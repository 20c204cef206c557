//! The SVG charts' shared parts (plotters): the palette, a titled frame on a white 900-wide
//! canvas, the boxed legend, and overlaid histograms. `stats --plot`, `generate --plot` and
//! `refdpo plot` draw with these, so every chart looks alike. A leaf: it knows no refdpo type.

use crate::error::{Error, Result};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use std::ops::Range;
use std::path::Path;

pub const CHOSEN: RGBColor = RGBColor(31, 119, 180);
pub const REJECTED: RGBColor = RGBColor(214, 39, 40);
pub const POLICY: RGBColor = RGBColor(44, 160, 44);
pub const REFERENCE: RGBColor = RGBColor(127, 127, 127);

/// Run colours (matplotlib's tab10), reused past ten runs.
pub const TAB10: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// A drawing step's outcome: plotters' errors as text, named with the file by [`err`].
pub type Res = std::result::Result<(), String>;

pub type Chart<'a, 'b> =
    ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

pub type Canvas<'b> = DrawingArea<SVGBackend<'b>, Shift>;

/// A plotters error as text.
pub fn e<E: std::fmt::Display>(x: E) -> String {
    x.to_string()
}

/// The error of a chart that could not be drawn into `path`.
pub fn err(path: &Path) -> impl Fn(String) -> Error + '_ {
    move |msg| Error::Plot {
        path: path.to_path_buf(),
        msg,
    }
}

/// Writes the chart `draw` makes (given the path to draw into) as every output is written: under
/// a temporary name, renamed into `path` once whole, so a full disk leaves no truncated SVG
/// there (nor replaces a good one).
pub fn write(path: &Path, draw: impl FnOnce(&Path) -> Res) -> Result<()> {
    crate::error::fs::write_path_atomic(path, |tmp| draw(tmp).map_err(err(path)))
}

/// A white canvas of `height` pixels (900 wide) drawing into `path`.
pub fn canvas(path: &Path, height: u32) -> std::result::Result<Canvas<'_>, String> {
    let root = SVGBackend::new(path, (900, height)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    Ok(root)
}

/// The frame every chart has: a 24-point title, 16 pixels of margin, room for the axis labels
/// (`y_labels` pixels on the left), over `x` × `y`. Its mesh is the chart's own.
pub fn frame<'a, 'b>(
    root: &'a Canvas<'b>,
    title: &str,
    x: Range<f64>,
    y: Range<f64>,
    y_labels: u32,
) -> std::result::Result<Chart<'a, 'b>, String> {
    ChartBuilder::on(root)
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(y_labels)
        .build_cartesian_2d(x, y)
        .map_err(e)
}

/// The boxed legend every chart draws.
pub fn legend<'a, 'b: 'a>(chart: &mut Chart<'a, 'b>, position: SeriesLabelPosition) -> Res {
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .draw()
        .map_err(e)
}

/// A labelled, coloured set of values for [`histogram`].
pub type Values<'a> = (&'a str, RGBColor, Vec<f64>);

/// Overlaid histograms (30 bins from 0) of labelled series, into `path`.
pub fn histogram(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Values],
) -> Result<()> {
    write(path, |p| draw_histogram(p, title, x_desc, y_desc, series))
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
    let root = canvas(path, 540)?;
    let mut chart = frame(&root, title, 0.0..(width * (bins + 1) as f64), 0.0..top, 64)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_that_fails_midway_leaves_the_last_good_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.svg");
        std::fs::write(&path, "<svg>good</svg>").unwrap();
        // the drawing writes part of its file, then fails (as a full disk does)
        let err = write(&path, |p| {
            std::fs::write(p, "<svg><line opacity=\"0.1\" stroke=\"#0").unwrap();
            Err("No space left on device".into())
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("loss.svg"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "<svg>good</svg>");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary left"
        );
        // and a whole one replaces it
        write(&path, |p| {
            let root = canvas(p, 100)?;
            root.present().map_err(e)
        })
        .unwrap();
        assert!(std::fs::read_to_string(&path).unwrap().starts_with("<svg"));
    }
}
