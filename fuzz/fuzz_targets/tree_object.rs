//! Tree object decoding: never panics, and an accepted tree is exactly its
//! canonical encoding (one tree, one id).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sync_core::manifest::Tree;

fuzz_target!(|data: &[u8]| {
    if let Ok(tree) = Tree::decode(data) {
        assert_eq!(tree.encode(), data);
    }
});
