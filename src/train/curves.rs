//! `refdpo plot`: training and eval curves of one or more runs (their `metrics.jsonl`), overlaid
//! run by run, one SVG per metric, so a sweep over one cache compares at a glance.

use crate::charts::{self, canvas, e, frame, legend, Res, TAB10};
use crate::dpo::Metric;
use crate::error::{fs, Error, Result};
use plotters::prelude::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One run's logged values: metric → (step, value) in step order.
struct Run {
    label: String,
    series: BTreeMap<String, Vec<(f64, f64)>>,
}

impl Run {
    fn read(dir: &Path) -> Result<Self> {
        let path = crate::dirs::RunDir::new(dir).metrics();
        if !path.is_file() {
            return Err(Error::Config(format!(
                "--run {}: no metrics.jsonl there; give a run directory (`train.out`)",
                dir.display()
            )));
        }
        // a file that is there but unreadable (not UTF-8, no permission) is named with its cause
        let text = fs::read_to_string(&path)?;
        let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        let lines = text.lines().count();
        for (i, line) in text.lines().enumerate() {
            let v: Value = match serde_json::from_str(line) {
                Ok(v) => v,
                // the last line of a run being written (or stopped mid-line) is drawn without
                Err(_) if i + 1 == lines && !text.ends_with('\n') => {
                    crate::error::note!(
                        "note: `{}`: line {} is cut short (a run writing it, or stopped mid-line): \
                         drawn without it",
                        path.display(),
                        i + 1
                    );
                    break;
                }
                Err(e) => {
                    return Err(Error::schema(
                        &path,
                        format!("line {} is not JSON ({e})", i + 1),
                    ))
                }
            };
            // Values past what an axis can span (a hand-edited or diverged log) are left out:
            // the chart's tick search does not end on a range of 1e308.
            let drawable = |x: &f64| x.abs() <= 1e300;
            let Some(step) = v.get("step").and_then(Value::as_f64).filter(drawable) else {
                continue;
            };
            for (k, x) in v.as_object().into_iter().flatten() {
                if let Some(x) = x.as_f64().filter(drawable) {
                    series.entry(k.clone()).or_default().push((step, x));
                }
            }
        }
        // in step order: lines appended out of order (a hand-edited or concatenated log) would
        // draw a line that doubles back
        for points in series.values_mut() {
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        let label = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| dir.display().to_string());
        Ok(Self { label, series })
    }
}

/// Draws every metric some run logged into `out` (one SVG each); returns the files written.
pub fn plot(runs: &[PathBuf], out: &Path) -> Result<Vec<PathBuf>> {
    let runs = runs
        .iter()
        .map(|d| Run::read(d))
        .collect::<Result<Vec<_>>>()?;
    fs::create_dir_all(out)?;
    let mut files = Vec::new();
    for metric in Metric::PLOTTED.map(Metric::name) {
        let eval = format!("eval/{metric}");
        if !runs.iter().any(|r| r.series.contains_key(metric)) {
            continue;
        }
        let path = out.join(format!("{}.svg", metric.replace('/', "_")));
        charts::write(&path, |p| draw(p, metric, &eval, &runs))?;
        files.push(path);
    }
    if files.is_empty() {
        return Err(Error::Config(format!(
            "nothing to plot: no run's metrics.jsonl logs {} (a run with no logged step yet?)",
            Metric::PLOTTED.map(Metric::name).join(", ")
        )));
    }
    Ok(files)
}

fn draw(path: &Path, metric: &str, eval: &str, runs: &[Run]) -> Res {
    let all = || {
        runs.iter()
            .flat_map(|r| [r.series.get(metric), r.series.get(eval)])
            .flatten()
            .flatten()
    };
    let (mut x1, mut y0, mut y1) = (1.0f64, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in all() {
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    let pad = ((y1 - y0) * 0.05).max(1e-9 * y1.abs().max(1.0));
    let root = canvas(path, 540)?;
    let mut chart = frame(&root, metric, 0.0..x1, (y0 - pad)..(y1 + pad), 80)?;
    chart
        .configure_mesh()
        .x_desc("optimizer step")
        .y_desc(format!("{metric} (line: train; dots: {eval})"))
        .axis_desc_style(("sans-serif", 16))
        .draw()
        .map_err(e)?;
    for (i, run) in runs.iter().enumerate() {
        let colour = TAB10[i % TAB10.len()];
        if let Some(pts) = run.series.get(metric) {
            chart
                .draw_series(LineSeries::new(pts.clone(), colour.stroke_width(2)))
                .map_err(e)?
                .label(run.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 14, y)], colour.stroke_width(2))
                });
        }
        if let Some(pts) = run.series.get(eval) {
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 5, colour.filled())))
                .map_err(e)?;
        }
    }
    legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    root.present().map_err(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_overlay_per_metric_and_a_missing_run_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        for (name, beta) in [("beta-0.1", 0.1), ("beta-1.0", 1.0)] {
            let dir = tmp.path().join(name);
            std::fs::create_dir_all(&dir).unwrap();
            let lines: Vec<String> = (1..=4)
                .map(|s| {
                    format!(
                        r#"{{"step":{s},"loss":{},"learning_rate":1e-6}}"#,
                        0.69 - beta * s as f64 / 10.0
                    )
                })
                .chain([r#"{"step":4,"eval/loss":0.5}"#.to_string()])
                .collect();
            std::fs::write(dir.join("metrics.jsonl"), lines.join("\n")).unwrap();
        }
        let runs = [tmp.path().join("beta-0.1"), tmp.path().join("beta-1.0")];
        let out = tmp.path().join("plots");
        let files = plot(&runs, &out).unwrap();
        let names: Vec<_> = files
            .iter()
            .map(|f| f.file_name().unwrap().to_str().unwrap())
            .collect();
        assert_eq!(
            names,
            ["loss.svg", "learning_rate.svg"],
            "only what was logged"
        );
        let svg = std::fs::read_to_string(&files[0]).unwrap();
        assert!(
            svg.contains("beta-0.1") && svg.contains("beta-1.0"),
            "both runs in the legend"
        );
        assert!(svg.contains("<circle"), "eval points drawn");
        let err = plot(&[tmp.path().join("nope")], &out)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("nope") && err.contains("metrics.jsonl"),
            "{err}"
        );
    }

    /// A log whose values span the doubles' whole range (a hand-edited or diverged run) is drawn
    /// without them, in bounded time: the chart's tick search looped forever on it.
    #[test]
    fn extreme_values_are_left_out_not_drawn_forever() {
        let tmp = tempfile::tempdir().unwrap();
        let lines = [
            r#"{"step":1,"loss":1e308}"#,
            r#"{"step":2,"loss":-1e308}"#,
            r#"{"step":3,"loss":0.5}"#,
            r#"{"step":1e308,"loss":0.4}"#,
        ];
        std::fs::write(tmp.path().join("metrics.jsonl"), lines.join("\n")).unwrap();
        let files = plot(&[tmp.path().to_path_buf()], &tmp.path().join("plots")).unwrap();
        assert_eq!(files.len(), 1);
    }

    /// Lines out of step order are drawn in step order; a last line cut short is left out; a log
    /// with nothing to draw is an error, not an empty folder and exit 0 (fuzzer).
    #[test]
    fn steps_are_drawn_in_order_a_cut_last_line_is_left_out_and_nothing_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let lines = [
            r#"{"step":3,"loss":0.3}"#,
            r#"{"step":1,"loss":0.1}"#,
            r#"{"step":2,"loss":0.2}"#,
            r#"{"step":4,"lo"#,
        ];
        std::fs::write(tmp.path().join("metrics.jsonl"), lines.join("\n")).unwrap();
        let run = Run::read(tmp.path()).unwrap();
        assert_eq!(run.series["loss"], [(1.0, 0.1), (2.0, 0.2), (3.0, 0.3)]);
        // cut short in the middle of the file: damaged, named
        std::fs::write(tmp.path().join("metrics.jsonl"), lines.join("\n") + "\n").unwrap();
        let err = Run::read(tmp.path()).err().unwrap().to_string();
        assert!(err.contains("line 4 is not JSON"), "{err}");
        std::fs::write(tmp.path().join("metrics.jsonl"), "{\"step\":1,\"foo\":2}\n").unwrap();
        let err = plot(&[tmp.path().to_path_buf()], &tmp.path().join("plots"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("nothing to plot"), "{err}");
    }
}
