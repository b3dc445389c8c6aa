//! The admin API's `PUT /v1/services/{name}`: the input's first line is the name (the path,
//! decoded), the rest the body. The body is parsed as the handler parses it
//! (`update::parse_service`) and the service handed to the registry as the API's update.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_user::fuzzing::{Source, parse_service};

fuzz_target!(|data: &[u8]| {
    let (name, body) = match data.iter().position(|&b| b == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (&b"svc"[..], data),
    };
    // axum hands the handler the path segment as a decoded `String`.
    let Ok(name) = std::str::from_utf8(name) else {
        return;
    };
    match parse_service(name, body) {
        Ok(service) => {
            assert_eq!(service.name, name, "the path names the service");
            mesh_fuzz::check_update(Source::Api, vec![service]);
        }
        Err(reason) => assert!(!reason.is_empty()),
    }
});
