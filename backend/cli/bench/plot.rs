//! Throughput-over-time charts of a benchmark (one line per method, first
//! run of each), like the VEE paper's figures, as SVG.

use std::path::Path;

use plotters::prelude::*;

use super::BenchReport;

/// Errors drawing a chart.
#[derive(Debug, thiserror::Error)]
#[error("drawing {path}: {message}")]
pub struct PlotError {
    path: String,
    message: String,
}

const COLORS: [RGBColor; 8] = [
    RGBColor(0, 0, 0),
    RGBColor(128, 128, 128),
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// Writes the guest's throughput after each method's first restore, in
/// seconds since the restore started, with the warm rate as a reference.
pub fn throughput_svg(report: &BenchReport, path: &Path) -> Result<(), PlotError> {
    let err = |e: &dyn std::fmt::Display| PlotError {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let firsts: Vec<_> = report
        .summary
        .iter()
        .filter_map(|s| report.runs.iter().find(|r| r.method == s.method))
        .collect();
    let x_max = firsts
        .iter()
        .flat_map(|r| r.samples.iter().map(|s| s.at_ms / 1000.0))
        .fold(1.0f64, f64::max);
    let y_max = firsts
        .iter()
        .flat_map(|r| r.samples.iter().map(|s| s.rate))
        .fold(report.warm_rate, f64::max)
        * 1.1;
    let root = SVGBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let title = format!(
        "{}: guest throughput after restore ({} RAM, {})",
        report.vm, report.memory, report.accel
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("seconds since the restore started")
        .y_desc(report.rate_unit.as_str())
        .draw()
        .map_err(|e| err(&e))?;
    let warm = report.warm_rate * super::TTR_FRACTION;
    chart
        .draw_series(LineSeries::new(
            [(0.0, warm), (x_max, warm)],
            RGBColor(200, 200, 200).stroke_width(1),
        ))
        .map_err(|e| err(&e))?
        .label("90% of warm")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RGBColor(200, 200, 200)));
    for (i, run) in firsts.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(
                run.samples.iter().map(|s| (s.at_ms / 1000.0, s.rate)),
                color.stroke_width(2),
            ))
            .map_err(|e| err(&e))?
            .label(run.method.clone())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::ttr::Sample;
    use crate::bench::{MethodRun, MethodSummary};

    fn run(method: &str, rates: &[f64]) -> MethodRun {
        MethodRun {
            method: method.into(),
            run: 1,
            running_ms: 100.0,
            ttr_ms: Some(200.0),
            complete_ms: 500.0,
            faults: 3,
            bytes_read: 1 << 20,
            fill_mib_per_s: None,
            fault_p50_us: None,
            steady_rate: None,
            probes: Vec::new(),
            first_answer_ms: None,
            learn_window_ms: None,
            window_faults: None,
            window_pages: None,
            zero_faults: None,
            ws_pages: None,
            floor_ms: None,
            store_fetched: None,
            samples: rates
                .iter()
                .enumerate()
                .map(|(i, &r)| Sample {
                    at_ms: 50.0 * (i + 1) as f64,
                    interval_ms: 50.0,
                    rate: r,
                })
                .collect(),
        }
    }

    #[test]
    fn draws_one_line_per_method_with_labels() {
        let summary = |m: &str| MethodSummary {
            method: m.into(),
            runs: 1,
            running_ms: Some(1.0),
            ttr_ms: Some(1.0),
            complete_ms: Some(1.0),
            faults: Some(0.0),
            bytes_read_mib: Some(1.0),
            without_ttr: 0,
            fill_mib_per_s: None,
            fault_p50_us: None,
            fill_vs_limit: None,
            fault_p50_vs_round_trip: None,
            fault_p50_vs_page_floor: None,
            first_answer_ms: None,
            probe_p50_ms: None,
            probe_max_ms: None,
            learn_window_ms: None,
            window_rate_vs_steady: None,
            window_faults: None,
            window_pages: None,
            saved_page_faults: None,
            ws_pages: None,
            saved_faults_vs_ws: None,
            floor_ms: None,
            ttr_vs_floor: None,
            first_answer_vs_floor: None,
            store_requests: None,
            store_mib: None,
        };
        let report = BenchReport {
            vm: "t".into(),
            memory: "1G".into(),
            nonzero_pages: 1,
            accel: "tcg".into(),
            read_limit: None,
            fill_limit: None,
            hot_cache: false,
            warm_rate: 100.0,
            warm_probe_p50_ms: None,
            probe_period_ms: None,
            ttr_definition: String::new(),
            limits: None,
            summary: vec![summary("stock"), summary("ws:learned")],
            libvirt: None,
            rate_unit: "MiB/s".into(),
            app: None,
            store: None,
            record_window_ms: None,
            runs: vec![
                run("stock", &[0.0, 10.0, 100.0]),
                run("ws:learned", &[90.0, 100.0]),
            ],
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.svg");
        throughput_svg(&report, &path).expect("draw");
        let svg = std::fs::read_to_string(&path).expect("read");
        assert!(svg.starts_with("<svg"), "{}", &svg[..40.min(svg.len())]);
        assert!(svg.contains("ws:learned") && svg.contains("stock"));
        assert!(
            svg.matches("<polyline").count() >= 3,
            "two methods and the 90% line"
        );
    }
}
