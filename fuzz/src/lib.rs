//! What the fuzz targets share: the registry's verdict on a source's update, checked against
//! validating the whole, and the save/load round trip of accepted services.

use mesh_user::fuzzing::{Config, Registry, ServiceConfig, Source, parse, parse_service};

/// The file config the updates of the API, Redis and Kubernetes targets meet: one service of
/// the file (so names and VIPs can clash), small limits (so they can be exceeded) and a VIP
/// allow-list.
pub const FILE_CONFIG: &str = r#"
[agent]
vip_ranges = ["127.0.0.0/8", "10.96.0.0/12", "192.0.2.0/24", "fd00::/8", "2001:db8::/32", "::1/128"]

[agent.limits]
max_services = 16
max_backends = 32
max_service_backends = 48
max_slots = 4096

[[services]]
name = "file-web"
vip = "127.100.0.1:80"
backends = [{ addr = "127.0.0.1:8080" }]
"#;

/// Hands `services` to a registry holding `FILE_CONFIG` as `source`'s update, as the control
/// loop does, and checks the verdict: the quick check agrees with validating the whole merged
/// config, an accepted update is what the registry then holds (validates again, and is saved
/// and read back unchanged), a rejected one changes nothing and says why.
pub fn check_update(source: Source, services: Vec<ServiceConfig>) {
    let file = parse(FILE_CONFIG, "fuzz").expect("FILE_CONFIG is valid");
    let mut registry = Registry::new(file);
    let before = registry.merged();
    let mut whole: Config = before.clone();
    whole.services.extend(services.iter().cloned());
    let expected = whole.validate(source.name());
    match registry.replace(source, services.clone()) {
        Ok(_) => {
            assert!(
                expected.is_ok(),
                "accepted, but the whole is invalid: {expected:?}"
            );
            assert_eq!(registry.services_of(source), services.as_slice());
            let merged = registry.merged();
            merged
                .validate("again")
                .expect("an accepted registry validates again");
            for svc in &services {
                assert_eq!(registry.service(&svc.vip()), Some(svc));
                check_saved(svc);
            }
        }
        Err(err) => {
            let expected = expected.expect_err("rejected, but the whole is valid");
            assert_eq!(err.to_string(), expected.to_string());
            assert!(!err.to_string().is_empty());
            assert_eq!(
                registry.merged(),
                before,
                "a rejected update changed the registry"
            );
        }
    }
}

/// An accepted service survives being saved (`state_dir`, JSON) and read back under its name,
/// as the admin API's and Redis's saved sets are at start.
pub fn check_saved(svc: &ServiceConfig) {
    let json = serde_json::to_vec(svc).expect("a service serializes");
    let again = parse_service(&svc.name, &json)
        .unwrap_or_else(|err| panic!("a saved service does not parse again: {err}\n{svc:?}"));
    assert_eq!(&again, svc, "a saved service reads back different");
}
