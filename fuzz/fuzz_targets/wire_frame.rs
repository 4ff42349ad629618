//! The wire decoder on arbitrary bytes: the first byte picks how the
//! stream is cut into pushes; every decoded frame must re-encode to a
//! frame that decodes to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sync_core::wire::{decode, encode, FrameDecoder};

fuzz_target!(|data: &[u8]| {
    let Some((&step, bytes)) = data.split_first() else {
        return;
    };
    let step = step as usize % 64 + 1;
    let mut d = FrameDecoder::new();
    'outer: for piece in bytes.chunks(step) {
        if d.push(piece).is_err() {
            break;
        }
        loop {
            match d.next_frame() {
                Ok(Some(frame)) => {
                    let enc = encode(&frame);
                    let (again, used) = decode(&enc).expect("re-encoded frame decodes").unwrap();
                    assert_eq!(used, enc.len());
                    assert_eq!(again, frame);
                }
                Ok(None) => break,
                Err(_) => break 'outer,
            }
        }
    }
    let _ = d.finish();
});
