//! A freshly made ext4 filesystem (default options, with its journal) on a
//! loop device over an image (direct IO, so the image's writes go to the
//! disk as a real block device's would, not through a second page cache
//! that costs CPU), made anew before each write-heavy timed run: every
//! tool then starts on the same clean disk, as a new mirror does, instead
//! of on a work directory where the previous round just deleted ~100k
//! inodes. (On this machine's journal-less ext4, each inode allocation
//! steps over every recently deleted inode of its group: the first runs
//! after a big delete took 2-3x longer, for every tool, depending on the
//! order of the round.)

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use super::measure::{run, sync};

/// Bytes of an image for `copies` copies of a tree of `bytes` and
/// `entries` (at mkfs's default inode ratio, 16 KiB each, with room), plus
/// the journal; whole MiB (see [`fill`]).
pub fn image_size(bytes: u64, entries: usize, copies: u64) -> u64 {
    let size = (bytes * copies)
        .max(entries as u64 * (32 << 10))
        .max(1 << 30)
        + (JOURNAL_MIB << 20);
    size.next_multiple_of(1 << 20)
}

/// The journal of the fresh filesystem: what mkfs.ext4 gives a filesystem
/// of 128 GiB or more, as a mirror's is, while a small image would get
/// 64 MiB. With the small journal every tool's metadata-heavy work (each
/// new symlink of more than 60 bytes writes a whole block through it)
/// waits on checkpoints: 84,500 such symlinks take 4.1 s instead of 2.5 s.
pub const JOURNAL_MIB: u64 = 1024;

/// Where one timed initial run writes `dest`: under the same name on a
/// filesystem made anew (and synced), or `dest` itself once `clear` has
/// emptied it when there is no such filesystem.
pub fn fresh_dest(
    disk: Option<&mut FreshFs>,
    dest: &Path,
    clear: impl FnOnce() -> Result<()>,
) -> Result<PathBuf> {
    match disk {
        Some(fs) => {
            let mnt = fs.remake()?.to_path_buf();
            sync();
            Ok(mnt.join(dest.file_name().context("a destination name")?))
        }
        None => {
            clear()?;
            Ok(dest.to_path_buf())
        }
    }
}

pub struct FreshFs {
    image: PathBuf,
    mnt: PathBuf,
    size: u64,
    /// The journal's size in MiB; `None`: mkfs's choice for the size.
    journal_mib: Option<u64>,
    /// The loop device while mounted.
    mounted: Option<PathBuf>,
}

/// Write every block of a sparse image once (zeros), so that no timed run
/// writes into a hole: with direct IO, the filesystem under the image then
/// allocates the block during the write. A real mirror's disk has no
/// holes. (This did not end the slow first run after an image is made:
/// the QUIC suite makes one untimed run of each side first.)
fn fill(path: &Path, size: u64) -> std::io::Result<()> {
    use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
    if std::fs::metadata(path)?.blocks() * 512 >= size {
        return Ok(());
    }
    // Past the page cache (O_DIRECT): gigabytes of zeros would otherwise
    // push out the source's pages and churn memory. It wants buffers,
    // offsets and lengths in whole blocks: the size is whole MiB
    // ([`image_size`]) and the buffer starts at a 4 KiB boundary.
    let img = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)?;
    const PIECE: usize = 8 << 20;
    let buf = vec![0u8; PIECE + 4096];
    let zeros = &buf[buf.as_ptr().align_offset(4096)..][..PIECE];
    let mut at = 0;
    while at < size {
        let n = PIECE.min((size - at) as usize);
        img.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    img.sync_all()
}

impl FreshFs {
    /// An image of `size` bytes (whole MiB, written through once) under
    /// `dir`; `None` (with the
    /// reason printed) where this process may not make and mount one.
    pub fn try_new(dir: &Path, size: u64) -> Option<FreshFs> {
        Self::try_with_journal(dir, size, Some(JOURNAL_MIB))
    }

    /// As [`FreshFs::try_new`], with a journal of `journal_mib` MiB, or
    /// mkfs's default for the size (`None`).
    pub fn try_with_journal(dir: &Path, size: u64, journal_mib: Option<u64>) -> Option<FreshFs> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("bench: not root: initial runs use the work directory");
            return None;
        }
        let mut fs = FreshFs {
            image: dir.join("fresh-fs.img"),
            mnt: dir.join("fresh-fs"),
            size,
            journal_mib,
            mounted: None,
        };
        match fs.remake() {
            Ok(_) => Some(fs),
            Err(e) => {
                eprintln!("bench: no loop-mounted filesystem ({e:#}): initial runs use the work directory");
                None
            }
        }
    }

    /// Unmount, make a new filesystem over the image, mount it; returns
    /// the mount point. Inode tables and journal are written by mkfs, so
    /// no lazy initialisation runs in the background of a timed run.
    pub fn remake(&mut self) -> Result<&Path> {
        self.unmount()?;
        std::fs::create_dir_all(&self.mnt)?;
        let img = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&self.image)
            .with_context(|| format!("create {}", self.image.display()))?;
        img.set_len(self.size)?;
        drop(img);
        fill(&self.image, self.size).with_context(|| format!("fill {}", self.image.display()))?;
        let mut mkfs = Command::new("mkfs.ext4");
        mkfs.args([
            "-q",
            "-F",
            "-E",
            "nodiscard,lazy_itable_init=0,lazy_journal_init=0",
        ]);
        if let Some(mib) = self.journal_mib {
            mkfs.args(["-J", &format!("size={mib}")]);
        }
        run(mkfs.arg(&self.image))?;
        let dev = run(Command::new("losetup")
            .args(["-f", "--direct-io=on", "--show"])
            .arg(&self.image))?;
        let dev = PathBuf::from(String::from_utf8_lossy(&dev.stdout).trim());
        if let Err(e) = run(Command::new("mount").arg(&dev).arg(&self.mnt)) {
            let _ = Command::new("losetup").arg("-d").arg(&dev).status();
            return Err(e);
        }
        self.mounted = Some(dev);
        Ok(&self.mnt)
    }

    /// Where the filesystem is mounted (by [`FreshFs::remake`]).
    pub fn mount_point(&self) -> &Path {
        &self.mnt
    }

    /// The image file the loop device reads and writes (directly: what it
    /// holds is what the disk would hold).
    pub fn image(&self) -> &Path {
        &self.image
    }

    /// Unmount and free the loop device. A process that has just been
    /// killed (an rsync daemon's connection child) may hold the mount for a
    /// moment: retried for a few seconds, then an error.
    fn unmount(&mut self) -> Result<()> {
        let Some(dev) = self.mounted.take() else {
            return Ok(());
        };
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            // Busy while the last receiver exits: retried quietly.
            let st = Command::new("umount")
                .arg(&self.mnt)
                .stderr(std::process::Stdio::null())
                .status()?;
            if st.success() {
                break;
            }
            if std::time::Instant::now() > end {
                self.mounted = Some(dev);
                anyhow::bail!("cannot unmount {}: still busy", self.mnt.display());
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = Command::new("losetup").arg("-d").arg(&dev).status();
        Ok(())
    }
}

impl Drop for FreshFs {
    fn drop(&mut self) {
        if self.unmount().is_err() {
            // Still held after the retries: detach it lazily (it goes away
            // with its last user) rather than leave it mounted.
            if let Some(dev) = self.mounted.take() {
                let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
                let _ = Command::new("losetup").arg("-d").arg(&dev).status();
            }
        }
        let _ = std::fs::remove_file(&self.image);
        let _ = std::fs::remove_dir(&self.mnt);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// A sparse image ends with every block written (zeros), through
    /// O_DIRECT, on a disk filesystem (the crate's directory; tmpfs has no
    /// O_DIRECT).
    #[test]
    fn fill_writes_every_block_of_a_sparse_image() {
        let dir = tempfile::tempdir_in(".").unwrap();
        let img = dir.path().join("img");
        let size = 9 << 20; // more than one piece
        std::fs::File::create(&img).unwrap().set_len(size).unwrap();
        assert!(std::fs::metadata(&img).unwrap().blocks() * 512 < size);
        fill(&img, size).unwrap();
        let m = std::fs::metadata(&img).unwrap();
        assert_eq!(m.len(), size);
        assert!(m.blocks() * 512 >= size);
        assert!(std::fs::read(&img).unwrap().iter().all(|&b| b == 0));
    }

    #[test]
    fn images_are_whole_mib() {
        let size = image_size(1_000_003, 10, 3000);
        assert_eq!(size % (1 << 20), 0);
        assert!(size >= 3_000_009_000 + (JOURNAL_MIB << 20));
    }
}
