//! `mesh top`: a live view of services and backends from the pinned maps, refreshed every
//! interval, like `top`. Plain ANSI (clear screen, home cursor); no terminal mode changes, so
//! Ctrl-C leaves the terminal as it was.

use std::{
    io::Write,
    path::Path,
    time::{Duration, Instant, SystemTime},
};

use humantime_serde::re::humantime;

use crate::{
    cli::views::{Sample, StatsView, display_name, fmt_rate, stats_view, write_table},
    datapath::Maps,
};

/// Moves the cursor home and clears the screen.
pub const CLEAR: &str = "\x1b[H\x1b[2J";

/// Runs until Ctrl-C, or for `iterations` refreshes when it is not 0.
pub fn run(bpffs: &Path, interval: Duration, iterations: u64) -> anyhow::Result<()> {
    // The maps are opened again for every sample, so the view follows an agent that is
    // restarted or set up again; only a first failure (wrong --bpffs) ends the command.
    let read = || -> anyhow::Result<Sample> { Sample::read(&Maps::open_pinned(bpffs)?) };
    let mut prev_at = Instant::now();
    let mut prev = read()?;
    let mut stdout = std::io::stdout();
    let waiting = format!(
        "{CLEAR}mesh top: first sample taken, rates in {}...\n",
        humantime::format_duration(interval)
    );
    stdout.write_all(waiting.as_bytes())?;
    stdout.flush()?;
    let mut deadline = prev_at;
    let mut frames = 0u64;
    loop {
        deadline += interval;
        let now = Instant::now();
        if deadline > now {
            std::thread::sleep(deadline - now);
        } else {
            // Fell behind (slow read, suspended process): restart the schedule from now.
            deadline = now;
        }
        let at = Instant::now();
        let clock = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
        let mut frame = Vec::new();
        match read() {
            Ok(sample) => {
                let view = stats_view(&prev, &sample, at - prev_at);
                render(&mut frame, &view, &clock, interval)?;
                prev = sample;
                prev_at = at;
            }
            Err(err) => {
                write!(frame, "{CLEAR}mesh top - {clock}\n\nerror: {err:#}\n")?;
            }
        }
        stdout.write_all(&frame)?;
        stdout.flush()?;
        frames += 1;
        if iterations != 0 && frames >= iterations {
            return Ok(());
        }
    }
}

/// One screen: header lines, then services with their backends indented below them.
pub fn render(
    out: &mut impl Write,
    view: &StatsView,
    clock: &str,
    interval: Duration,
) -> std::io::Result<()> {
    let backends = view.services.iter().flat_map(|s| &s.backends);
    let total_backends = backends.clone().count();
    let active = backends.clone().filter(|b| b.slots > 0).count();
    let conn_rate: f64 = backends.clone().map(|b| b.connections_per_sec).sum();
    let fail_rate: f64 = backends.map(|b| b.connect_failures_per_sec).sum();
    let no_backend_rate: f64 = view.services.iter().map(|s| s.no_backend_per_sec).sum();
    write!(out, "{CLEAR}")?;
    writeln!(
        out,
        "mesh top - {clock}  every {}  services: {}  backends: {total_backends} ({active} active)  \
         conn/s: {}  fail/s: {}  no-backend/s: {}",
        humantime::format_duration(interval),
        view.services.len(),
        fmt_rate(conn_rate),
        fmt_rate(fail_rate),
        fmt_rate(no_backend_rate),
    )?;
    let d = &view.datapath;
    writeln!(
        out,
        "datapath/s: rev_created {}  rev_released {}  udp_flows_added {}  udp_flows_full {}",
        fmt_rate(d.rev_created_per_sec),
        fmt_rate(d.rev_released_per_sec),
        fmt_rate(d.udp_flows_added_per_sec),
        fmt_rate(d.udp_flows_full_per_sec),
    )?;
    writeln!(out)?;
    let mut rows = vec![
        [
            "SERVICE/BACKEND",
            "VIP",
            "STATE",
            "SLOTS",
            "CONN/S",
            "FAIL/S",
            "NO_BACKEND/S",
            "CONNECTIONS",
            "FAILURES",
        ]
        .map(String::from),
    ];
    for svc in &view.services {
        let active = svc.backends.iter().filter(|b| b.slots > 0).count();
        rows.push([
            display_name(&svc.name),
            format!("{}/{}", svc.vip, svc.protocol),
            format!("{active}/{} active", svc.backends.len()),
            svc.slot_count.to_string(),
            fmt_rate(svc.backends.iter().map(|b| b.connections_per_sec).sum()),
            fmt_rate(
                svc.backends
                    .iter()
                    .map(|b| b.connect_failures_per_sec)
                    .sum(),
            ),
            fmt_rate(svc.no_backend_per_sec),
            svc.backends
                .iter()
                .map(|b| b.connections)
                .sum::<u64>()
                .to_string(),
            svc.backends
                .iter()
                .map(|b| b.connect_failures)
                .sum::<u64>()
                .to_string(),
        ]);
        for b in &svc.backends {
            rows.push([
                format!("  {}", b.addr),
                String::new(),
                b.state.to_string(),
                b.slots.to_string(),
                fmt_rate(b.connections_per_sec),
                fmt_rate(b.connect_failures_per_sec),
                String::new(),
                b.connections.to_string(),
                b.connect_failures.to_string(),
            ]);
        }
    }
    write_table(out, &rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::views::tests::{fixture_after, fixture_before};

    #[test]
    fn top_frame_clears_the_screen_and_aligns_services_and_backends() {
        let view = stats_view(&fixture_before(), &fixture_after(), Duration::from_secs(2));
        let mut out = Vec::new();
        render(
            &mut out,
            &view,
            "2025-01-02T03:04:05Z",
            Duration::from_secs(1),
        )
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with(CLEAR), "{text:?}");
        let expected = "\
mesh top - 2025-01-02T03:04:05Z  every 1s  services: 2  backends: 3 (2 active)  conn/s: 6.0  fail/s: 0.5  no-backend/s: 2.5
datapath/s: rev_created 5.0  rev_released 4.0  udp_flows_added 0.0  udp_flows_full 0.0

SERVICE/BACKEND   VIP                 STATE       SLOTS  CONN/S  FAIL/S  NO_BACKEND/S  CONNECTIONS  FAILURES
dns               127.100.9.2:53/udp  0/0 active  0      0.0     0.0     2.5           0            0
web               127.100.9.1:80/tcp  2/3 active  3      6.0     0.5     0.0           116          3
  127.0.0.1:8081                      active      2      5.0     0.5                   90           2
  127.0.0.1:8082                      active      1      1.0     0.0                   20           0
  127.0.0.1:8083                      inactive    0      0.0     0.0                   6            1
";
        assert_eq!(&text[CLEAR.len()..], expected);
    }

    #[test]
    fn top_frame_of_an_empty_node() {
        let view = stats_view(
            &Sample::default(),
            &Sample::default(),
            Duration::from_secs(1),
        );
        let mut out = Vec::new();
        render(&mut out, &view, "t", Duration::from_millis(500)).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("every 500ms  services: 0  backends: 0 (0 active)  conn/s: 0.0"));
        assert!(text.trim_end().ends_with("FAILURES"));
    }
}
