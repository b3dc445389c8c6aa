//! Command helpers, paths and /proc/mounts parsing shared by the tasks.

use std::borrow::Cow;
use std::ffi::{OsStr, OsString};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use anyhow::{Context as _, Result, bail};

use crate::signal;

/// The workspace root: the parent of xtask's manifest directory.
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
}

/// `$CARGO_TARGET_DIR` (made absolute against the current directory) if set, else
/// `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => absolute(Path::new(&dir)),
        None => workspace_root().join("target"),
    }
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Directories where `cargo install` puts binaries: `$CARGO_HOME/bin` and `~/.cargo/bin`.
pub fn cargo_bin_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(home) = std::env::var_os("CARGO_HOME").filter(|h| !h.is_empty()) {
        dirs.push(PathBuf::from(home).join("bin"));
    }
    if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        let dir = PathBuf::from(home).join(".cargo").join("bin");
        if !dirs.contains(&dir) {
            dirs.push(dir);
        }
    }
    dirs
}

/// `$PATH` with the cargo bin directories in front (those not already in it).
pub fn child_path() -> &'static OsStr {
    static PATH: OnceLock<OsString> = OnceLock::new();
    PATH.get_or_init(|| {
        let current: Vec<PathBuf> = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect())
            .unwrap_or_default();
        let missing = cargo_bin_dirs()
            .into_iter()
            .filter(|d| !current.contains(d));
        std::env::join_paths(missing.chain(current.iter().cloned()))
            .unwrap_or_else(|_| std::env::var_os("PATH").unwrap_or_default())
    })
}

/// `dirs` in front of [`child_path`].
pub fn path_with(dirs: &[&Path]) -> OsString {
    let rest = std::env::split_paths(child_path());
    let dirs = dirs.iter().map(|d| d.to_path_buf());
    std::env::join_paths(dirs.chain(rest)).unwrap_or_else(|_| child_path().to_os_string())
}

/// A command whose `PATH` includes `~/.cargo/bin`. Run it with [`Run::run`], which prints it
/// and errors with its exit status.
pub fn cmd<I, S>(program: impl AsRef<OsStr>, args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut command = Command::new(program);
    command.args(args).env("PATH", child_path());
    command
}

/// `cargo ARGS` in the workspace root, honouring `CARGO_TARGET_DIR`.
pub fn cargo<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut command = cmd("cargo", args);
    command.current_dir(workspace_root());
    if std::env::var_os("CARGO_TARGET_DIR").is_some_and(|d| !d.is_empty()) {
        command.env("CARGO_TARGET_DIR", target_dir());
    }
    command
}

pub trait Run {
    /// Prints the command, runs it in the foreground (signals to xtask are forwarded to it) and
    /// errors unless it exits with status 0.
    fn run(&mut self) -> Result<()>;
    /// Runs the command quietly, capturing its output; `None` if it cannot start or fails.
    fn stdout_if_ok(&mut self) -> Option<String>;
    /// Like `run`, for `cargo test`: its output passes through unchanged, and the counts of
    /// its `test result:` lines are added to `totals`.
    fn run_tests(&mut self, totals: &mut TestTotals) -> Result<()>;
}

/// Tests counted over every `cargo test` run of `xtask test`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TestTotals {
    pub passed: u64,
    pub failed: u64,
    /// `#[ignore]`d tests.
    pub ignored: u64,
    /// Tests a name filter left out (`cargo xtask test -- <filter>`).
    pub filtered_out: u64,
}

impl TestTotals {
    /// Adds the counts of one libtest summary line
    /// (`test result: ok. 5 passed; 0 failed; 1 ignored; 0 measured; 3 filtered out; finished
    /// in 0.01s`); any other line is ignored.
    pub fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        // `ok. 5 passed` / `FAILED. 3 passed`: the status word ends with a period.
        let rest = rest.split_once(". ").map_or(rest, |(_, counts)| counts);
        for part in rest.split(';') {
            let mut words = part.split_whitespace();
            let Some(Ok(count)) = words.next().map(str::parse::<u64>) else {
                continue; // `finished in 1.53s`
            };
            let kind: Vec<&str> = words.collect();
            match kind.as_slice() {
                ["passed"] => self.passed += count,
                ["failed"] => self.failed += count,
                ["ignored"] => self.ignored += count,
                ["filtered", "out"] => self.filtered_out += count,
                _ => {}
            }
        }
    }

    pub fn add(&mut self, other: TestTotals) {
        self.passed += other.passed;
        self.failed += other.failed;
        self.ignored += other.ignored;
        self.filtered_out += other.filtered_out;
    }

    /// Tests that did not run: ignored ones and those a filter left out.
    pub fn skipped(&self) -> u64 {
        self.ignored + self.filtered_out
    }

    /// The two closing lines of `xtask test`: what `skipped` is made of, then the line CI reads
    /// (`N passed, N failed, N skipped`; keep its form).
    pub fn closing_lines(&self) -> [String; 2] {
        [
            format!(
                "skipped: {} ignored, {} filtered out",
                self.ignored, self.filtered_out
            ),
            format!(
                "tests: {} passed, {} failed, {} skipped",
                self.passed,
                self.failed,
                self.skipped()
            ),
        ]
    }
}

impl Run for Command {
    fn run(&mut self) -> Result<()> {
        let shown = display(self);
        println!("$ {shown}");
        signal::check()?;
        let mut child = self
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start `{shown}`"))?;
        let status = signal::wait_foreground(&mut child)
            .with_context(|| format!("waiting for `{shown}`"))?;
        signal::check()?;
        if !status.success() {
            bail!("`{shown}` failed: {status}");
        }
        Ok(())
    }

    fn run_tests(&mut self, totals: &mut TestTotals) -> Result<()> {
        use std::io::{BufRead as _, Write as _};
        let shown = display(self);
        println!("$ {shown}");
        signal::check()?;
        let mut child = self
            .stdout(Stdio::piped())
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start `{shown}`"))?;
        let stdout = child.stdout.take().context("test output")?;
        let reader = std::thread::spawn(move || {
            let mut counted = TestTotals::default();
            let mut out = std::io::stdout();
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                counted.add_line(&line);
                let _ = writeln!(out, "{line}");
            }
            counted
        });
        let status = signal::wait_foreground(&mut child)
            .with_context(|| format!("waiting for `{shown}`"))?;
        totals.add(reader.join().unwrap_or_default());
        signal::check()?;
        if !status.success() {
            bail!("`{shown}` failed: {status}");
        }
        Ok(())
    }

    fn stdout_if_ok(&mut self) -> Option<String> {
        let output = self
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()?;
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

/// The command as a shell line: explicitly set variables (except PATH), program, arguments.
pub fn display(command: &Command) -> String {
    let envs = command
        .get_envs()
        .filter(|(key, _)| *key != "PATH" && *key != "CARGO_TARGET_DIR")
        .filter_map(|(key, value)| {
            Some(format!(
                "{}={}",
                key.to_string_lossy(),
                quote(&value?.to_string_lossy())
            ))
        });
    let words = std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|w| quote(&w.to_string_lossy()).into_owned());
    envs.chain(words).collect::<Vec<_>>().join(" ")
}

fn quote(word: &str) -> Cow<'_, str> {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        Cow::Borrowed(word)
    } else {
        Cow::Owned(format!("'{}'", word.replace('\'', r"'\''")))
    }
}

/// One line of /proc/mounts.
pub struct Mount {
    pub target: PathBuf,
    pub fstype: String,
}

pub fn mounts() -> Result<Vec<Mount>> {
    let text = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    Ok(parse_mounts(&text))
}

fn parse_mounts(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_ascii_whitespace();
            let _source = fields.next()?;
            let target = unescape_mount_field(fields.next()?);
            let fstype = fields.next()?.to_owned();
            Some(Mount {
                target: PathBuf::from(target),
                fstype,
            })
        })
        .collect()
}

/// /proc/mounts writes space, tab, newline and backslash as `\ooo` octal escapes.
fn unescape_mount_field(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match escape {
            Some(d) => {
                out.push(
                    d.iter()
                        .fold(0u8, |acc, b| acc.wrapping_mul(8) + (b - b'0')),
                );
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Where cgroup v2 is mounted (the first cgroup2 mount in /proc/mounts).
pub fn cgroup2_mount() -> Result<PathBuf> {
    mounts()?
        .into_iter()
        .find(|m| m.fstype == "cgroup2")
        .map(|m| m.target)
        .context("cgroup v2 is not mounted (no cgroup2 entry in /proc/mounts); mount it, e.g. `mount -t cgroup2 none /sys/fs/cgroup/unified`")
}

pub fn is_root() -> bool {
    // SAFETY: geteuid(2) cannot fail and has no side effects.
    unsafe { libc::geteuid() == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mounts_with_escapes() {
        let text = "bpf /sys/fs/bpf bpf rw 0 0\n\
                    cgroup2 /sys/fs/cgroup/un\\040ified cgroup2 rw,relatime 0 0\n";
        let mounts = parse_mounts(text);
        assert_eq!(mounts.len(), 2);
        assert_eq!(mounts[0].fstype, "bpf");
        assert_eq!(mounts[1].target, Path::new("/sys/fs/cgroup/un ified"));
        assert_eq!(mounts[1].fstype, "cgroup2");
    }

    #[test]
    fn displays_commands() {
        let mut c = cmd("redis-server", ["--save", "", "--port", "6390"]);
        c.env("DEBIAN_FRONTEND", "noninteractive");
        assert_eq!(
            display(&c),
            "DEBIAN_FRONTEND=noninteractive redis-server --save '' --port 6390"
        );
    }
}

#[cfg(test)]
mod test_totals {
    use super::TestTotals;

    #[test]
    fn libtest_summaries_are_summed() {
        let mut totals = TestTotals::default();
        totals.add_line("test result: ok. 146 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out; finished in 1.53s");
        totals.add_line(
            "test result: FAILED. 3 passed; 1 failed; 0 ignored; 0 measured; 7 filtered out",
        );
        // A binary whose every test the filter left out, and a doc-test run with no tests.
        totals.add_line(
            "test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 12 filtered out; finished in 0.00s",
        );
        totals.add_line("test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s");
        // Not summary lines: a test named like one, the run header, a test's own output.
        totals.add_line("test test_totals::test_result_5_passed ... ok");
        totals.add_line("running 9 tests");
        totals.add_line("summary: 9 passed; 9 failed");
        assert_eq!(
            totals,
            TestTotals {
                passed: 149,
                failed: 1,
                ignored: 2,
                filtered_out: 19,
            }
        );
        assert_eq!(totals.skipped(), 21);
    }

    #[test]
    fn closing_lines_break_skipped_down_and_keep_the_ci_form() {
        let totals = TestTotals {
            passed: 12,
            failed: 1,
            ignored: 2,
            filtered_out: 40,
        };
        let [breakdown, closing] = totals.closing_lines();
        assert_eq!(breakdown, "skipped: 2 ignored, 40 filtered out");
        // CI reads `N passed, N failed` with an optional `, N skipped`, one word with a colon
        // before it; the breakdown line must not look like that.
        assert_eq!(closing, "tests: 12 passed, 1 failed, 42 skipped");
        assert!(!breakdown.contains("passed"));
    }
}
