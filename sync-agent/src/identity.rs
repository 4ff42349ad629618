//! Agent identities: a self-signed certificate and key per agent, pinned by
//! fingerprint (BLAKE3 of the DER certificate, 64 hex digits) instead of a
//! CA. Blocking file IO only (load and write of the PEM files).

use std::fmt;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

pub const CERT_FILE: &str = "cert.pem";
pub const KEY_FILE: &str = "key.pem";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no usable PEM {what}")]
    Pem { path: PathBuf, what: &'static str },
    #[error("{0} already exists; refusing to overwrite an identity")]
    Exists(PathBuf),
    #[error("cannot generate a certificate: {0}")]
    Generate(String),
    #[error("invalid fingerprint {0:?}: expected 64 hex digits")]
    BadFingerprint(String),
}

/// The pinned name of a peer: BLAKE3 of its DER certificate.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    pub fn of(cert: &CertificateDer<'_>) -> Fingerprint {
        Fingerprint(*blake3::hash(cert.as_ref()).as_bytes())
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&sync_core::hash::to_hex(&self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", &self.to_string()[..12])
    }
}

impl FromStr for Fingerprint {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse::<sync_core::ChunkId>()
            .map(|id| Fingerprint(id.0))
            .map_err(|_| IdentityError::BadFingerprint(s.to_string()))
    }
}

/// A loaded identity: certificate chain (one self-signed cert) and key.
pub struct Identity {
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

impl Identity {
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(&self.cert)
    }

    /// Load `cert.pem` and `key.pem` from `dir`.
    pub fn load(dir: &Path) -> Result<Identity, IdentityError> {
        let cert_path = dir.join(CERT_FILE);
        let key_path = dir.join(KEY_FILE);
        let read = |p: &Path| {
            std::fs::read(p).map_err(|source| IdentityError::Read {
                path: p.to_path_buf(),
                source,
            })
        };
        let cert =
            CertificateDer::from_pem_slice(&read(&cert_path)?).map_err(|_| IdentityError::Pem {
                path: cert_path.clone(),
                what: "certificate",
            })?;
        let key =
            PrivateKeyDer::from_pem_slice(&read(&key_path)?).map_err(|_| IdentityError::Pem {
                path: key_path.clone(),
                what: "private key",
            })?;
        Ok(Identity { cert, key })
    }

    /// Create a new identity in `dir` (created if needed; existing files are
    /// never overwritten). The key file is readable by its owner only.
    pub fn generate(dir: &Path, name: &str) -> Result<Identity, IdentityError> {
        let cert_path = dir.join(CERT_FILE);
        let key_path = dir.join(KEY_FILE);
        for p in [&cert_path, &key_path] {
            if p.exists() {
                return Err(IdentityError::Exists(p.clone()));
            }
        }
        std::fs::create_dir_all(dir).map_err(|source| IdentityError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
        let ck = rcgen::generate_simple_self_signed(vec![name.to_string()])
            .map_err(|e| IdentityError::Generate(e.to_string()))?;
        write_new(&key_path, ck.signing_key.serialize_pem().as_bytes(), 0o600)?;
        write_new(&cert_path, ck.cert.pem().as_bytes(), 0o644)?;
        Identity::load(dir)
    }
}

fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), IdentityError> {
    let err = |source| IdentityError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    f.write_all(data).map_err(err)?;
    f.sync_all().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_load_and_refuse_overwrite() {
        let d = tempfile::tempdir().unwrap();
        let a = Identity::generate(d.path(), "a").unwrap();
        let b = Identity::load(d.path()).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert!(matches!(
            Identity::generate(d.path(), "a"),
            Err(IdentityError::Exists(_))
        ));
        let fp = a.fingerprint().to_string();
        assert_eq!(fp.parse::<Fingerprint>().unwrap(), a.fingerprint());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(d.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
