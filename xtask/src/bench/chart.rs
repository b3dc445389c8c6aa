//! `target/bench/ratios.svg`: conn/s of each path relative to direct-rr (left) and the scaling
//! row (right), medians with min-max whiskers.

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

use super::dataplane::{MAIN_PATHS, PathKind, SCALED_PATHS};
use super::report::{CONN_RATE, CaseSummary, Spread};

fn color(path: PathKind) -> RGBColor {
    match path {
        PathKind::DirectRr => RGBColor(90, 90, 90),
        PathKind::Direct1 => RGBColor(150, 150, 150),
        PathKind::Mesh => RGBColor(31, 119, 180),
        PathKind::Iptables => RGBColor(214, 39, 40),
        PathKind::Nftables => RGBColor(255, 127, 14),
        PathKind::Haproxy => RGBColor(44, 160, 44),
    }
}

fn ratio_of(summaries: &[CaseSummary], path: PathKind, others: usize) -> Option<Spread> {
    summaries
        .iter()
        .find(|s| s.path == path && s.others == others)
        .and_then(|s| s.vs_direct_rr.get(CONN_RATE.key).copied())
}

pub fn draw(path: &Path, summaries: &[CaseSummary], levels: &[usize], title: &str) -> Result<()> {
    draw_inner(path, summaries, levels, title).map_err(|e| anyhow!("drawing the chart: {e}"))
}

fn draw_inner(
    path: &Path,
    summaries: &[CaseSummary],
    levels: &[usize],
    title: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (1200, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 18))?;
    let (left, right) = root.split_horizontally(560);

    let bars: Vec<(PathKind, Spread)> = MAIN_PATHS
        .iter()
        .filter_map(|&p| Some((p, ratio_of(summaries, p, 0)?)))
        .collect();
    let n = bars.len() as i32;
    let xmax = bars.iter().map(|(_, s)| s.max).fold(1.2f64, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(&left)
        .caption(
            "new connections/s vs direct-rr (1 service)",
            ("sans-serif", 15),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..xmax, (0..n - 1).into_segmented())?;
    let names: Vec<&str> = bars.iter().map(|(p, _)| p.name()).collect();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .light_line_style(WHITE.mix(0.0))
        .y_labels(bars.len())
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => {
                names.get(*i as usize).copied().unwrap_or("").to_owned()
            }
            SegmentValue::Last => String::new(),
        })
        .x_desc("ratio to direct-rr (median, whiskers: min-max over rounds)")
        .draw()?;
    chart.draw_series(bars.iter().enumerate().map(|(i, (p, s))| {
        let i = i as i32;
        let mut bar = Rectangle::new(
            [
                (0.0, SegmentValue::Exact(i)),
                (s.median, SegmentValue::Exact(i + 1)),
            ],
            color(*p).filled(),
        );
        bar.set_margin(6, 6, 0, 0);
        bar
    }))?;
    chart.draw_series(bars.iter().enumerate().map(|(i, (_, s))| {
        PathElement::new(
            vec![
                (s.min, SegmentValue::CenterOf(i as i32)),
                (s.max, SegmentValue::CenterOf(i as i32)),
            ],
            BLACK.stroke_width(2),
        )
    }))?;
    chart.draw_series(bars.iter().enumerate().map(|(i, (_, s))| {
        Text::new(
            format!("{:.2}x", s.median),
            (s.max + xmax * 0.01, SegmentValue::CenterOf(i as i32)),
            ("sans-serif", 13),
        )
    }))?;
    chart.draw_series(std::iter::once(PathElement::new(
        vec![(1.0, SegmentValue::Exact(0)), (1.0, SegmentValue::Exact(n))],
        BLACK.mix(0.5),
    )))?;

    let mut points: Vec<(PathKind, Vec<(f64, Spread)>)> = Vec::new();
    for p in SCALED_PATHS {
        let pts: Vec<(f64, Spread)> = std::iter::once(0)
            .chain(levels.iter().copied())
            .filter_map(|others| Some(((others + 1) as f64, ratio_of(summaries, p, others)?)))
            .collect();
        points.push((p, pts));
    }
    let ymax = points
        .iter()
        .flat_map(|(_, pts)| pts.iter().map(|(_, s)| s.max))
        .fold(1.2f64, f64::max)
        * 1.1;
    let xmax = (levels.iter().copied().max().unwrap_or(1) as f64 * 2.0).max(10.0);
    let mut chart = ChartBuilder::on(&right)
        .caption(
            "scaling: conn/s vs direct-rr with services configured",
            ("sans-serif", 15),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d((0.8f64..xmax).log_scale(), 0f64..ymax)?;
    chart
        .configure_mesh()
        .light_line_style(WHITE.mix(0.0))
        .x_desc("services configured (bench service + others), log scale")
        .y_desc("ratio to direct-rr")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()?;
    for (p, pts) in &points {
        let c = color(*p);
        chart
            .draw_series(LineSeries::new(
                pts.iter().map(|(x, s)| (*x, s.median)),
                c.stroke_width(2),
            ))?
            .label(p.name())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        chart.draw_series(
            pts.iter()
                .map(|(x, s)| ErrorBar::new_vertical(*x, s.min, s.median, s.max, c.filled(), 8)),
        )?;
        chart.draw_series(
            pts.iter()
                .map(|(x, s)| Circle::new((*x, s.median), 3, c.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
