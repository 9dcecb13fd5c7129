//! Any string: parsing never panics, and what parses prints back to itself.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|s: &str| {
    if let Ok(spec) = s.parse::<dream_core::sockets::spec::ListenSpec>() {
        let again: dream_core::sockets::spec::ListenSpec = spec.to_string().parse().expect("round trip");
        assert_eq!(again, spec);
    }
});
