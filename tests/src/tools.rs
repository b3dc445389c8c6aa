//! The operator's tools, run as an operator would: `bpftool ... -j`, the `mesh` CLI, and a
//! command under a pseudo-terminal (`script` from util-linux) for full-screen views.

use std::ffi::OsStr;
use std::process::Command;
use std::time::Duration;

use crate::process::{Captured, run_bounded};

/// Runs `bpftool <args> -j` (bounded to 30 s) and parses its JSON. Panics with bpftool's output
/// if it fails or prints something else.
pub fn bpftool_json<I, S>(args: I) -> serde_json::Value
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new("bpftool");
    cmd.args(args).arg("-j");
    let out = run_bounded(&mut cmd, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (is bpftool installed?)"));
    assert!(out.status.success(), "{cmd:?} failed: {}", out.describe());
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("{cmd:?} printed invalid JSON ({e}): {}", out.stdout))
}

/// The BTF-formatted entries of a `bpftool map dump -j`: each entry's `formatted` object (with
/// `key` and `value`, or `values` per CPU), or the entry itself when bpftool printed no raw
/// bytes next to it.
///
/// An entry deleted between bpftool's get-next-key and its lookup comes out as the raw key with
/// `"value": {"error": ...}` and nothing formatted; it is no longer in the map, so it is left
/// out rather than read as a malformed entry.
pub fn formatted_entries(dump: &serde_json::Value) -> Vec<serde_json::Value> {
    dump.as_array()
        .unwrap_or_else(|| panic!("a map dump is a list, not {dump}"))
        .iter()
        .filter(|entry| !vanished_mid_dump(entry))
        .map(|entry| entry.get("formatted").unwrap_or(entry).clone())
        .collect()
}

fn vanished_mid_dump(entry: &serde_json::Value) -> bool {
    entry.get("formatted").is_none()
        && entry
            .get("value")
            .is_some_and(|value| value.get("error").is_some())
}

/// Runs `$MESH_BIN <args>` (bounded to 30 s) and captures its output.
pub fn mesh_cli<I, S>(args: I) -> Captured
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(crate::mesh_bin());
    cmd.args(args);
    run_bounded(&mut cmd, Duration::from_secs(30)).unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

/// Runs `$MESH_BIN <args>`, asserts it succeeds and parses stdout as JSON.
pub fn mesh_cli_json<I, S>(args: I) -> serde_json::Value
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<_> = args
        .into_iter()
        .map(|a| a.as_ref().to_os_string())
        .collect();
    let out = mesh_cli(&args);
    assert!(
        out.status.success(),
        "`mesh {args:?}` failed (is the subcommand implemented?): {}",
        out.describe()
    );
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("`mesh {args:?}` printed invalid JSON ({e}): {}", out.stdout))
}

/// Quotes `word` for a POSIX shell.
pub fn shell_quote(word: &str) -> String {
    if !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=@%+,".contains(c))
    {
        return word.to_owned();
    }
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// Runs `argv` under a pseudo-terminal (`script -qec <command> /dev/null`), killed after
/// `timeout`. Returns what it printed to the terminal, `\r` removed (ANSI escapes kept).
pub fn run_in_pty(argv: &[&str], timeout: Duration) -> Captured {
    let command = argv
        .iter()
        .map(|a| shell_quote(a))
        .collect::<Vec<_>>()
        .join(" ");
    let mut cmd = Command::new("script");
    cmd.args(["-qec", &command, "/dev/null"]);
    let mut out = run_bounded(&mut cmd, timeout)
        .unwrap_or_else(|e| panic!("`script -qec {command:?}` (util-linux): {e}"));
    out.stdout = out.stdout.replace('\r', "");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_for_the_shell() {
        assert_eq!(shell_quote("/usr/bin/mesh"), "/usr/bin/mesh");
        assert_eq!(shell_quote("200ms"), "200ms");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn pty_runs_a_command_on_a_terminal() {
        let out = run_in_pty(
            &["sh", "-c", "test -t 1 && echo tty"],
            Duration::from_secs(10),
        );
        assert!(out.status.success(), "{}", out.describe());
        assert_eq!(out.stdout.trim(), "tty");
    }

    #[test]
    fn finds_formatted_entries() {
        let dump = serde_json::json!([
            {"key": ["0x01"], "value": ["0x02"], "formatted": {"key": 1, "value": {"a": 2}}},
            {"key": 3, "value": {"a": 4}}
        ]);
        let entries = formatted_entries(&dump);
        assert_eq!(entries[0]["value"]["a"], 2);
        assert_eq!(entries[1]["key"], 3);
    }
}
