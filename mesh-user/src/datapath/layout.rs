//! Byte order and layout of map keys and values: the one place where a `SocketAddr` becomes
//! the 16-byte, network-order form the kernel programs read (and back).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::bail;
use mesh_common::{
    Backend, FAMILY_V4, FAMILY_V6, SERVICE_NAME_LEN, ServiceKey, ServiceName, SlotValue,
};

use super::ops::SlotBackend;
use crate::model::Vip;

pub fn key_of_vip(vip: &Vip) -> ServiceKey {
    let (ip, family) = ip_bytes(vip.addr.ip());
    ServiceKey {
        ip,
        port: vip.addr.port(),
        proto: vip.proto,
        family,
    }
}

/// The VIP of a `services` key (`external` false) or an `ext_services` key (true).
pub fn vip_of_key(key: &ServiceKey, external: bool) -> anyhow::Result<Vip> {
    Ok(Vip {
        addr: SocketAddr::new(ip_of_bytes(&key.ip, key.family)?, key.port),
        proto: key.proto,
        external,
    })
}

pub fn backend_of_addr(addr: &SocketAddr) -> Backend {
    let (ip, family) = ip_bytes(addr.ip());
    Backend {
        ip,
        port: addr.port(),
        family,
        _pad: 0,
    }
}

/// A slot's value: the backend's id and a copy of its `backends` entry.
pub fn slot_value(backend: &SlotBackend) -> SlotValue {
    SlotValue {
        backend_id: backend.id,
        backend: backend_of_addr(&backend.addr),
    }
}

pub fn addr_of_backend(backend: &Backend) -> anyhow::Result<SocketAddr> {
    Ok(SocketAddr::new(
        ip_of_bytes(&backend.ip, backend.family)?,
        backend.port,
    ))
}

fn ip_bytes(ip: IpAddr) -> ([u8; 16], u8) {
    let mut bytes = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => {
            bytes[..4].copy_from_slice(&v4.octets());
            (bytes, FAMILY_V4)
        }
        IpAddr::V6(v6) => (v6.octets(), FAMILY_V6),
    }
}

fn ip_of_bytes(bytes: &[u8; 16], family: u8) -> anyhow::Result<IpAddr> {
    match family {
        FAMILY_V4 => Ok(IpAddr::V4(Ipv4Addr::new(
            bytes[0], bytes[1], bytes[2], bytes[3],
        ))),
        FAMILY_V6 => Ok(IpAddr::V6(Ipv6Addr::from(*bytes))),
        other => bail!("unknown address family tag {other} in a map entry"),
    }
}

pub fn service_name(name: &str) -> ServiceName {
    let mut out = ServiceName::default();
    // Validation keeps names shorter than the field, so a terminating zero always remains.
    let len = name.len().min(SERVICE_NAME_LEN - 1);
    out.name[..len].copy_from_slice(&name.as_bytes()[..len]);
    out
}

pub fn name_of(name: &ServiceName) -> String {
    let end = name
        .name
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(name.name.len());
    String::from_utf8_lossy(&name.name[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_through_map_layout() {
        for addr in ["127.0.0.1:8081", "[fd00::1]:443"] {
            let addr: SocketAddr = addr.parse().unwrap();
            assert_eq!(addr_of_backend(&backend_of_addr(&addr)).unwrap(), addr);
            let vip = Vip {
                addr,
                proto: 6,
                external: false,
            };
            assert_eq!(vip_of_key(&key_of_vip(&vip), false).unwrap(), vip);
        }
    }

    #[test]
    fn ipv4_keys_use_network_order_in_the_first_four_bytes() {
        let vip = Vip {
            addr: "127.100.0.1:80".parse().unwrap(),
            proto: 6,
            external: false,
        };
        let key = key_of_vip(&vip);
        assert_eq!(&key.ip[..4], &[127, 100, 0, 1]);
        assert!(key.ip[4..].iter().all(|&b| b == 0));
        assert_eq!(key.port, 80);
        assert_eq!(key.family, FAMILY_V4);
    }

    #[test]
    fn service_names_round_trip() {
        assert_eq!(name_of(&service_name("web-frontend")), "web-frontend");
    }

    #[test]
    fn unknown_family_tags_are_errors() {
        assert!(ip_of_bytes(&[0; 16], 5).is_err());
    }
}
