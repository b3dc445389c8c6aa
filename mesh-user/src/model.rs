//! Domain types every layer shares. Imports nothing of the agent.

use std::{fmt, net::SocketAddr};

use mesh_common::{PROTO_TCP, PROTO_UDP};

/// What a client connects to: a virtual IP, port and protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Vip {
    pub addr: SocketAddr,
    /// IP protocol number (`PROTO_TCP` or `PROTO_UDP`).
    pub proto: u8,
    /// An external service: matched by the TC programs on the node's external devices for
    /// traffic from other hosts (`EXT_SERVICES`), not by the socket-level programs. The same
    /// address may be both (a NodePort dialled on the node and from outside).
    pub external: bool,
}

impl Vip {
    pub fn protocol_name(&self) -> &'static str {
        protocol_name(self.proto)
    }
}

pub fn protocol_name(proto: u8) -> &'static str {
    match proto {
        PROTO_TCP => "tcp",
        PROTO_UDP => "udp",
        _ => "unknown",
    }
}

impl fmt::Display for Vip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.protocol_name())?;
        if self.external {
            f.write_str(" (external)")?;
        }
        Ok(())
    }
}
