//! Content chunking: a file at or below [`SINGLE_CHUNK_MAX`] bytes is one
//! chunk named by its whole-file hash; a larger file is cut with FastCDC
//! (16/64/256 KiB) so that appended or shifted data resends only what
//! changed. No IO: callers hand in the bytes (usually an mmap).
//!
//! Why 4 MiB: a chunked file is hashed twice (whole file for `b3sum`
//! compatibility, then each chunk), and BLAKE3 is the bulk of a cold scan.
//! On a DLRN-like tree 69% of the bytes sit in files over 256 KiB but only
//! 8% in files over 4 MiB, while the packages between those sizes are
//! compressed archives that content-defined chunking rarely dedups.

use std::borrow::Cow;

use bytes::Bytes;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::hash::{ChunkId, FileHash};

/// Files up to this size travel as one chunk.
pub const SINGLE_CHUNK_MAX: u64 = 4 << 20;
/// The largest chunk anyone may send or stage.
pub const MAX_CHUNK: usize = SINGLE_CHUNK_MAX as usize;
/// FastCDC minimum chunk size.
pub const CDC_MIN: usize = 16 * 1024;
/// FastCDC average chunk size.
pub const CDC_AVG: usize = 64 * 1024;
/// FastCDC maximum chunk size.
pub const CDC_MAX: usize = 256 * 1024;
/// Below this, parallel hashing costs more than it saves.
const PARALLEL_MIN: usize = 1 << 20;

/// One chunk of a multi-chunk file, in file order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChunkRef {
    pub id: ChunkId,
    pub len: u32,
}

/// What a file's content hashes to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Content {
    pub size: u64,
    pub hash: FileHash,
    /// Empty for a file of at most [`SINGLE_CHUNK_MAX`] bytes: its single
    /// chunk is named by `hash`.
    pub chunks: Vec<ChunkRef>,
}

/// Hash and chunk `data`, the whole content of one file.
pub fn chunk_content(data: &[u8]) -> Content {
    let size = data.len() as u64;
    if size <= SINGLE_CHUNK_MAX {
        return Content {
            size,
            hash: FileHash::of(data),
            chunks: Vec::new(),
        };
    }
    let cuts: Vec<(usize, usize)> = cut_points(data).collect();
    let (hash, chunks) = if data.len() >= PARALLEL_MIN {
        rayon::join(
            || {
                let mut h = blake3::Hasher::new();
                h.update_rayon(data);
                FileHash::from(h.finalize())
            },
            || {
                cuts.par_iter()
                    .map(|&(off, len)| chunk_ref(&data[off..off + len]))
                    .collect::<Vec<_>>()
            },
        )
    } else {
        let chunks = cuts
            .iter()
            .map(|&(off, len)| chunk_ref(&data[off..off + len]))
            .collect();
        (FileHash::of(data), chunks)
    };
    Content { size, hash, chunks }
}

/// Hash and chunk a file's content as it is read, with bounded buffers
/// (`buf` is reused across calls). `Ok(None)` if the reader does not yield
/// exactly `size` bytes: the file changed under us.
pub fn chunk_reader(
    mut r: impl std::io::Read,
    size: u64,
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<Content>> {
    if size <= SINGLE_CHUNK_MAX {
        buf.resize(READ_PIECE, 0);
        let mut h = blake3::Hasher::new();
        let mut total = 0u64;
        loop {
            let n = match r.read(buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            total += n as u64;
            if total > size {
                return Ok(None);
            }
            h.update(&buf[..n]);
        }
        return Ok((total == size).then(|| Content {
            size,
            hash: h.finalize().into(),
            chunks: Vec::new(),
        }));
    }
    let mut whole = blake3::Hasher::new();
    let mut chunks = Vec::new();
    let mut total = 0u64;
    for c in fastcdc::v2020::StreamCDC::new(r, CDC_MIN, CDC_AVG, CDC_MAX) {
        let c = c.map_err(std::io::Error::from)?;
        total += c.length as u64;
        if total > size {
            return Ok(None);
        }
        whole.update(&c.data);
        chunks.push(chunk_ref(&c.data));
    }
    Ok((total == size).then(|| Content {
        size,
        hash: whole.finalize().into(),
        chunks,
    }))
}

/// Read size for streaming: large enough for BLAKE3's SIMD to run at speed.
const READ_PIECE: usize = 256 * 1024;

fn chunk_ref(piece: &[u8]) -> ChunkRef {
    ChunkRef {
        id: ChunkId::of(piece),
        len: piece.len() as u32,
    }
}

/// (offset, length) of each content-defined chunk of `data`.
pub fn cut_points(data: &[u8]) -> impl Iterator<Item = (usize, usize)> + '_ {
    fastcdc::v2020::FastCDC::new(data, CDC_MIN, CDC_AVG, CDC_MAX).map(|c| (c.offset, c.length))
}

/// The chunks of a file entry as (id, offset, length), whichever form it has.
pub fn chunk_spans(
    size: u64,
    hash: FileHash,
    chunks: &[ChunkRef],
) -> impl Iterator<Item = (ChunkId, u64, u32)> + '_ {
    let single = (chunks.is_empty() && size > 0).then_some((ChunkId::from(hash), 0, size as u32));
    let mut off = 0u64;
    single.into_iter().chain(chunks.iter().map(move |c| {
        let span = (c.id, off, c.len);
        off += c.len as u64;
        span
    }))
}

/// A chunk's bytes as held in memory: one buffer, or the pieces they
/// arrived in (a data stream's received buffers, shared, not copied into
/// one). Equal by content, whatever the pieces.
#[derive(Clone, Default)]
pub struct ChunkBytes {
    parts: Vec<Bytes>,
    len: usize,
}

impl ChunkBytes {
    /// Append a piece (empty ones are dropped).
    pub fn push(&mut self, piece: Bytes) {
        if !piece.is_empty() {
            self.len += piece.len();
            self.parts.push(piece);
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The pieces, in order.
    pub fn parts(&self) -> impl ExactSizeIterator<Item = &[u8]> + '_ {
        self.parts.iter().map(|b| &b[..])
    }

    /// The bytes in one buffer: borrowed when they are one piece.
    pub fn contiguous(&self) -> Cow<'_, [u8]> {
        match self.parts.as_slice() {
            [] => Cow::Borrowed(&[]),
            [one] => Cow::Borrowed(&one[..]),
            _ => Cow::Owned(self.to_vec()),
        }
    }

    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.len);
        self.parts().for_each(|p| v.extend_from_slice(p));
        v
    }

    /// The BLAKE3 of the bytes: the chunk's id if they are what it names.
    /// Hashing in pieces costs BLAKE3 some speed at each boundary (a
    /// 64 KiB piece and the rest of an 86 KB chunk hash about a fifth
    /// slower than one buffer); in a receiver that costs less than the
    /// copy into one buffer it replaces (BENCHMARKS.md).
    pub fn hash(&self) -> ChunkId {
        match self.parts.as_slice() {
            [one] => ChunkId::of(one),
            parts => {
                let mut h = blake3::Hasher::new();
                parts.iter().for_each(|p| {
                    h.update(p);
                });
                h.finalize().into()
            }
        }
    }
}

impl From<Vec<u8>> for ChunkBytes {
    /// Without a copy.
    fn from(v: Vec<u8>) -> ChunkBytes {
        let mut c = ChunkBytes::default();
        c.push(Bytes::from(v));
        c
    }
}

impl PartialEq for ChunkBytes {
    fn eq(&self, other: &ChunkBytes) -> bool {
        self.len == other.len && self.parts().flatten().eq(other.parts().flatten())
    }
}

impl Eq for ChunkBytes {}

impl PartialEq<[u8]> for ChunkBytes {
    fn eq(&self, other: &[u8]) -> bool {
        self.len == other.len() && self.parts().flatten().eq(other.iter())
    }
}

impl std::fmt::Debug for ChunkBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ChunkBytes({} bytes in {} pieces)",
            self.len,
            self.parts.len()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
        let mut out = vec![0; len];
        blake3::Hasher::new()
            .update(&seed.to_le_bytes())
            .finalize_xof()
            .fill(&mut out);
        out
    }

    fn reassemble(data: &[u8], c: &Content) -> Vec<u8> {
        let mut out = Vec::new();
        for (id, off, len) in chunk_spans(c.size, c.hash, &c.chunks) {
            let piece = &data[off as usize..off as usize + len as usize];
            assert_eq!(ChunkId::of(piece), id);
            out.extend_from_slice(piece);
        }
        out
    }

    #[test]
    fn small_file_is_one_chunk_named_by_its_hash() {
        let data = pseudo_random(1000, 1);
        let c = chunk_content(&data);
        assert!(c.chunks.is_empty());
        assert_eq!(c.hash, FileHash::of(&data));
        assert_eq!(chunk_spans(c.size, c.hash, &c.chunks).count(), 1);
        assert_eq!(chunk_spans(0, FileHash::of(b""), &[]).count(), 0);
    }

    #[test]
    fn large_file_whole_hash_matches_b3sum_and_chunks_are_bounded() {
        let data = pseudo_random(9 << 20, 2);
        let c = chunk_content(&data);
        assert_eq!(c.hash, FileHash::of(&data));
        assert!(c.chunks.len() > 4);
        assert!(c.chunks.iter().all(|r| r.len as usize <= CDC_MAX));
        assert_eq!(reassemble(&data, &c), data);
    }

    #[test]
    fn an_insertion_changes_few_chunks() {
        let data = pseudo_random(8 << 20, 3);
        let mut edited = data[..5 << 20].to_vec();
        edited.extend_from_slice(b"inserted bytes");
        edited.extend_from_slice(&data[5 << 20..]);
        let a = chunk_content(&data);
        let b = chunk_content(&edited);
        let old: std::collections::HashSet<_> = a.chunks.iter().map(|c| c.id).collect();
        let new = b.chunks.iter().filter(|c| !old.contains(&c.id)).count();
        assert!(new <= 3, "{new} new chunks after a small insertion");
    }

    #[test]
    fn streaming_matches_in_memory_and_detects_a_size_change() {
        let mut buf = Vec::new();
        for len in [0, 1, 300_000, 4 << 20, (4 << 20) + 1, 9 << 20] {
            let data = pseudo_random(len, len as u64);
            let streamed = chunk_reader(&data[..], len as u64, &mut buf).unwrap();
            assert_eq!(streamed, Some(chunk_content(&data)), "len {len}");
            if len > 0 {
                assert_eq!(
                    chunk_reader(&data[..], len as u64 - 1, &mut buf).unwrap(),
                    None
                );
                assert_eq!(
                    chunk_reader(&data[..], len as u64 + 1, &mut buf).unwrap(),
                    None
                );
            }
        }
    }

    #[test]
    fn chunk_bytes_in_pieces_are_their_concatenation() {
        let data = pseudo_random(300_000, 9);
        let cut_lists = [
            vec![],
            vec![0, 1],
            vec![1024, 1025, 70_000],
            vec![500, 700, 1500, 2048, 2049, 4000],
            vec![299_999],
        ];
        for cuts in cut_lists {
            let mut c = ChunkBytes::default();
            let mut at = 0;
            for cut in cuts.into_iter().chain([data.len()]) {
                c.push(Bytes::copy_from_slice(&data[at..cut]));
                at = cut;
            }
            assert_eq!(c.len(), data.len());
            assert_eq!(c.hash(), ChunkId::of(&data));
            assert_eq!(c.to_vec(), data);
            assert_eq!(&c.contiguous()[..], &data[..]);
            assert!(c == data[..]);
            assert_eq!(c, ChunkBytes::from(data.clone()));
        }
        let mut other = ChunkBytes::from(data.clone());
        other.push(Bytes::from_static(b"x"));
        assert_ne!(other, ChunkBytes::from(data.clone()));
        assert!(ChunkBytes::default().is_empty());
        assert_eq!(ChunkBytes::default().hash(), ChunkId::of(b""));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn chunks_reassemble(len in prop_oneof![0usize..1_000_000, 4_000_000usize..7_000_000], seed in any::<u64>()) {
            let data = pseudo_random(len, seed);
            let c = chunk_content(&data);
            prop_assert_eq!(c.size, len as u64);
            prop_assert_eq!(reassemble(&data, &c), data);
        }
    }
}
