//! PNG charts of a run: training-loss curves and the accuracy of each method.
//!
//! plotters is built with its `ab_glyph` text backend rather than font-kit, so the binary needs
//! no fontconfig/freetype at build time; instead DejaVuSans.ttf is looked up and registered at
//! run time. Without a font the charts are skipped (with a warning), never the run.

use anyhow::{Context, Result};
use fsmerge_common::metrics::{LogRow, MethodResult};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const SIZE: (u32, u32) = (1000, 600);

/// Width of the accuracy chart's legend strip, right of the plot.
const LEGEND_WIDTH: u32 = 170;

const FONT_FILE: &str = "DejaVuSans.ttf";

/// Where distributions install fonts (Debian: `fonts-dejavu-core`); searched recursively.
const FONT_DIRS: [&str; 2] = ["/usr/share/fonts", "/usr/local/share/fonts"];

/// Write `loss_curves.png` and `accuracy.png` into `dir`; returns the file names written.
/// Where no font can be found, charts are skipped with a tracing::warn naming what is missing and Ok(vec![]) is returned.
pub fn write(dir: &Path, log: &[LogRow], results: &[MethodResult]) -> Result<Vec<String>> {
    if let Err(missing) = font() {
        tracing::warn!("charts skipped: {missing}");
        return Ok(vec![]);
    }
    render(dir, "loss_curves.png", |root| loss_curves(root, log))?;
    render(dir, "accuracy.png", |root| accuracy(root, results))?;
    Ok(vec!["loss_curves.png".into(), "accuracy.png".into()])
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

/// A bar series of the accuracy chart: legend, colour, and the accuracy (0..1) it shows.
type Bar = (&'static str, RGBAColor, fn(&MethodResult) -> f64);

/// Registers DejaVuSans as plotters' "sans-serif" once per process; Err names what is missing.
fn font() -> Result<(), &'static str> {
    static FONT: OnceLock<Result<(), String>> = OnceLock::new();
    let registered = FONT.get_or_init(|| {
        let path = font_path().ok_or_else(|| {
            format!(
                "no {FONT_FILE} at $FSMERGE_FONT or under {} (install fonts-dejavu-core)",
                FONT_DIRS.join(", ")
            )
        })?;
        let bytes =
            std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        // plotters keeps `&'static` font data in a global table, so the bytes live for the process.
        register_font(
            "sans-serif",
            FontStyle::Normal,
            Box::leak(bytes.into_boxed_slice()),
        )
        .map_err(|_| format!("{} is not a usable font", path.display()))
    });
    registered.as_ref().map_err(String::as_str).copied()
}

/// `$FSMERGE_FONT` if it names a file, else the first DejaVuSans.ttf under the standard font dirs.
fn font_path() -> Option<PathBuf> {
    let env = std::env::var_os("FSMERGE_FONT")
        .map(PathBuf::from)
        .filter(|p| p.is_file());
    env.or_else(|| {
        FONT_DIRS
            .iter()
            .find_map(|d| find_file(Path::new(d), FONT_FILE))
    })
}

/// Depth-first search by file name; symlinked directories are not followed, so no cycles.
fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    let mut entries: Vec<_> = std::fs::read_dir(dir).ok()?.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in &entries {
        if entry.file_name() == name && entry.path().is_file() {
            return Some(entry.path());
        }
    }
    entries
        .iter()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .find_map(|e| find_file(&e.path(), name))
}

/// Draws into `.tmp-<name>` (the `.png` suffix picks the encoder) and renames it into place,
/// so a reader never sees a half-written chart.
fn render(dir: &Path, name: &str, draw: impl FnOnce(&Area) -> Result<()>) -> Result<()> {
    let tmp = dir.join(format!(".tmp-{name}"));
    let drawn = (|| -> Result<()> {
        let root = BitMapBackend::new(&tmp, SIZE).into_drawing_area();
        root.fill(&WHITE)?;
        draw(&root)?;
        root.present()?;
        Ok(())
    })();
    let result = drawn.and_then(|()| Ok(std::fs::rename(&tmp, dir.join(name))?));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp); // best effort: the error to report is the one above
    }
    result.with_context(|| format!("writing chart {}", dir.join(name).display()))
}

/// One line per phase (the per-task "train …" phases are skipped: they are the inputs, not the
/// merge), smoothed over ~1% of its steps so noisy minibatch losses stay readable on a log axis.
fn loss_curves(root: &Area, log: &[LogRow]) -> Result<()> {
    let mut phases: Vec<(&str, Vec<(u64, f64)>)> = Vec::new();
    for row in log.iter().filter(|r| !r.phase.starts_with("train ")) {
        if !(row.loss.is_finite() && row.loss > 0.0) {
            continue;
        }
        match phases.iter_mut().find(|(p, _)| *p == row.phase) {
            Some((_, points)) => points.push((row.step, row.loss)),
            None => phases.push((&row.phase, vec![(row.step, row.loss)])),
        }
    }
    for (_, points) in &mut phases {
        points.sort_by_key(|&(step, _)| step);
        *points = moving_average(points, (points.len() / 100).max(1));
    }
    let all = || phases.iter().flat_map(|(_, p)| p.iter());
    let max_step = all().map(|&(s, _)| s).max().unwrap_or(0).max(1);
    let (lo, hi) = all().fold((f64::INFINITY, 0f64), |(lo, hi), &(_, l)| {
        (lo.min(l), hi.max(l))
    });
    let (lo, hi) = if lo < hi {
        (lo, hi)
    } else if lo.is_finite() {
        (lo / 2.0, lo * 2.0)
    } else {
        (0.1, 10.0)
    };

    let mut chart = ChartBuilder::on(root)
        .caption("training loss", ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0..max_step, (lo * 0.9..hi * 1.1).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("training loss (log)")
        .y_label_formatter(&|v| three_digits(*v))
        .draw()?;
    for (i, (phase, points)) in phases.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))?
            .label(*phase)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// `v` rounded to 3 significant digits, so log-axis ticks print as "0.7", not "0.7000000000001".
fn three_digits(v: f64) -> String {
    if !(v.is_finite() && v > 0.0) {
        return format!("{v}");
    }
    let scale = 10f64.powi(2 - v.log10().floor() as i32);
    format!("{}", (v * scale).round() / scale)
}

/// Trailing mean over `window` points (shorter at the start).
fn moving_average(points: &[(u64, f64)], window: usize) -> Vec<(u64, f64)> {
    let mut sum = 0.0;
    points
        .iter()
        .enumerate()
        .map(|(i, &(step, loss))| {
            sum += loss;
            if i >= window {
                sum -= points[i - window].1;
            }
            (step, sum / (i + 1).min(window) as f64)
        })
        .collect()
}

/// Mean task accuracy and joint accuracy per merge method, in %; the single original models are
/// left out (their joint accuracy does not exist and they would crowd the axis).
fn accuracy(root: &Area, results: &[MethodResult]) -> Result<()> {
    let rows: Vec<&MethodResult> = results
        .iter()
        .filter(|r| !r.method.starts_with("original:"))
        .collect();
    // Left half of each method's slot: mean task accuracy (mean fidelity in a job without
    // labels); right half: joint accuracy.
    let labeled = rows.iter().any(|r| !r.per_task_acc.is_empty());
    let first: Bar = if labeled {
        ("mean task accuracy", BLUE.mix(0.75), |r| r.mean_task_acc)
    } else {
        ("mean fidelity (no labels)", BLUE.mix(0.75), |r| {
            r.mean_fidelity()
        })
    };
    let bars: [Bar; 2] = [
        first,
        ("joint accuracy", RED.mix(0.75), |r| {
            r.joint_acc.unwrap_or(0.0)
        }),
    ];
    // The legend gets its own strip on the right: inside the plot it would hide bars near 100%.
    let (plot, legend) = root.split_horizontally(SIZE.0 - LEGEND_WIDTH);
    for (k, (name, color, _)) in bars.iter().enumerate() {
        let y = 60 + 24 * k as i32;
        legend.draw(&Rectangle::new([(0, y), (14, y + 14)], color.filled()))?;
        legend.draw(&Text::new(*name, (22, y), ("sans-serif", 15)))?;
    }

    // One segment per method; plotters' integer ranges are inclusive, hence `0..last`.
    let last = rows.len().max(1) as i32 - 1;
    let mut chart = ChartBuilder::on(&plot)
        .caption("test accuracy per method", ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d((0..last).into_segmented(), 0.0..100.0)?;
    let method = |v: &SegmentValue<i32>| match v {
        SegmentValue::CenterOf(i) => rows.get(*i as usize).map_or("", |r| &r.method).to_string(),
        _ => String::new(),
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(rows.len())
        .x_label_formatter(&method)
        .y_desc("test accuracy (%)")
        .draw()?;
    for (half, (_, color, acc)) in bars.into_iter().enumerate() {
        let bar = |(i, r): (usize, &&MethodResult)| {
            let i = i as i32;
            let (left, right, margin) = if half == 0 {
                (SegmentValue::Exact(i), SegmentValue::CenterOf(i), (12, 1))
            } else {
                (
                    SegmentValue::CenterOf(i),
                    SegmentValue::Exact(i + 1),
                    (1, 12),
                )
            };
            let mut bar = Rectangle::new([(left, 0.0), (right, 100.0 * acc(r))], color.filled());
            // Pixels left free on each side: a wide gap between methods, a thin one within.
            bar.set_margin(0, 0, margin.0, margin.1);
            bar
        };
        chart.draw_series(rows.iter().enumerate().map(bar))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn writes_both_charts() {
        assert!(font().is_ok(), "no font: {:?}", font());
        let mut log = Vec::new();
        for phase in ["train fmnist-0-4", "local", "global", "kd"] {
            for step in 0..300u64 {
                log.push(LogRow {
                    phase: phase.into(),
                    step,
                    loss: 2.0 / (1.0 + step as f64) + 0.01,
                    lr: 1e-3,
                });
            }
        }
        log.push(LogRow {
            phase: "kd".into(),
            step: 300,
            loss: f64::NAN,
            lr: 1e-3,
        });
        let result = |method: &str, acc: f64, joint: Option<f64>| MethodResult {
            method: method.into(),
            variant: BTreeMap::new(),
            per_task_acc: BTreeMap::new(),
            mean_task_acc: acc,
            joint_acc: joint,
            per_task_fidelity: BTreeMap::new(),
            per_task_logit_error: BTreeMap::new(),
            per_task_perplexity: BTreeMap::new(),
            val_mean_task_acc: acc,
            seconds: 1.0,
        };
        let results = [
            result("original:fmnist-0-4", 0.95, None),
            result("ensemble", 0.93, Some(0.88)),
            result("average", 0.41, Some(0.2)),
            result("local supernet", 0.9, None),
        ];
        let dir = tempfile::tempdir().unwrap();
        let written = write(dir.path(), &log, &results).unwrap();
        assert_eq!(written, ["loss_curves.png", "accuracy.png"]);
        for name in written {
            let bytes = std::fs::read(dir.path().join(&name)).unwrap();
            assert!(
                bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
                "{name} is not a PNG"
            );
            assert!(
                bytes.len() > 5 * 1024,
                "{name} is only {} bytes",
                bytes.len()
            );
        }
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            2,
            "temporary files left behind"
        );
    }
}
