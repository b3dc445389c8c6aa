//! Medians, spreads and ratios of the runs; the printed tables; the targets.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::control::{ChangeResults, ControlResults};
use super::dataplane::{Case, MAIN_PATHS, PathKind, Run, SCALED_PATHS};

/// Median and min-max over rounds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

pub fn spread(values: &[f64]) -> Option<Spread> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Spread {
        median,
        min: v[0],
        max: v[n - 1],
        n,
    })
}

/// Nearest-rank percentile.
pub fn percentile(values: &[f64], q: f64) -> Option<f64> {
    let mut v = values.to_vec();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    Some(v[rank - 1])
}

/// A number taken from one run.
#[derive(Clone, Copy)]
pub struct Metric {
    pub key: &'static str,
    pub get: fn(&Run) -> Option<f64>,
}

pub const CONN_RATE: Metric = Metric {
    key: "conns_per_sec",
    get: |r| Some(r.crr.conns_per_sec),
};
pub const LAT_P50: Metric = Metric {
    key: "conn_latency_p50_us",
    get: |r| Some(r.crr.latency_us.p50),
};
pub const LAT_P99: Metric = Metric {
    key: "conn_latency_p99_us",
    get: |r| Some(r.crr.latency_us.p99),
};
pub const LAT_P999: Metric = Metric {
    key: "conn_latency_p999_us",
    get: |r| Some(r.crr.latency_us.p999),
};
pub const CONNECT_P99: Metric = Metric {
    key: "connect_call_p99_us",
    get: |r| Some(r.crr.connect_us.p99),
};
pub const CPU_PER_CONN: Metric = Metric {
    key: "cpu_us_per_conn",
    get: |r| {
        let secs = r.crr.cpu.busy_ticks as f64 / r.crr.cpu.ticks_per_sec.max(1) as f64;
        (r.crr.conns > 0).then(|| secs * 1e6 / r.crr.conns as f64)
    },
};
pub const RR_P50: Metric = Metric {
    key: "rr_p50_us",
    get: |r| r.rr.as_ref().map(|x| x.latency_us.p50),
};
pub const RR_P99: Metric = Metric {
    key: "rr_p99_us",
    get: |r| r.rr.as_ref().map(|x| x.latency_us.p99),
};
pub const BULK1: Metric = Metric {
    key: "bulk_1conn_gbytes_per_sec",
    get: |r| r.bulk_1conn.as_ref().map(|x| x.gbytes_per_sec),
};
pub const BULK4: Metric = Metric {
    key: "bulk_4conn_gbytes_per_sec",
    get: |r| r.bulk_4conn.as_ref().map(|x| x.gbytes_per_sec),
};

pub const METRICS: [Metric; 10] = [
    CONN_RATE,
    LAT_P50,
    LAT_P99,
    LAT_P999,
    CONNECT_P99,
    CPU_PER_CONN,
    RR_P50,
    RR_P99,
    BULK1,
    BULK4,
];

const DIRECT: Case = Case {
    path: PathKind::DirectRr,
    others: 0,
};

fn find(runs: &[Run], case: Case, round: usize) -> Option<&Run> {
    runs.iter()
        .find(|r| r.round == round && r.path == case.path && r.others == case.others)
}

fn values(runs: &[Run], case: Case, m: Metric) -> Vec<f64> {
    runs.iter()
        .filter(|r| r.path == case.path && r.others == case.others)
        .filter_map(m.get)
        .collect()
}

/// a / b per round (both measured in the same round), then median and spread.
pub fn ratio(runs: &[Run], a: Case, b: Case, m: Metric) -> Option<Spread> {
    let rounds = runs.iter().map(|r| r.round).max().map_or(0, |r| r + 1);
    let ratios: Vec<f64> = (0..rounds)
        .filter_map(|round| {
            let x = (m.get)(find(runs, a, round)?)?;
            let y = (m.get)(find(runs, b, round)?)?;
            (y > 0.0).then(|| x / y)
        })
        .collect();
    spread(&ratios)
}

#[derive(Debug, Clone, Serialize)]
pub struct CaseSummary {
    pub label: String,
    pub path: PathKind,
    pub others: usize,
    /// Per metric, median and min-max over rounds.
    pub metrics: BTreeMap<&'static str, Spread>,
    /// Per-round ratios to direct-rr (same round), median and min-max.
    pub vs_direct_rr: BTreeMap<&'static str, Spread>,
}

pub fn summarize(runs: &[Run], cases: &[Case]) -> Vec<CaseSummary> {
    cases
        .iter()
        .map(|&case| {
            let metrics = METRICS
                .iter()
                .filter_map(|m| Some((m.key, spread(&values(runs, case, *m))?)))
                .collect();
            let vs_direct_rr = [CONN_RATE, LAT_P99, CPU_PER_CONN, BULK1, BULK4]
                .iter()
                .filter_map(|m| Some((m.key, ratio(runs, case, DIRECT, *m)?)))
                .collect();
            CaseSummary {
                label: case.label(),
                path: case.path,
                others: case.others,
                metrics,
                vs_direct_rr,
            }
        })
        .collect()
}

#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub name: String,
    pub goal: String,
    pub measured: String,
    /// None: not measured.
    pub met: Option<bool>,
}

fn fmt_spread_x(s: &Spread) -> String {
    format!("{:.2}x [{:.2}-{:.2}]", s.median, s.min, s.max)
}

fn ratio_target(name: &str, goal: f64, at_least: bool, s: Option<Spread>) -> Target {
    let sign = if at_least { ">=" } else { "<=" };
    Target {
        name: name.to_owned(),
        goal: format!("{sign} {goal:.2}x"),
        measured: s
            .as_ref()
            .map_or_else(|| "not measured".to_owned(), fmt_spread_x),
        met: s.map(|s| {
            if at_least {
                s.median >= goal
            } else {
                s.median <= goal
            }
        }),
    }
}

fn change_p99(c: &Option<ChangeResults>) -> Option<(f64, usize, usize)> {
    let c = c.as_ref()?;
    Some((
        percentile(&c.latency_ms, 0.99)?,
        c.latency_ms.len(),
        c.missed,
    ))
}

pub fn targets(runs: &[Run], control: &ControlResults, levels: &[usize]) -> Vec<Target> {
    let case = |path, others| Case { path, others };
    let mesh = case(PathKind::Mesh, 0);
    let mut t = vec![
        ratio_target(
            "conn/s vs direct-rr",
            0.97,
            true,
            ratio(runs, mesh, DIRECT, CONN_RATE),
        ),
        ratio_target(
            "conn/s vs HAProxy",
            2.2,
            true,
            ratio(runs, mesh, case(PathKind::Haproxy, 0), CONN_RATE),
        ),
        ratio_target(
            "conn/s vs iptables, 1 service",
            1.15,
            true,
            ratio(runs, mesh, case(PathKind::Iptables, 0), CONN_RATE),
        ),
        ratio_target(
            "conn/s vs nftables, 1 service",
            1.15,
            true,
            ratio(runs, mesh, case(PathKind::Nftables, 0), CONN_RATE),
        ),
    ];
    let top = levels.iter().copied().max().unwrap_or(0);
    t.push(ratio_target(
        &format!("conn/s vs iptables, {top} other services"),
        3.5,
        true,
        ratio(
            runs,
            case(PathKind::Mesh, top),
            case(PathKind::Iptables, top),
            CONN_RATE,
        ),
    ));
    t.push(ratio_target(
        "throughput, 1 connection, vs direct-rr",
        0.98,
        true,
        ratio(runs, mesh, DIRECT, BULK1),
    ));
    t.push(ratio_target(
        "throughput, 4 connections, vs direct-rr",
        0.98,
        true,
        ratio(runs, mesh, DIRECT, BULK4),
    ));
    t.push(ratio_target(
        "p99 connection latency vs direct-rr",
        1.10,
        false,
        ratio(runs, mesh, DIRECT, LAT_P99),
    ));
    let low = levels.iter().copied().min().unwrap_or(0);
    let mut growth = ratio_target(
        &format!("no growth: conn/s with {top} vs {low} other services"),
        0.95,
        true,
        ratio(
            runs,
            case(PathKind::Mesh, top),
            case(PathKind::Mesh, low),
            CONN_RATE,
        ),
    );
    growth.goal.push_str(" (within the noise)");
    t.push(growth);
    t.extend(control_targets(control));
    t
}

/// The control plane's targets (also all `--control` reports).
pub fn control_targets(control: &ControlResults) -> Vec<Target> {
    let mut t = Vec::new();
    let ready: Vec<f64> = control
        .cold
        .iter()
        .filter(|c| c.services == 10_000)
        .map(|c| c.ready_secs)
        .collect();
    let ready = spread(&ready);
    let failed = control
        .cold_failures
        .iter()
        .filter(|f| f.services == 10_000)
        .count();
    let failures = if failed > 0 {
        format!("; {failed} start(s) FAILED")
    } else {
        String::new()
    };
    t.push(Target {
        name: "10k services programmed (cold start to ready)".into(),
        goal: "< 1 s, every start".into(),
        measured: ready.map_or_else(
            || format!("not measured{failures}"),
            |s| format!("{:.3} s [{:.3}-{:.3}]{failures}", s.median, s.min, s.max),
        ),
        met: ready.map(|s| s.median < 1.0 && failed == 0),
    });
    for (label, change) in [
        ("1 service", &control.change_small),
        ("10k other services", &control.change_10k),
    ] {
        let p99 = change_p99(change);
        t.push(Target {
            name: format!("config edit to data path p99 ({label})"),
            goal: "< 50 ms".into(),
            measured: p99.map_or_else(
                || "not measured".into(),
                |(p, n, missed)| format!("{p:.1} ms over {n} changes ({missed} missed)"),
            ),
            met: p99.map(|(p, _, missed)| p < 50.0 && missed == 0),
        });
    }
    let idle = control.idle_10k.as_ref().and_then(|u| u.rss_kib);
    let scraped = control
        .cold
        .iter()
        .filter(|c| c.services == 10_000)
        .filter_map(|c| c.rss_after_scrape_kib)
        .max();
    t.push(Target {
        name: "agent RSS at 10k services (idle; after one /metrics scrape)".into(),
        goal: "< 100 MB".into(),
        measured: match idle {
            None => "not measured".into(),
            Some(_) => format!("{}; {}", fmt_mb(idle), fmt_mb(scraped)),
        },
        met: idle.map(|k| {
            let worst = scraped.unwrap_or(k).max(k);
            (worst as f64 * 1024.0) < 100e6
        }),
    });
    t
}

fn fmt_mb(kib: Option<u64>) -> String {
    kib.map_or_else(
        || "-".to_owned(),
        |k| format!("{:.1} MB", k as f64 * 1024.0 / 1e6),
    )
}

fn thousands(x: f64) -> String {
    let n = x.round() as i64;
    let s = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

fn cell(s: Option<&Spread>, digits: usize) -> String {
    s.map_or_else(
        || "-".to_owned(),
        |s| {
            if s.n > 1 {
                format!("{:.d$} [{:.d$}-{:.d$}]", s.median, s.min, s.max, d = digits)
            } else {
                format!("{:.d$}", s.median, d = digits)
            }
        },
    )
}

pub fn rate_cell(s: Option<&Spread>) -> String {
    s.map_or_else(
        || "-".to_owned(),
        |s| {
            if s.n > 1 {
                format!(
                    "{} [{}-{}]",
                    thousands(s.median),
                    thousands(s.min),
                    thousands(s.max)
                )
            } else {
                thousands(s.median)
            }
        },
    )
}

pub fn ratio_cell(s: Option<&Spread>) -> String {
    s.map_or_else(
        || "-".to_owned(),
        |s| {
            if s.n > 1 {
                fmt_spread_x(s)
            } else {
                format!("{:.2}x", s.median)
            }
        },
    )
}

/// The report as Markdown (printed, and saved next to results.json).
pub fn markdown(
    summaries: &[CaseSummary],
    runs: &[Run],
    control: &ControlResults,
    targets: &[Target],
    levels: &[usize],
) -> String {
    let mut out = String::new();
    let get = |path: PathKind, others: usize| {
        summaries
            .iter()
            .find(|s| s.path == path && s.others == others)
    };

    out.push_str(
        "### Data path (median [min-max] over rounds; ratios are per-round, then median)\n\n",
    );
    out.push_str("| path | conn/s | vs direct-rr | conn latency p50 / p99 / p99.9 (us) | connect() p99 (us) | CPU us/conn | RR p50 / p99 (us) | bulk 1 conn (GB/s) | bulk 4 conn (GB/s) |\n");
    out.push_str("| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
    for path in MAIN_PATHS {
        let Some(s) = get(path, 0) else { continue };
        let m = |k: &str| s.metrics.get(k);
        let med = |k: &str| m(k).map_or_else(|| "-".to_owned(), |s| format!("{:.0}", s.median));
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} / {} / {} | {} | {} | {} / {} | {} | {} |",
            s.label,
            rate_cell(m(CONN_RATE.key)),
            ratio_cell(s.vs_direct_rr.get(CONN_RATE.key)),
            med(LAT_P50.key),
            med(LAT_P99.key),
            med(LAT_P999.key),
            med(CONNECT_P99.key),
            cell(m(CPU_PER_CONN.key), 1),
            m(RR_P50.key).map_or_else(|| "-".to_owned(), |s| format!("{:.1}", s.median)),
            m(RR_P99.key).map_or_else(|| "-".to_owned(), |s| format!("{:.1}", s.median)),
            cell(m(BULK1.key), 2),
            cell(m(BULK4.key), 2),
        );
    }

    out.push_str("\n### mesh vs each baseline (conn/s, per-round ratio)\n\n");
    out.push_str("| mesh vs | 1 service | ");
    let others_levels: Vec<usize> = levels.to_vec();
    for l in &others_levels {
        let _ = write!(out, "+{l} services | ");
    }
    out.push_str("\n| --- | --- |");
    for _ in &others_levels {
        out.push_str(" --- |");
    }
    out.push('\n');
    for base in [
        PathKind::DirectRr,
        PathKind::Direct1,
        PathKind::Iptables,
        PathKind::Nftables,
        PathKind::Haproxy,
    ] {
        let one = ratio(
            runs,
            Case {
                path: PathKind::Mesh,
                others: 0,
            },
            Case {
                path: base,
                others: 0,
            },
            CONN_RATE,
        );
        let _ = write!(out, "| {} | {} |", base.name(), ratio_cell(one.as_ref()));
        for &l in &others_levels {
            let r = SCALED_PATHS.contains(&base).then(|| {
                ratio(
                    runs,
                    Case {
                        path: PathKind::Mesh,
                        others: l,
                    },
                    Case {
                        path: base,
                        others: l,
                    },
                    CONN_RATE,
                )
            });
            let _ = write!(out, " {} |", ratio_cell(r.flatten().as_ref()));
        }
        out.push('\n');
    }

    out.push_str(
        "\n### Scaling: conn/s with other services configured (vs direct-rr in the same round)\n\n",
    );
    out.push_str("| path | 1 service |");
    for l in &others_levels {
        let _ = write!(out, " +{l} |");
    }
    out.push_str("\n| --- | --- |");
    for _ in &others_levels {
        out.push_str(" --- |");
    }
    out.push('\n');
    for path in SCALED_PATHS {
        let _ = write!(out, "| {} |", path.name());
        for l in std::iter::once(0).chain(others_levels.iter().copied()) {
            let c = get(path, l).map_or_else(
                || "-".to_owned(),
                |s| {
                    format!(
                        "{} ({})",
                        s.metrics
                            .get(CONN_RATE.key)
                            .map_or_else(|| "-".to_owned(), |m| thousands(m.median)),
                        ratio_cell(s.vs_direct_rr.get(CONN_RATE.key))
                    )
                },
            );
            let _ = write!(out, " {c} |");
        }
        out.push('\n');
    }

    let agent_cpu: Vec<String> = std::iter::once(0)
        .chain(others_levels.iter().copied())
        .filter_map(|l| {
            let v: Vec<f64> = runs
                .iter()
                .filter(|r| r.path == PathKind::Mesh && r.others == l)
                .filter_map(|r| r.agent_cpu_percent)
                .collect();
            Some(format!("+{l}: {:.1}%", spread(&v)?.median))
        })
        .collect();
    let _ = writeln!(
        out,
        "\nmesh agent CPU during the mesh runs (median, % of one core): {}",
        agent_cpu.join(", ")
    );

    out.push_str(&control_markdown(control));
    out.push_str(&targets_markdown(targets));
    out
}

/// The targets table.
pub fn targets_markdown(targets: &[Target]) -> String {
    let mut out = String::from(
        "\n### Targets\n\n| target | goal | measured | met |\n| --- | --- | --- | --- |\n",
    );
    for t in targets {
        let met = match t.met {
            Some(true) => "met",
            Some(false) => "NOT met",
            None => "not measured",
        };
        let _ = writeln!(out, "| {} | {} | {} | {met} |", t.name, t.goal, t.measured);
    }
    out
}

/// The control plane's section of the report (all of `--control`'s).
pub fn control_markdown(control: &ControlResults) -> String {
    let mut out = String::new();
    out.push_str("\n### Control plane\n\n| measurement | result |\n| --- | --- |\n");
    let mut sizes: Vec<usize> = control.cold.iter().map(|c| c.services).collect();
    sizes.dedup();
    for size in sizes {
        let runs: Vec<_> = control.cold.iter().filter(|c| c.services == size).collect();
        let ready = spread(&runs.iter().map(|c| c.ready_secs).collect::<Vec<_>>());
        let rec = spread(
            &runs
                .iter()
                .filter_map(|c| c.reconcile_secs)
                .collect::<Vec<_>>(),
        );
        let listed = runs.iter().all(|c| c.listed_all);
        let rss = runs.iter().filter_map(|c| c.rss_kib).max();
        let rss_scraped = runs.iter().filter_map(|c| c.rss_after_scrape_kib).max();
        let scrape = spread(
            &runs
                .iter()
                .filter_map(|c| c.scrape_secs)
                .collect::<Vec<_>>(),
        );
        let scrape_mb = runs
            .iter()
            .filter_map(|c| c.scrape_bytes)
            .max()
            .map_or(f64::NAN, |b| b as f64 / 1e6);
        let _ = writeln!(
            out,
            "| cold start, {size} services x 4 backends: start to ready | {} s (reconcile {} s; `mesh services` listed all: {}; RSS {} at ready, {} after one /metrics scrape of {scrape_mb:.1} MB taking {} s) |",
            cell(ready.as_ref(), 3),
            cell(rec.as_ref(), 3),
            if listed { "yes" } else { "NO" },
            fmt_mb(rss),
            fmt_mb(rss_scraped),
            cell(scrape.as_ref(), 2),
        );
    }
    for f in &control.cold_failures {
        let _ = writeln!(
            out,
            "| cold start, {} services: attempt {} FAILED | {} |",
            f.services,
            f.attempt,
            f.error.replace('|', "/")
        );
    }
    if let Some(d) = &control.diff {
        let _ = writeln!(
            out,
            "| diff: +{} services on {} (edit to first connection through a new service) | {} s |",
            d.added,
            d.base_services,
            cell(spread(&d.add_to_data_path_secs).as_ref(), 3)
        );
        let _ = writeln!(
            out,
            "| diff: +{} services, edit to `mesh services` listing all (includes the CLI's run time) | {} s |",
            d.added,
            cell(spread(&d.add_to_listed_secs).as_ref(), 3)
        );
        let _ = writeln!(
            out,
            "| diff: -{} services, edit to removed VIP no longer translated | {} s |",
            d.added,
            cell(spread(&d.remove_to_data_path_secs).as_ref(), 3)
        );
        for f in &d.failures {
            let _ = writeln!(
                out,
                "| diff: +{} services FAILED | {} |",
                d.added,
                f.replace('|', "/")
            );
        }
    }
    for c in [
        &control.change_small,
        &control.change_10k,
        &control.change_10k_stress,
    ]
    .into_iter()
    .flatten()
    {
        let _ = writeln!(
            out,
            "| config edit to data path, {} other services ({} changes{}) | p50 {} ms, p99 {} ms, max {} ms; missed {}; with failed connects {} |",
            c.others,
            c.latency_ms.len(),
            c.resync_ms
                .map_or_else(String::new, |ms| format!(", agent resync every {ms} ms")),
            percentile(&c.latency_ms, 0.5).map_or_else(|| "-".into(), |v| format!("{v:.1}")),
            percentile(&c.latency_ms, 0.99).map_or_else(|| "-".into(), |v| format!("{v:.1}")),
            percentile(&c.latency_ms, 1.0).map_or_else(|| "-".into(), |v| format!("{v:.1}")),
            c.missed,
            c.with_failed_connects
        );
    }
    if let Some(u) = &control.idle_10k {
        let _ = writeln!(
            out,
            "| agent at 10k services, idle ({:.0} s, before any /metrics scrape) | RSS {}, CPU {}% of a core |",
            u.window_secs,
            fmt_mb(u.rss_kib),
            u.cpu_percent
                .map_or_else(|| "-".into(), |c| format!("{c:.2}"))
        );
    }
    let h = &control.health;
    if h.config_accepted.is_none() {
        // Not tried (`--control`): no health rows.
        return out;
    }
    match &h.usage_with_checks {
        Some(u) => {
            let _ = writeln!(
                out,
                "| agent at 10k services with tcp checks (defaults, 40k refusing backends) | RSS {}, CPU {}% of a core |",
                fmt_mb(u.rss_kib),
                u.cpu_percent
                    .map_or_else(|| "-".into(), |c| format!("{c:.1}"))
            );
        }
        None => out.push_str("| agent at 10k services with tcp checks | not measured |\n"),
    }
    match &h.usage_shared_1k {
        Some(u) => {
            let _ = writeln!(
                out,
                "| agent at 10k services over 1k distinct refusing backends, tcp checks every 1 s | RSS {}, CPU {}% of a core |",
                fmt_mb(u.rss_kib),
                u.cpu_percent
                    .map_or_else(|| "-".into(), |c| format!("{c:.1}"))
            );
        }
        None => out.push_str(
            "| agent at 10k services over 1k backends with tcp checks | not measured |\n",
        ),
    }
    let _ = writeln!(
        out,
        "| time to ejection of a killed backend ({}) | {} |",
        h.ejection_settings,
        h.ejection_secs.map_or_else(
            || format!("not measured: {}", h.note),
            |s| format!("{:.3} s", s)
        )
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_takes_the_middle_and_the_ends() {
        let s = spread(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        assert_eq!(spread(&[1.0, 2.0, 3.0, 10.0]).unwrap().median, 2.5);
        assert!(spread(&[]).is_none());
        assert!(spread(&[f64::NAN]).is_none());
    }

    #[test]
    fn percentile_is_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), Some(50.0));
        assert_eq!(percentile(&v, 0.99), Some(99.0));
        assert_eq!(percentile(&v, 1.0), Some(100.0));
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(1234567.4), "1,234,567");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(-1000.0), "-1,000");
    }
}
