//! Stored manifest decoding: never panics; an accepted manifest can be
//! walked (depth and missing trees give errors, not panics).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sync_core::manifest::Manifest;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::decode(data) {
        let _ = m.stats();
        let _ = m.lookup(b"a/b");
    }
});
