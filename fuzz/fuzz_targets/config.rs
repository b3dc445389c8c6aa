//! The config file: TOML text -> `config::parse` (parse + validate), and the incremental
//! re-read of an edited file (`Reparser`), which must give what parsing each text whole gives.
//! The input is up to three texts separated by NUL bytes, read one after the other as edits of
//! the same file.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_user::fuzzing::{Config, Reparser, parse};

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };
    let mut reparser = Reparser::default();
    for text in input.split('\0').take(3) {
        match parse(text, "fuzz.toml") {
            Ok(config) => {
                config
                    .validate("again")
                    .expect("an accepted config validates again");
                for svc in &config.services {
                    mesh_fuzz::check_saved(svc);
                }
            }
            Err(err) => {
                let message = err.to_string();
                assert!(message.contains("fuzz.toml"), "no origin in {message:?}");
            }
        }
        // What the re-read must agree with: the whole text parsed, `[agent]` validated (the
        // registry validates the services), as the Reparser's own property test has it.
        let whole = toml::from_str::<Config>(text)
            .map_err(|e| e.to_string())
            .and_then(|c| {
                let agent_only = Config {
                    agent: c.agent.clone(),
                    services: Vec::new(),
                };
                agent_only
                    .validate("fuzz.toml")
                    .map_err(|e| e.to_string())?;
                Ok(c)
            });
        let pieces = reparser.parse(text.to_owned(), "fuzz.toml");
        match (&pieces, &whole) {
            (Ok(got), Ok(want)) => assert_eq!(got, want, "re-read differs for {text:?}"),
            (Err(_), Err(_)) => {}
            _ => panic!("re-read {pieces:?} but whole {whole:?} for {text:?}"),
        }
    }
});
