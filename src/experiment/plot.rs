//! SVG plots of an elasticity experiment (plotters' SVG backend: text is left to the
//! viewer's fonts, so no font library is needed to draw them).

use super::metrics::PolicyReport;
use super::policy::Policy;
use super::ExperimentError;
use plotters::prelude::*;
use std::path::{Path, PathBuf};

const MIB: f64 = 1024.0 * 1024.0;

fn color(p: Policy) -> RGBColor {
    match p {
        Policy::JobPeak => RGBColor(200, 40, 40),
        Policy::JobAvg => RGBColor(40, 80, 200),
        Policy::Task => RGBColor(20, 150, 60),
    }
}

fn plot_err(path: &Path) -> impl Fn(String) -> ExperimentError + '_ {
    move |what| ExperimentError::Plot {
        path: path.to_path_buf(),
        what,
    }
}

/// Draws allocated and used memory over time, one panel per policy, to `path`.
pub fn memory_over_time(path: &Path, reports: &[PolicyReport]) -> Result<(), ExperimentError> {
    let err = plot_err(path);
    let height = 260 * reports.len().max(1) as u32;
    let root = SVGBackend::new(path, (900, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let t_max = reports
        .iter()
        .flat_map(|r| r.samples.last().map(|s| s.t_ms / 1000.0))
        .fold(1.0f64, f64::max);
    let y_max = reports
        .iter()
        .map(|r| r.capacity_bytes.max(r.peak_allocated_bytes) as f64 / MIB)
        .fold(1.0f64, f64::max)
        * 1.1;
    let panels = root.split_evenly((reports.len().max(1), 1));
    for (area, r) in panels.iter().zip(reports) {
        let mut chart = ChartBuilder::on(area)
            .caption(
                format!(
                    "{}: idle {:.0}% of allocated, spilled {:.0} MiB",
                    r.policy,
                    r.idle_fraction * 100.0,
                    r.spilled_bytes as f64 / MIB
                ),
                ("sans-serif", 16),
            )
            .margin(8)
            .x_label_area_size(32)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..t_max, 0f64..y_max)
            .map_err(|e| err(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("time (s)")
            .y_desc("MiB")
            .draw()
            .map_err(|e| err(e.to_string()))?;
        let cap = r.capacity_bytes as f64 / MIB;
        let grey = RGBColor(120, 120, 120);
        chart
            .draw_series(LineSeries::new(vec![(0.0, cap), (t_max, cap)], &grey))
            .map_err(|e| err(e.to_string()))?
            .label("capacity")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], grey));
        let c = color(r.policy);
        chart
            .draw_series(LineSeries::new(
                r.samples
                    .iter()
                    .map(|s| (s.t_ms / 1000.0, s.allocated as f64 / MIB)),
                c.stroke_width(2),
            ))
            .map_err(|e| err(e.to_string()))?
            .label("allocated")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        let used = RGBColor(0, 0, 0);
        chart
            .draw_series(LineSeries::new(
                r.samples
                    .iter()
                    .map(|s| (s.t_ms / 1000.0, s.used.min(s.allocated) as f64 / MIB)),
                &used,
            ))
            .map_err(|e| err(e.to_string()))?
            .label("used")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], used));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(e.to_string()))?;
    }
    root.present().map_err(|e| err(e.to_string()))
}

/// Draws the distribution (CDF) of per-job slowdowns of every policy to `path`.
pub fn slowdown_cdf(path: &Path, reports: &[PolicyReport]) -> Result<(), ExperimentError> {
    let err = plot_err(path);
    let root = SVGBackend::new(path, (900, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let x_max = reports
        .iter()
        .map(|r| r.max_slowdown)
        .filter(|v| v.is_finite())
        .fold(2.0f64, f64::max)
        * 1.1;
    let x_min = reports
        .iter()
        .flat_map(|r| r.jobs.iter().map(|j| j.slowdown))
        .filter(|v| v.is_finite() && *v > 0.0)
        .fold(1.0f64, f64::min)
        * 0.9;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Per-job slowdown against running alone (CDF)",
            ("sans-serif", 16),
        )
        .margin(8)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d((x_min..x_max).log_scale(), 0f64..1.0f64)
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("slowdown: completion time / time alone (log scale)")
        .y_desc("fraction of jobs")
        .draw()
        .map_err(|e| err(e.to_string()))?;
    for r in reports {
        let mut v: Vec<f64> = r.jobs.iter().map(|j| j.slowdown).collect();
        v.sort_by(f64::total_cmp);
        let n = v.len().max(1) as f64;
        let mut pts = Vec::with_capacity(2 * v.len() + 1);
        pts.push((v.first().copied().unwrap_or(0.0), 0.0));
        for (i, x) in v.iter().enumerate() {
            pts.push((*x, i as f64 / n));
            pts.push((*x, (i + 1) as f64 / n));
        }
        let c = color(r.policy);
        chart
            .draw_series(LineSeries::new(pts, c.stroke_width(2)))
            .map_err(|e| err(e.to_string()))?
            .label(format!(
                "{} (median {:.2}x, p95 {:.2}x)",
                r.policy, r.median_slowdown, r.p95_slowdown
            ))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))
}

/// Writes both plots into `dir` (created if needed); returns their paths.
pub fn write_plots(dir: &Path, reports: &[PolicyReport]) -> Result<Vec<PathBuf>, ExperimentError> {
    std::fs::create_dir_all(dir).map_err(|source| ExperimentError::Io {
        context: "cannot create output directory",
        path: dir.to_path_buf(),
        source,
    })?;
    let mem = dir.join("elasticity-memory.svg");
    let slow = dir.join("elasticity-slowdown.svg");
    memory_over_time(&mem, reports)?;
    slowdown_cdf(&slow, reports)?;
    Ok(vec![mem, slow])
}
