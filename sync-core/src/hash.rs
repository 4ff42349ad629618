//! Identities: BLAKE3-256 newtypes for chunks, files, tree objects and
//! snapshots. Hex in text, raw 32 bytes in binary. No IO.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Error parsing a hex identity.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid hash {0:?}: expected 64 hex digits")]
pub struct ParseIdError(pub String);

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            /// The BLAKE3 hash of `data`.
            pub fn of(data: &[u8]) -> Self {
                Self(*blake3::hash(data).as_bytes())
            }
            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }
            pub fn to_hex(&self) -> String {
                to_hex(&self.0)
            }
            /// The first 12 hex digits, for logs and human output.
            pub fn short(&self) -> String {
                to_hex(&self.0[..6])
            }
        }

        impl From<blake3::Hash> for $name {
            fn from(h: blake3::Hash) -> Self {
                Self(*h.as_bytes())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.short())
            }
        }

        impl FromStr for $name {
            type Err = ParseIdError;
            fn from_str(s: &str) -> Result<Self, ParseIdError> {
                from_hex(s).map(Self).ok_or_else(|| ParseIdError(s.to_string()))
            }
        }
    };
}

id_type!(
    /// A chunk of file content, named by the BLAKE3 of its bytes.
    ChunkId
);
id_type!(
    /// The BLAKE3 of a whole file (what `b3sum` prints).
    FileHash
);
id_type!(
    /// A tree object (one directory), named by the BLAKE3 of its encoding.
    TreeId
);
id_type!(
    /// A snapshot: the root tree id of a manifest.
    SnapshotId
);

impl From<TreeId> for SnapshotId {
    fn from(t: TreeId) -> Self {
        SnapshotId(t.0)
    }
}

impl From<SnapshotId> for TreeId {
    fn from(s: SnapshotId) -> Self {
        TreeId(s.0)
    }
}

impl From<FileHash> for ChunkId {
    /// A file of a single chunk is stored under its whole-file hash.
    fn from(h: FileHash) -> Self {
        ChunkId(h.0)
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

pub fn to_hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
    s
}

fn from_hex(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let nib = |c: u8| -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    };
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = (nib(b[2 * i])? << 4) | nib(b[2 * i + 1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_vector() {
        // b3sum of the empty input.
        assert_eq!(
            FileHash::of(b"").to_hex(),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
    }

    #[test]
    fn rejects_bad_hex() {
        assert!("zz".parse::<ChunkId>().is_err());
        assert!("g".repeat(64).parse::<ChunkId>().is_err());
    }

    proptest! {
        #[test]
        fn hex_round_trip(bytes in any::<[u8; 32]>()) {
            let id = TreeId(bytes);
            prop_assert_eq!(id.to_string().parse::<TreeId>().unwrap(), id);
        }
    }
}
