//! What the kernel programs need of the running kernel's BTF (`/sys/kernel/btf/vmlinux`) to
//! read a socket at its release: the offsets of the `struct tcp_sock` fields they load, and
//! the BTF ids of the kfunc that makes the socket loadable and of `struct tcp_sock`. The Rust
//! BPF toolchain emits no CO-RE or kfunc relocations, so the agent resolves them itself: the
//! offsets go to the programs as a read-only global, the ids into their instructions
//! (`mesh_common::kfunc`).
//!
//! A small reader of the BTF format (a stable kernel UAPI, `include/uapi/linux/btf.h`): only
//! what finding struct members and enum values needs. (btf-rs would do it but is LGPL; aya-obj
//! parses BTF but does not expose struct members.)

use std::collections::HashMap;

use anyhow::{Context as _, bail, ensure};
use mesh_common::{TcpSockFields, kfunc::KfuncIds};

const VMLINUX: &str = "/sys/kernel/btf/vmlinux";
const MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// What the release program needs of the running kernel.
pub struct SocketAccess {
    pub fields: TcpSockFields,
    pub kfuncs: KfuncIds,
}

/// The running kernel's offsets and ids.
pub fn socket_access() -> anyhow::Result<SocketAccess> {
    let data = std::fs::read(VMLINUX).with_context(|| {
        format!(
            "reading the kernel's BTF at {VMLINUX} (mesh needs a kernel built with \
             CONFIG_DEBUG_INFO_BTF to read connection outcomes)"
        )
    })?;
    let btf = Btf::parse(&data).with_context(|| format!("parsing {VMLINUX}"))?;
    Ok(SocketAccess {
        fields: fields_of(&btf).with_context(|| {
            format!("finding the struct tcp_sock fields mesh reads in {VMLINUX}")
        })?,
        kfuncs: kfuncs_of(&btf).with_context(|| {
            format!("finding the kfunc mesh calls in {VMLINUX} (it needs Linux 6.2 or later)")
        })?,
    })
}

fn kfuncs_of(btf: &Btf<'_>) -> anyhow::Result<KfuncIds> {
    Ok(KfuncIds {
        rdonly_cast: btf.named(KIND_FUNC, "bpf_rdonly_cast")?,
        tcp_sock: btf.named(KIND_STRUCT, "tcp_sock")?,
    })
}

fn fields_of(btf: &Btf<'_>) -> anyhow::Result<TcpSockFields> {
    let tcp_sock = btf.named(KIND_STRUCT, "tcp_sock")?;
    // struct sock is the first member of inet_sock, inet_connection_sock and tcp_sock: its
    // offsets are offsets in tcp_sock.
    for (outer, inner) in [
        ("tcp_sock", "inet_conn"),
        ("inet_connection_sock", "icsk_inet"),
        ("inet_sock", "sk"),
        ("sock", "__sk_common"),
    ] {
        let (offset, _) = btf.member(btf.named(KIND_STRUCT, outer)?, inner)?;
        ensure!(offset == 0, "{outer}.{inner} is at byte {offset}, not 0");
    }
    // `sk_flags` is C's name for `__sk_common.skc_flags`.
    let sock_common = btf.named(KIND_STRUCT, "sock_common")?;
    let field = |id: u32, name: &str, size: u32| -> anyhow::Result<u32> {
        let (offset, type_id) = btf.member(id, name)?;
        let found = btf.size_of(type_id)?;
        ensure!(found == size, "{name} is {found} bytes, mesh reads {size}");
        Ok(offset)
    };
    let sock_done_bit = btf.enum_value("sock_flags", "SOCK_DONE")?;
    ensure!(sock_done_bit < 64, "SOCK_DONE is bit {sock_done_bit}");
    Ok(TcpSockFields {
        sk_flags: field(sock_common, "skc_flags", 8)?,
        sock_done_bit,
        write_seq: field(tcp_sock, "write_seq", 4)?,
        snd_una: field(tcp_sock, "snd_una", 4)?,
        srtt_us: field(tcp_sock, "srtt_us", 4)?,
        bytes_received: field(tcp_sock, "bytes_received", 8)?,
        bytes_acked: field(tcp_sock, "bytes_acked", 8)?,
        // atomic64_t: a struct of one s64.
        sk_cookie: field(sock_common, "skc_cookie", 8)?,
    })
}

/// One type: kind, vlen, kind_flag, name, size-or-type, and where its trailing data starts.
#[derive(Clone, Copy)]
struct TypeEntry {
    kind: u32,
    vlen: usize,
    kind_flag: bool,
    name_off: u32,
    size_or_type: u32,
    extra: usize,
}

struct Btf<'a> {
    types: &'a [u8],
    strings: &'a [u8],
    /// By type id - 1 (id 0 is void).
    entries: Vec<TypeEntry>,
    by_name: HashMap<(u32, &'a str), u32>,
}

impl<'a> Btf<'a> {
    fn parse(data: &'a [u8]) -> anyhow::Result<Self> {
        let u32_at = |at: usize| -> anyhow::Result<u32> {
            let bytes = data.get(at..at + 4).context("truncated header")?;
            Ok(u32::from_ne_bytes(bytes.try_into().expect("4 bytes")))
        };
        ensure!(
            data.len() >= 24,
            "{} bytes: too short for a BTF header",
            data.len()
        );
        let magic = u16::from_ne_bytes([data[0], data[1]]);
        ensure!(
            magic == MAGIC,
            "magic {magic:#x}, expected {MAGIC:#x} (native byte order)"
        );
        let hdr_len = u32_at(4)? as usize;
        let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
        let (str_off, str_len) = (u32_at(16)? as usize, u32_at(20)? as usize);
        let section = |off: usize, len: usize| {
            data.get(hdr_len + off..hdr_len + off + len)
                .context("section out of bounds")
        };
        let types = section(type_off, type_len)?;
        let strings = section(str_off, str_len)?;
        let mut btf = Self {
            types,
            strings,
            entries: Vec::new(),
            by_name: HashMap::new(),
        };
        let mut at = 0;
        while at < types.len() {
            let word = |i: usize| btf.word(at + 4 * i);
            let info = word(1)?;
            let entry = TypeEntry {
                kind: (info >> 24) & 0x1f,
                vlen: (info & 0xffff) as usize,
                kind_flag: info >> 31 == 1,
                name_off: word(0)?,
                size_or_type: word(2)?,
                extra: at + 12,
            };
            let extra = match entry.kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * entry.vlen,
                KIND_ENUM | KIND_FUNC_PROTO => 8 * entry.vlen,
                kind if kind <= KIND_ENUM64 => 0,
                kind => bail!("unknown BTF kind {kind} at byte {at}"),
            };
            btf.entries.push(entry);
            let id = btf.entries.len() as u32;
            if matches!(entry.kind, KIND_STRUCT | KIND_ENUM | KIND_FUNC) {
                let name = btf.string(entry.name_off)?;
                // The first definition wins; vmlinux has one of each name that matters here.
                btf.by_name.entry((entry.kind, name)).or_insert(id);
            }
            at = entry.extra + extra;
        }
        Ok(btf)
    }

    fn word(&self, at: usize) -> anyhow::Result<u32> {
        let bytes = self.types.get(at..at + 4).context("truncated type")?;
        Ok(u32::from_ne_bytes(bytes.try_into().expect("4 bytes")))
    }

    fn string(&self, off: u32) -> anyhow::Result<&'a str> {
        let rest = self
            .strings
            .get(off as usize..)
            .context("string out of bounds")?;
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .context("unterminated string")?;
        std::str::from_utf8(&rest[..end]).context("string not UTF-8")
    }

    fn entry(&self, id: u32) -> anyhow::Result<TypeEntry> {
        let index = (id as usize).checked_sub(1).context("type void")?;
        self.entries
            .get(index)
            .copied()
            .context("type id out of range")
    }

    fn named(&self, kind: u32, name: &str) -> anyhow::Result<u32> {
        self.by_name
            .get(&(kind, name))
            .copied()
            .with_context(|| format!("no {} {name}", kind_name(kind)))
    }

    /// Byte offset and type of a (non-bitfield) member of a struct, also inside its anonymous
    /// structs and unions (as C code names them).
    fn member(&self, struct_id: u32, name: &str) -> anyhow::Result<(u32, u32)> {
        let entry = self.entry(struct_id)?;
        self.find_member(struct_id, name, 0)?.with_context(|| {
            format!(
                "no member {name} in {}",
                self.string(entry.name_off).unwrap_or("?")
            )
        })
    }

    fn find_member(
        &self,
        struct_id: u32,
        name: &str,
        depth: u32,
    ) -> anyhow::Result<Option<(u32, u32)>> {
        ensure!(depth < 8, "anonymous members nested too deep");
        let entry = self.entry(struct_id)?;
        ensure!(
            matches!(entry.kind, KIND_STRUCT | KIND_UNION),
            "type {struct_id} is no struct"
        );
        for i in 0..entry.vlen {
            let at = entry.extra + 12 * i;
            let (name_off, type_id, offset) =
                (self.word(at)?, self.word(at + 4)?, self.word(at + 8)?);
            // With kind_flag the bitfield size is in the top 8 bits.
            let (bits, bitfield) = if entry.kind_flag {
                (offset & 0xff_ffff, offset >> 24)
            } else {
                (offset, 0)
            };
            let member = self.string(name_off)?;
            if member == name {
                ensure!(bitfield == 0 && bits % 8 == 0, "{name} is a bitfield");
                return Ok(Some((bits / 8, type_id)));
            }
            if member.is_empty()
                && matches!(self.entry(type_id)?.kind, KIND_STRUCT | KIND_UNION)
                && let Some((inner, type_id)) = self.find_member(type_id, name, depth + 1)?
            {
                return Ok(Some((bits / 8 + inner, type_id)));
            }
        }
        Ok(None)
    }

    /// Size in bytes of a type, through typedefs and qualifiers.
    fn size_of(&self, mut id: u32) -> anyhow::Result<u32> {
        for _ in 0..32 {
            let entry = self.entry(id)?;
            match entry.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = entry.size_or_type;
                }
                KIND_INT | KIND_ENUM | KIND_STRUCT | KIND_UNION | KIND_ENUM64 => {
                    return Ok(entry.size_or_type);
                }
                kind => bail!("type {id} of kind {} has no size here", kind_name(kind)),
            }
        }
        bail!("type {id}: qualifier chain too long")
    }

    fn enum_value(&self, enum_name: &str, name: &str) -> anyhow::Result<u32> {
        let entry = self.entry(self.named(KIND_ENUM, enum_name)?)?;
        for i in 0..entry.vlen {
            let at = entry.extra + 8 * i;
            if self.string(self.word(at)?)? == name {
                return self.word(at + 4);
            }
        }
        bail!("no value {name} in enum {enum_name}")
    }
}

fn kind_name(kind: u32) -> &'static str {
    match kind {
        KIND_STRUCT => "struct",
        KIND_ENUM => "enum",
        KIND_FUNC => "function",
        KIND_INT => "int",
        _ => "type",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob built by hand: strings, then types in order (ids from 1).
    struct Builder {
        strings: Vec<u8>,
        types: Vec<u32>,
    }

    impl Builder {
        fn new() -> Self {
            Self {
                strings: vec![0],
                types: Vec::new(),
            }
        }

        fn name(&mut self, s: &str) -> u32 {
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(s.as_bytes());
            self.strings.push(0);
            off
        }

        fn int(&mut self, name: &str, size: u32) {
            let n = self.name(name);
            self.types.extend([n, KIND_INT << 24, size, size * 8]);
        }

        fn typedef(&mut self, name: &str, target: u32) {
            let n = self.name(name);
            self.types.extend([n, KIND_TYPEDEF << 24, target]);
        }

        /// Members: (name, type id, bit offset).
        fn strukt(&mut self, name: &str, size: u32, members: &[(&str, u32, u32)]) {
            self.aggregate(KIND_STRUCT, name, size, members);
        }

        fn union(&mut self, name: &str, size: u32, members: &[(&str, u32, u32)]) {
            self.aggregate(KIND_UNION, name, size, members);
        }

        fn aggregate(&mut self, kind: u32, name: &str, size: u32, members: &[(&str, u32, u32)]) {
            let n = if name.is_empty() { 0 } else { self.name(name) };
            self.types
                .extend([n, (kind << 24) | members.len() as u32, size]);
            for &(m, t, off) in members {
                let m = self.name(m);
                self.types.extend([m, t, off]);
            }
        }

        fn enumeration(&mut self, name: &str, values: &[(&str, u32)]) {
            let n = self.name(name);
            self.types
                .extend([n, (KIND_ENUM << 24) | values.len() as u32, 4]);
            for &(v, val) in values {
                let v = self.name(v);
                self.types.extend([v, val]);
            }
        }

        /// A function, typed by a prototype without parameters.
        fn func(&mut self, name: &str) {
            self.types.extend([0, KIND_FUNC_PROTO << 24, 0]);
            let proto = self.types_count();
            let n = self.name(name);
            self.types.extend([n, KIND_FUNC << 24, proto]);
        }

        /// Type ids so far (each type above is 3 words plus its trailing data).
        fn types_count(&self) -> u32 {
            let mut at = 0;
            let mut count = 0;
            while at < self.types.len() {
                let info = self.types[at + 1];
                let vlen = (info & 0xffff) as usize;
                at += 3 + match info >> 24 {
                    KIND_INT => 1,
                    KIND_STRUCT | KIND_UNION => 3 * vlen,
                    KIND_ENUM => 2 * vlen,
                    _ => 0,
                };
                count += 1;
            }
            count
        }

        fn bytes(&self) -> Vec<u8> {
            let types: Vec<u8> = self.types.iter().flat_map(|w| w.to_ne_bytes()).collect();
            let mut out = Vec::new();
            out.extend(MAGIC.to_ne_bytes());
            out.extend([1, 0]);
            for w in [
                24,
                0,
                types.len() as u32,
                types.len() as u32,
                self.strings.len() as u32,
            ] {
                out.extend(w.to_ne_bytes());
            }
            out.extend(types);
            out.extend(&self.strings);
            out
        }
    }

    /// The shape of the kernel's types, with made-up offsets.
    fn kernel_like(sk_flags_type: u32) -> Vec<u8> {
        let mut b = Builder::new();
        b.int("unsigned int", 4); // 1
        b.int("long long unsigned int", 8); // 2
        b.typedef("u32", 1); // 3
        b.typedef("u64", 2); // 4
        b.typedef("__u64", 4); // 5
        // As the kernel has it: skc_flags in an anonymous union of struct sock_common.
        b.union(
            "",
            8,
            &[("skc_flags", sk_flags_type, 0), ("skc_listener", 2, 0)],
        ); // 6
        b.strukt("atomic64_t", 8, &[("counter", 2, 0)]); // 7
        b.strukt(
            "sock_common",
            136,
            &[
                ("skc_hash", 1, 0),
                ("", 6, 96 * 8),
                ("skc_cookie", 7, 112 * 8),
            ],
        ); // 8
        b.strukt("sock", 800, &[("__sk_common", 8, 0)]); // 9
        b.strukt("inet_sock", 900, &[("sk", 9, 0)]); // 10
        b.strukt("inet_connection_sock", 1400, &[("icsk_inet", 10, 0)]); // 11
        b.strukt(
            "tcp_sock",
            2200,
            &[
                ("inet_conn", 11, 0),
                ("write_seq", 3, 1576 * 8),
                ("snd_una", 3, 1672 * 8),
                ("srtt_us", 1, 1680 * 8),
                ("bytes_received", 5, 1752 * 8),
                ("bytes_acked", 4, 1824 * 8),
            ],
        ); // 12
        b.enumeration("sock_flags", &[("SOCK_DEAD", 0), ("SOCK_DONE", 1)]); // 13
        b.func("bpf_cast_to_kern_ctx"); // 14, 15
        b.func("bpf_rdonly_cast"); // 16, 17
        b.bytes()
    }

    #[test]
    fn finds_the_kfunc_and_the_socket_type() {
        let data = kernel_like(2);
        let ids = kfuncs_of(&Btf::parse(&data).expect("parse")).expect("ids");
        assert_eq!(
            ids,
            KfuncIds {
                rdonly_cast: 17,
                tcp_sock: 12
            }
        );
    }

    #[test]
    fn a_kernel_without_the_kfunc_is_named() {
        let mut b = Builder::new();
        b.strukt("tcp_sock", 8, &[]);
        let data = b.bytes();
        let err = kfuncs_of(&Btf::parse(&data).expect("parse")).expect_err("no kfunc");
        assert!(
            format!("{err:#}").contains("no function bpf_rdonly_cast"),
            "{err:#}"
        );
    }

    #[test]
    fn finds_the_fields_through_typedefs_and_nested_structs() {
        let data = kernel_like(2);
        let fields = fields_of(&Btf::parse(&data).expect("parse")).expect("fields");
        assert_eq!(
            fields,
            TcpSockFields {
                sk_flags: 96,
                sock_done_bit: 1,
                write_seq: 1576,
                snd_una: 1672,
                srtt_us: 1680,
                bytes_received: 1752,
                bytes_acked: 1824,
                sk_cookie: 112,
            }
        );
    }

    #[test]
    fn a_field_of_another_size_is_refused() {
        // sk_flags as a 4-byte int: reading 8 bytes would take the next field along.
        let data = kernel_like(1);
        let err = fields_of(&Btf::parse(&data).expect("parse")).expect_err("wrong size");
        assert!(
            format!("{err:#}").contains("skc_flags is 4 bytes"),
            "{err:#}"
        );
    }

    #[test]
    fn a_missing_struct_is_named() {
        let mut b = Builder::new();
        b.int("int", 4);
        let data = b.bytes();
        let err = fields_of(&Btf::parse(&data).expect("parse")).expect_err("no tcp_sock");
        assert!(format!("{err:#}").contains("no struct tcp_sock"), "{err:#}");
    }

    #[test]
    fn garbage_is_not_btf() {
        assert!(Btf::parse(&[0u8; 64]).is_err());
        assert!(Btf::parse(&[0u8; 4]).is_err());
    }

    /// The running kernel's BTF, where the machine has it (every kernel mesh supports does).
    #[test]
    fn the_running_kernel_has_the_fields() {
        if !std::path::Path::new(VMLINUX).exists() {
            eprintln!("{VMLINUX} missing: nothing to check on this host");
            return;
        }
        let access = socket_access().expect("fields and ids of the running kernel");
        let fields = access.fields;
        eprintln!("{fields:?} {:?}", access.kfuncs);
        assert!(access.kfuncs.rdonly_cast > 0 && access.kfuncs.tcp_sock > 0);
        // struct sock comes first and is far smaller than tcp_sock's own fields' offsets.
        assert!(fields.sk_flags < fields.write_seq, "{fields:?}");
        assert!(fields.write_seq > 0 && fields.bytes_acked > fields.write_seq);
    }
}
