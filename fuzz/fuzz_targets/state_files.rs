//! State-directory decoders (head, journal, tree-log records): never
//! panic, and a log's records go through the same checks as a peer's
//! tree objects when inserted into a manifest.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sync_core::manifest::Manifest;
use sync_core::state::{decode_log, Head, Journal};

fuzz_target!(|data: &[u8]| {
    let _ = Head::decode(data);
    let _ = Journal::decode(data);
    if let Ok(records) = decode_log(data) {
        let mut m = Manifest::empty();
        for (id, packed) in records {
            if m.insert_packed(id, packed.into()).is_ok() && m.set_root(id).is_ok() {
                let _ = m.stats();
            }
        }
    }
});
