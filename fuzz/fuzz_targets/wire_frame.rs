//! The wire decoders on arbitrary bytes: the first byte picks how the
//! stream is cut into pushes. Every frame the general decoder yields must
//! re-encode to a frame that decodes to itself, and the data streams'
//! chunk decoder must yield the same `Chunks` frames and fail where the
//! general one fails or meets another frame type.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sync_core::wire::{decode, encode, ChunkDecoder, Frame, FrameDecoder};

fuzz_target!(|data: &[u8]| {
    let Some((&step, bytes)) = data.split_first() else {
        return;
    };
    let step = step as usize % 64 + 1;
    let mut d = FrameDecoder::new();
    let mut frames = Vec::new();
    let ended_ok = 'outer: {
        for piece in bytes.chunks(step) {
            if d.push(piece).is_err() {
                break 'outer false;
            }
            loop {
                match d.next_frame() {
                    Ok(Some(frame)) => {
                        let enc = encode(&frame);
                        let (again, used) =
                            decode(&enc).expect("re-encoded frame decodes").unwrap();
                        assert_eq!(used, enc.len());
                        assert_eq!(again, frame);
                        frames.push(frame);
                    }
                    Ok(None) => break,
                    Err(_) => break 'outer false,
                }
            }
        }
        d.finish().is_ok()
    };

    let mut c = ChunkDecoder::new();
    let mut chunks = Vec::new();
    let chunks_ok = 'outer: {
        for piece in bytes.chunks(step) {
            let pushed = c.push(piece);
            chunks.extend(std::iter::from_fn(|| c.next_frame()));
            if pushed.is_err() {
                break 'outer false;
            }
        }
        c.finish().is_ok()
    };
    match frames.iter().position(|f| !matches!(f, Frame::Chunks { .. })) {
        Some(k) => {
            assert_eq!(chunks, frames[..k]);
            assert!(!chunks_ok);
        }
        None => {
            assert_eq!(chunks, frames);
            assert_eq!(chunks_ok, ended_ok);
        }
    }
});
