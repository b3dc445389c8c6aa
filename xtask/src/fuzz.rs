//! `cargo xtask fuzz --seconds N [--target NAME]`: builds the cargo-fuzz targets of `fuzz/`
//! (nightly, AddressSanitizer, debug assertions) and runs each for N seconds, one after the
//! other, from its committed seeds (`fuzz/corpus/<target>/`). What a run finds goes to a scratch
//! corpus under `fuzz/target/`, so the committed seeds change only by hand; a crash's input is
//! left in `fuzz/artifacts/<target>/` and fails the run.

use std::fs::File;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context as _, Result, bail};

use crate::setup;
use crate::util::{Run as _, cmd, workspace_root};

/// Every target, in the order they run (see `fuzz/fuzz_targets/`).
pub const TARGETS: &[&str] = &["config", "admin_api", "redis", "kubernetes", "sockdiag"];

/// Seconds per target in `cargo xtask test`: 5 targets x 12 s, about a minute of runs.
pub const TEST_SECONDS: u64 = 12;

/// The libFuzzer dictionary of a target (`fuzz/dict/`): the keys and keywords its parser knows,
/// which mutation alone finds slowly.
fn dictionary(target: &str) -> Option<&'static str> {
    match target {
        "config" => Some("config.dict"),
        "admin_api" | "redis" => Some("service.dict"),
        "kubernetes" => Some("kubernetes.dict"),
        _ => None,
    }
}

/// Inputs longer than this are not tried (the longest seed is ~3.3 kB).
const MAX_LEN: u32 = 8192;

/// What one run of a target did, from libFuzzer's final statistics.
struct Outcome {
    target: &'static str,
    executions: u64,
    seconds: f64,
    corpus: Option<u64>,
    log: PathBuf,
}

fn fuzz_dir() -> PathBuf {
    workspace_root().join("fuzz")
}

/// `cargo +nightly fuzz ARGS` in the workspace root. The eBPF object is not built for the fuzz
/// targets (they never load it): `AYA_BUILD_SKIP` leaves mesh-user's build script a no-op.
fn cargo_fuzz<I, S>(args: I) -> std::process::Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut command = cmd("cargo", ["+nightly", "fuzz"]);
    command
        .args(args)
        .current_dir(workspace_root())
        .env("AYA_BUILD_SKIP", "1")
        // The fuzz workspace has a target directory of its own (other flags, other toolchain).
        .env_remove("CARGO_TARGET_DIR");
    command
}

/// Runs the targets (`only`: one) for `seconds` each, or until `runs` executions if given.
pub fn run(seconds: u64, runs: Option<u64>, only: Option<&str>) -> Result<()> {
    if seconds == 0 {
        bail!("--seconds must be at least 1");
    }
    let targets: Vec<&'static str> = match only {
        Some(name) => vec![
            *TARGETS
                .iter()
                .find(|t| **t == name)
                .with_context(|| format!("no fuzz target {name:?}; the targets: {TARGETS:?}"))?,
        ],
        None => TARGETS.to_vec(),
    };
    setup::cargo_fuzz()?;
    let mut build = cargo_fuzz(["build"]);
    if let [one] = targets[..] {
        build.arg(one);
    }
    build.run().context("building the fuzz targets")?;
    let mut outcomes = Vec::new();
    for target in targets {
        let outcome = run_target(target, seconds, runs)?;
        println!(
            "fuzz: {target}: {} executions in {:.0} s ({:.0}/s), corpus {}, no crash",
            outcome.executions,
            outcome.seconds,
            outcome.executions as f64 / outcome.seconds.max(0.001),
            outcome
                .corpus
                .map_or_else(|| "?".to_owned(), |c| c.to_string()),
        );
        outcomes.push(outcome);
    }
    let limit = match runs {
        Some(runs) => format!("{runs} executions or {seconds} s"),
        None => format!("{seconds} s"),
    };
    println!("\nfuzz: {limit} per target, no crash:");
    for o in &outcomes {
        println!(
            "  {:<12} {:>12} executions  {:>6.0} s  (log: {})",
            o.target,
            o.executions,
            o.seconds,
            o.log.display()
        );
    }
    Ok(())
}

fn run_target(target: &'static str, seconds: u64, runs: Option<u64>) -> Result<Outcome> {
    let dir = fuzz_dir();
    let seeds = dir.join("corpus").join(target);
    let scratch = dir.join("target").join("corpus").join(target);
    let logs = dir.join("target").join("logs");
    for d in [&scratch, &logs] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let log = logs.join(format!("{target}.log"));
    let file = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    println!(
        "\nfuzz: {target} for {seconds} s (output: {})",
        log.display()
    );
    let start = Instant::now();
    // libFuzzer adds what it finds to the first corpus directory: the scratch one.
    let mut command = cargo_fuzz(["run", target]);
    command.arg(&scratch).arg(&seeds).arg("--");
    if let Some(dict) = dictionary(target) {
        command.arg(format!("-dict={}", dir.join("dict").join(dict).display()));
    }
    if let Some(runs) = runs {
        command.arg(format!("-runs={runs}"));
    }
    let result = command
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-max_len={MAX_LEN}"))
        .arg("-print_final_stats=1")
        // A single input that takes 10 s is a hang, a bug of its own.
        .arg("-timeout=10")
        .arg("-rss_limit_mb=2048")
        .stdin(std::process::Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .run();
    let elapsed = start.elapsed().as_secs_f64();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    if let Err(err) = result {
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        let artifact = artifact_of(&text)
            .map(|a| format!("\nthe input: {a} (replay: cargo +nightly fuzz run {target} {a})"))
            .unwrap_or_default();
        bail!(
            "fuzz target {target} failed after {elapsed:.0} s: {err}\n{}{artifact}\nfull output: {}",
            tail.join("\n"),
            log.display()
        );
    }
    let executions = stat(&text, "stat::number_of_executed_units")
        .with_context(|| format!("no execution count in {}", log.display()))?;
    Ok(Outcome {
        target,
        executions,
        seconds: elapsed,
        corpus: corpus_size(&text),
        log,
    })
}

/// `stat::NAME: VALUE` of libFuzzer's `-print_final_stats`.
fn stat(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
}

/// The corpus size of the last status line (`#123 DONE cov: 10 ft: 20 corp: 7/1234b ...`).
fn corpus_size(text: &str) -> Option<u64> {
    let line = text.lines().rev().find(|l| l.contains(" corp: "))?;
    let (_, rest) = line.split_once(" corp: ")?;
    rest.split('/').next()?.parse().ok()
}

/// Where libFuzzer wrote the crashing input (`Test unit written to PATH`).
fn artifact_of(text: &str) -> Option<&str> {
    text.lines()
        .find_map(|l| l.split_once("Test unit written to ").map(|(_, p)| p.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed seeds of a target.
    fn seeds(target: &str) -> Vec<PathBuf> {
        std::fs::read_dir(fuzz_dir().join("corpus").join(target))
            .map(|entries| entries.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    }

    const LOG: &str = "\
#65536\tpulse  cov: 1200 ft: 3000 corp: 150/20Kb lim: 400 exec/s: 21845 rss: 80Mb
#70000\tDONE   cov: 1210 ft: 3050 corp: 151/21Kb lim: 400 exec/s: 23333 rss: 81Mb
Done 70000 runs in 3 second(s)
stat::number_of_executed_units: 70000
stat::average_exec_per_sec:     23333
stat::new_units_added:          20
";

    #[test]
    fn final_stats_are_read() {
        assert_eq!(stat(LOG, "stat::number_of_executed_units"), Some(70000));
        assert_eq!(stat(LOG, "stat::average_exec_per_sec"), Some(23333));
        assert_eq!(stat(LOG, "stat::missing"), None);
        assert_eq!(corpus_size(LOG), Some(151));
    }

    #[test]
    fn the_crashing_input_is_found() {
        let log = "==1== ERROR: libFuzzer: deadly signal\n\
                   artifact_prefix='/w/fuzz/artifacts/config/'; Test unit written to \
                   /w/fuzz/artifacts/config/crash-da39a3ee\n";
        assert_eq!(
            artifact_of(log),
            Some("/w/fuzz/artifacts/config/crash-da39a3ee")
        );
        assert_eq!(artifact_of(LOG), None);
    }

    #[test]
    fn every_target_has_a_source_and_seeds() {
        for target in TARGETS {
            let source = fuzz_dir().join("fuzz_targets").join(format!("{target}.rs"));
            assert!(source.is_file(), "{} is missing", source.display());
            if let Some(dict) = dictionary(target) {
                let dict = fuzz_dir().join("dict").join(dict);
                assert!(dict.is_file(), "{} is missing", dict.display());
            }
            let seeds = seeds(target);
            assert!(!seeds.is_empty(), "no seeds for {target}");
            for seed in seeds {
                let len = std::fs::metadata(&seed).unwrap().len();
                assert!(
                    len <= u64::from(MAX_LEN),
                    "{} is {len} bytes",
                    seed.display()
                );
            }
        }
    }
}
