//! The Redis source: a hash (field = service name, value = the service as JSON) as HGETALL
//! returns it -> `redis::parse_hash` -> the registry, as the Redis source's update. The input
//! is `field NUL value NUL field NUL value ...` (a JSON value holds no raw NUL).

#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use mesh_user::fuzzing::{Source, parse_hash};

const KEY: &str = "mesh:services";

fuzz_target!(|data: &[u8]| {
    let mut entries = BTreeMap::new();
    let mut parts = data.split(|&b| b == 0);
    while let (Some(field), Some(value)) = (parts.next(), parts.next()) {
        // The source reads the fields as UTF-8 strings; others are a typed error of Redis.
        let Ok(field) = std::str::from_utf8(field) else {
            return;
        };
        entries.insert(field.to_owned(), value.to_vec());
    }
    match parse_hash(KEY, &entries) {
        Ok(services) => {
            assert_eq!(services.len(), entries.len());
            for (svc, field) in services.iter().zip(entries.keys()) {
                assert_eq!(&svc.name, field, "the field names the service");
            }
            mesh_fuzz::check_update(Source::Redis, services);
        }
        Err(problems) => {
            assert!(!problems.is_empty());
            for problem in &problems {
                let named = entries
                    .keys()
                    .any(|field| problem.starts_with(&format!("hash {KEY:?} field {field:?}: ")));
                assert!(named, "a problem that names no field: {problem:?}");
            }
        }
    }
});
