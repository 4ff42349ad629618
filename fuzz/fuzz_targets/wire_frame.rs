//! The wire decoders on arbitrary bytes: the first byte picks how the
//! stream is cut into pushes. The data streams' chunk decoder must yield
//! the same `Chunks` frames as the general decoder and fail where it fails
//! or meets another frame type; every frame the general decoder yields
//! must re-encode to a frame that decodes to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sync_core::wire::{assert_chunk_decoder_agrees, decode, encode};

fuzz_target!(|data: &[u8]| {
    let Some((&step, bytes)) = data.split_first() else {
        return;
    };
    let step = step as usize % 64 + 1;
    for frame in assert_chunk_decoder_agrees(bytes, step) {
        let enc = encode(&frame);
        let (again, used) = decode(&enc).expect("re-encoded frame decodes").unwrap();
        assert_eq!(used, enc.len());
        assert_eq!(again, frame);
    }
});
