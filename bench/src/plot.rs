//! `--plot FILE.svg`: throughput over time and the latency distribution of every run.

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;

use super::report::RunReport;

/// Largest "number of nines" on the latency axis (99.999 %).
const MAX_NINES: f64 = 5.0;

/// Percentile (0–100) as "number of nines": 90 → 1, 99 → 2, 99.9 → 3.
fn nines(percentile: f64) -> f64 {
    let rest = 1.0 - percentile / 100.0;
    if rest <= 10f64.powf(-MAX_NINES) { MAX_NINES } else { -rest.log10() }
}

/// The percentile label of a point on the nines axis.
fn percentile_label(nines: f64) -> String {
    let percentile = 100.0 * (1.0 - 10f64.powf(-nines));
    let text = format!("{percentile:.3}");
    format!("{}%", text.trim_end_matches('0').trim_end_matches('.'))
}

/// Draws both charts side by side into an SVG file at `path`.
pub fn write_svg(path: &Path, title: &str, runs: &[RunReport]) -> anyhow::Result<()> {
    draw(path, title, runs).map_err(|e| anyhow::anyhow!("{e}")).with_context(|| format!("drawing {}", path.display()))
}

fn draw(path: &Path, title: &str, runs: &[RunReport]) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let root = SVGBackend::new(path, (1400, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 22))?;
    let (left, right) = root.split_horizontally(700);

    let seconds = runs.iter().flat_map(|r| r.timeline_rps.iter().map(|p| p.0)).fold(1.0, f64::max);
    let peak = runs.iter().flat_map(|r| r.timeline_rps.iter().map(|p| p.1)).fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(&left)
        .caption("Throughput over time", ("sans-serif", 18))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..seconds * 1.02, 0f64..peak * 1.1)?;
    chart.configure_mesh().x_desc("seconds since start").y_desc("completed requests/s").draw()?;
    draw_runs(&mut chart, runs, |run| run.timeline_rps.clone(), SeriesLabelPosition::UpperRight)?;

    let latencies = || runs.iter().flat_map(|r| r.latency_curve_ms.iter().map(|p| p.1));
    let low = latencies().fold(f64::INFINITY, f64::min).clamp(0.01, 1.0e6) * 0.8;
    let high = latencies().fold(0.0, f64::max).max(low * 10.0) * 1.25;
    let mut chart = ChartBuilder::on(&right)
        .caption("Latency distribution (publish → result)", ("sans-serif", 18))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..MAX_NINES, (low..high).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (ms, log)")
        .x_labels(6)
        .x_label_formatter(&|x| percentile_label(*x))
        .y_label_formatter(&|y| format!("{y}"))
        .draw()?;
    let curve = |run: &RunReport| run.latency_curve_ms.iter().map(|(p, ms)| (nines(*p), ms.max(low))).collect();
    draw_runs(&mut chart, runs, curve, SeriesLabelPosition::UpperLeft)?;
    root.present()?;
    Ok(())
}

/// One line per run, in the run's colour, with a legend.
fn draw_runs<'a, DB, X, Y>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<X, Y>>,
    runs: &[RunReport],
    points: impl Fn(&RunReport) -> Vec<(f64, f64)>,
    legend: SeriesLabelPosition,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>>
where
    DB: DrawingBackend + 'a,
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    for (i, run) in runs.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(points(run), color.stroke_width(2)))?
            .label(run.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.85)).border_style(BLACK).position(legend).draw()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_percentile_axis_counts_nines() {
        assert_eq!(nines(0.0), 0.0);
        assert!((nines(90.0) - 1.0).abs() < 1e-9);
        assert!((nines(99.9) - 3.0).abs() < 1e-9);
        assert_eq!(nines(100.0), MAX_NINES);
        assert_eq!(percentile_label(0.0), "0%");
        assert_eq!(percentile_label(2.0), "99%");
        assert_eq!(percentile_label(3.0), "99.9%");
    }
}
