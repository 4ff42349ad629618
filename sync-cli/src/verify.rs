//! `sync-cli verify DEST`: re-read a mirror and compare it with its
//! committed manifest. Exit 0 only when clean, 3 when it differs.

use std::io::Write;

use anyhow::Context;
use serde::Serialize;
use sync_core::commit::Receiver;
use sync_core::verify::VerifyOptions as CoreVerify;

use crate::exit::{Outcome, DIFFERENCES};
use crate::progress::Phase;
use crate::VerifyOptions;

#[derive(Serialize)]
struct Report<'a> {
    root: String,
    clean: bool,
    entries: u64,
    missing: u64,
    extra: u64,
    modified: u64,
    files_hashed: u64,
    bytes_hashed: u64,
    examples: &'a [sync_core::verify::Issue],
}

pub fn run(o: VerifyOptions) -> Outcome {
    let phase = Phase::start(!o.json, "verifying");
    let recv = Receiver::open(&o.dest, o.state.as_deref())
        .with_context(|| format!("opening {}", o.dest.display()))?;
    let r = recv.verify(&CoreVerify {
        content: !o.fast,
        owners: o.owners,
        max_examples: o.examples,
    })?;
    phase.finish();
    let clean = r.is_clean();
    let mut out = std::io::stdout().lock();
    if o.json {
        let report = Report {
            root: recv.committed().snapshot().to_hex(),
            clean,
            entries: r.entries,
            missing: r.missing,
            extra: r.extra,
            modified: r.modified,
            files_hashed: r.files_hashed,
            bytes_hashed: r.bytes_hashed,
            examples: &r.examples,
        };
        serde_json::to_writer(&mut out, &report)?;
        writeln!(out)?;
    } else {
        write!(out, "{r}")?;
    }
    Ok(if clean { 0 } else { DIFFERENCES })
}
