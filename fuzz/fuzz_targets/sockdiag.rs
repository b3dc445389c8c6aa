//! The sock_diag reply parser (`datapath/sockdiag.rs`): raw bytes as the kernel's reply
//! datagrams to a UDP dump and to a SOCK_DESTROY. The input is the sequence number the replies
//! must carry (4 bytes, little endian), then datagrams, each a 2-byte little-endian length and
//! that many bytes (the last one takes what is left).

#![no_main]

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use libfuzzer_sys::fuzz_target;
use mesh_user::fuzzing::parse_replies;

fuzz_target!(|data: &[u8]| {
    let Some((seq, mut rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    let seq = u32::from_le_bytes(*seq);
    let mut datagrams = Vec::new();
    while let Some((len, tail)) = rest.split_first_chunk::<2>() {
        let len = usize::from(u16::from_le_bytes(*len)).min(tail.len());
        datagrams.push(&tail[..len]);
        rest = &tail[len..];
    }
    let cookies: HashSet<u64> = [1, 2, 0x0000_0001_0000_0001, u64::MAX].into();
    for backend in [
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ] {
        let (dump, _destroyed) = parse_replies(&datagrams, seq, &cookies, backend);
        if let Some(Ok(found)) = dump {
            for cookie in found {
                assert!(cookies.contains(&cookie), "picked cookie {cookie:#x}");
            }
        }
    }
});
