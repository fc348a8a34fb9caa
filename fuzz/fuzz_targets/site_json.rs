#![no_main]
//! Arbitrary bytes as a field site's site.json: never panics, errors are one line.
use libfuzzer_sys::fuzz_target;
use perch_bootstrap::site::SiteConfig;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = SiteConfig::parse(data, std::path::Path::new("site.json")) {
        assert!(!e.to_string().contains('\n'));
    }
});
