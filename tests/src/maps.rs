//! Reading the agent's pinned maps with `bpftool` (`<bpffs>/v4/maps/<name>`), for counters the
//! CLI does not show (`datapath_stats`, the `udp_flows` table), and changing them behind the
//! agent's back (`bpftool map delete` / `update`) as an operator or a bug could.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::BpffsDir;

/// The pin layout version the tests expect (`mesh_common::LAYOUT_VERSION`).
pub const LAYOUT_DIR: &str = "v6";

/// Path of the pinned map `name` (lower case, as the agent pins it).
pub fn map_pin(bpffs: &BpffsDir, name: &str) -> PathBuf {
    bpffs
        .path()
        .join(LAYOUT_DIR)
        .join("maps")
        .join(name.to_ascii_lowercase())
}

/// `bpftool map dump pinned <pin> -j`, parsed. Panics with bpftool's output on failure.
pub fn map_dump(bpffs: &BpffsDir, name: &str) -> serde_json::Value {
    let pin = map_pin(bpffs, name);
    let mut cmd = Command::new("bpftool");
    cmd.args(["map", "dump", "pinned"]).arg(&pin).arg("-j");
    let out = crate::process::run_bounded(&mut cmd, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("`bpftool map dump pinned {}`: {e}", pin.display()));
    assert!(
        out.status.success(),
        "`bpftool map dump pinned {}` failed (is bpftool installed?): {}",
        pin.display(),
        out.describe()
    );
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "`bpftool map dump pinned {}` printed invalid JSON ({e}): {}",
            pin.display(),
            out.stdout
        )
    })
}

/// `max_entries` of the pinned map `name`, from `bpftool map show pinned <pin> -j`.
pub fn map_max_entries(bpffs: &BpffsDir, name: &str) -> u64 {
    let pin = map_pin(bpffs, name);
    let mut cmd = Command::new("bpftool");
    cmd.args(["map", "show", "pinned"]).arg(&pin).arg("-j");
    let out = crate::process::run_bounded(&mut cmd, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("`bpftool map show pinned {}`: {e}", pin.display()));
    assert!(
        out.status.success(),
        "`bpftool map show pinned {}` failed: {}",
        pin.display(),
        out.describe()
    );
    let info: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "`bpftool map show pinned {}` printed invalid JSON ({e}): {}",
            pin.display(),
            out.stdout
        )
    });
    info["max_entries"]
        .as_u64()
        .unwrap_or_else(|| panic!("no max_entries in {info}"))
}

/// The raw key bytes of every entry of a `bpftool map dump -j` (`"key": ["0x7f", ...]`), in
/// dump order, next to the entry's BTF-formatted form.
pub fn raw_keys(dump: &serde_json::Value) -> Vec<(Vec<u8>, serde_json::Value)> {
    dump.as_array()
        .unwrap_or_else(|| panic!("a map dump is a list, not {dump}"))
        .iter()
        .map(|entry| {
            let key = parse_bytes(&entry["key"])
                .unwrap_or_else(|e| panic!("map dump entry without raw key bytes ({e}): {entry}"));
            (key, entry.get("formatted").unwrap_or(entry).clone())
        })
        .collect()
}

/// `["0x7f", "0x00", ...]` as bytes.
pub fn parse_bytes(list: &serde_json::Value) -> Result<Vec<u8>, String> {
    list.as_array()
        .ok_or_else(|| format!("not a list of bytes: {list}"))?
        .iter()
        .map(|b| {
            let text = b
                .as_str()
                .ok_or_else(|| format!("not a byte string: {b}"))?;
            u8::from_str_radix(text.trim_start_matches("0x"), 16)
                .map_err(|e| format!("byte {text:?}: {e}"))
        })
        .collect()
}

fn bpftool_bytes(bytes: &[u8]) -> Vec<String> {
    bytes.iter().map(|b| format!("0x{b:02x}")).collect()
}

fn run_bpftool_map(bpffs: &BpffsDir, name: &str, verb: &str, tail: &[String]) {
    let pin = map_pin(bpffs, name);
    let mut cmd = Command::new("bpftool");
    cmd.args(["map", verb, "pinned"]).arg(&pin).args(tail);
    let out = crate::process::run_bounded(&mut cmd, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("`bpftool map {verb} pinned {}`: {e}", pin.display()));
    assert!(
        out.status.success(),
        "`bpftool map {verb} pinned {} {}` failed: {}",
        pin.display(),
        tail.join(" "),
        out.describe()
    );
}

/// `bpftool map delete pinned <pin> key <bytes>`: removes one entry behind the agent's back.
pub fn map_delete(bpffs: &BpffsDir, name: &str, key: &[u8]) {
    let mut tail = vec!["key".to_owned()];
    tail.extend(bpftool_bytes(key));
    run_bpftool_map(bpffs, name, "delete", &tail);
}

/// `bpftool map update pinned <pin> key <bytes> value <bytes>`: writes one entry behind the
/// agent's back.
pub fn map_update(bpffs: &BpffsDir, name: &str, key: &[u8], value: &[u8]) {
    let mut tail = vec!["key".to_owned()];
    tail.extend(bpftool_bytes(key));
    tail.push("value".to_owned());
    tail.extend(bpftool_bytes(value));
    run_bpftool_map(bpffs, name, "update", &tail);
}

/// Entries of `tcp_peers` that an open socket holds. It is an array indexed by socket cookie,
/// so its length says nothing: an entry is held while its first field, the cookie, is not 0.
pub fn tcp_peers_in_use(bpffs: &BpffsDir) -> usize {
    tcp_peers_held(bpffs).len()
}

/// The held `tcp_peers` entries, as bpftool dumps them (key, raw value and BTF-formatted value).
pub fn tcp_peers_held(bpffs: &BpffsDir) -> Vec<serde_json::Value> {
    let dump = map_dump(bpffs, "tcp_peers");
    let entries = dump
        .as_array()
        .unwrap_or_else(|| panic!("`bpftool map dump` of tcp_peers is not a list: {dump}"));
    entries
        .iter()
        .filter(|entry| {
            let value = parse_bytes(&entry["value"]).unwrap_or_else(|e| {
                panic!("tcp_peers entry without raw value bytes ({e}): {entry}")
            });
            value.get(..8).is_some_and(|cookie| cookie != [0; 8])
        })
        .cloned()
        .collect()
}

/// Entries of the `tcp_peers` array.
pub const TCP_PEERS_ENTRIES: usize = 65_536;

/// Makes every `tcp_peers` entry look held by a socket, with cookies no socket has for a long
/// while (2^62 + index), in one `bpftool batch` run (about a second).
pub fn hold_every_tcp_peer(bpffs: &BpffsDir) {
    use std::fmt::Write as _;
    let pin = map_pin(bpffs, "tcp_peers");
    let mut commands = String::new();
    for index in 0..TCP_PEERS_ENTRIES as u32 {
        let mut value = ((1u64 << 62) | u64::from(index)).to_ne_bytes().to_vec();
        value.resize(64, 0);
        let _ = writeln!(
            commands,
            "map update pinned {} key {} value {}",
            pin.display(),
            bpftool_bytes(&index.to_ne_bytes()).join(" "),
            bpftool_bytes(&value).join(" ")
        );
    }
    let file = std::env::temp_dir().join(crate::unique_name("tcp-peers-batch"));
    std::fs::write(&file, commands).unwrap_or_else(|e| panic!("writing {}: {e}", file.display()));
    let mut cmd = Command::new("bpftool");
    cmd.args(["batch", "file"]).arg(&file);
    let out = crate::process::run_bounded(&mut cmd, Duration::from_secs(120));
    let _ = std::fs::remove_file(&file);
    let out = out.unwrap_or_else(|e| panic!("`bpftool batch file` on tcp_peers: {e}"));
    assert!(
        out.status.success(),
        "`bpftool batch file` on tcp_peers failed: {}",
        out.describe()
    );
}

/// Number of entries of a (non per-CPU-array) map.
pub fn map_len(bpffs: &BpffsDir, name: &str) -> usize {
    match map_dump(bpffs, name) {
        serde_json::Value::Array(entries) => entries.len(),
        other => panic!("`bpftool map dump` of {name} is not a list: {other}"),
    }
}

/// The node-wide counters of `datapath_stats`, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DatapathCounters {
    pub rev_created: u64,
    pub rev_released: u64,
    pub udp_flows_added: u64,
    pub udp_flows_full: u64,
    pub passive_full: u64,
    pub affinity_full: u64,
    pub rev_failed: u64,
    pub slot_retries: u64,
    pub slot_misses: u64,
}

/// Reads `datapath_stats` (per-CPU array, index 0) through bpftool's BTF-formatted dump.
pub fn datapath_counters(bpffs: &BpffsDir) -> DatapathCounters {
    let dump = map_dump(bpffs, "datapath_stats");
    parse_datapath_counters(&dump).unwrap_or_else(|e| panic!("{e}: {dump}"))
}

/// Sums the per-CPU values of a `bpftool map dump -j` of `datapath_stats`.
pub fn parse_datapath_counters(dump: &serde_json::Value) -> Result<DatapathCounters, String> {
    let entry = dump
        .as_array()
        .and_then(|entries| entries.first())
        .ok_or("datapath_stats dump has no entry")?;
    let values = entry
        .pointer("/formatted/values")
        .and_then(serde_json::Value::as_array)
        .ok_or("datapath_stats dump has no BTF-formatted per-CPU values")?;
    let mut sum = DatapathCounters::default();
    for cpu in values {
        let field = |name: &str| {
            cpu.pointer(&format!("/value/{name}"))
                .and_then(serde_json::Value::as_u64)
                .ok_or_else(|| format!("datapath_stats value has no numeric field {name}"))
        };
        sum.rev_created += field("rev_created")?;
        sum.rev_released += field("rev_released")?;
        sum.udp_flows_added += field("udp_flows_added")?;
        sum.udp_flows_full += field("udp_flows_full")?;
        sum.passive_full += field("passive_full")?;
        sum.affinity_full += field("affinity_full")?;
        sum.rev_failed += field("rev_failed")?;
        sum.slot_retries += field("slot_retries")?;
        sum.slot_misses += field("slot_misses")?;
    }
    Ok(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_raw_key_bytes() {
        let dump = serde_json::json!([{"key": ["0x01", "0x00", "0xff"], "value": ["0x02"],
            "formatted": {"key": {"a": 1}, "value": 2}}]);
        let keys = raw_keys(&dump);
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].0, vec![1, 0, 255]);
        assert_eq!(keys[0].1["key"]["a"], 1);
        assert_eq!(bpftool_bytes(&[0, 0xab]), ["0x00", "0xab"]);
        assert!(parse_bytes(&serde_json::json!(["zz"])).is_err());
    }

    #[test]
    fn sums_per_cpu_counters() {
        let dump = serde_json::json!([{"key": ["0x00"], "values": [],
            "formatted": {"key": 0, "values": [
                {"cpu": 0, "value": {"rev_created": 3, "rev_released": 2,
                                     "udp_flows_added": 1, "udp_flows_full": 0,
                                     "passive_full": 1, "affinity_full": 0, "rev_failed": 2,
                                     "slot_retries": 3, "slot_misses": 0}},
                {"cpu": 1, "value": {"rev_created": 4, "rev_released": 5,
                                     "udp_flows_added": 0, "udp_flows_full": 7,
                                     "passive_full": 0, "affinity_full": 4, "rev_failed": 1,
                                     "slot_retries": 0, "slot_misses": 1}}]}}]);
        assert_eq!(
            parse_datapath_counters(&dump),
            Ok(DatapathCounters {
                rev_created: 7,
                rev_released: 7,
                udp_flows_added: 1,
                udp_flows_full: 7,
                passive_full: 1,
                affinity_full: 4,
                rev_failed: 3,
                slot_retries: 3,
                slot_misses: 1,
            })
        );
        assert!(parse_datapath_counters(&serde_json::json!([])).is_err());
    }
}
