//! `sync-cli keygen` and `sync-cli fingerprint`: create or show the
//! pinned identity (self-signed certificate and key) of an agent or client.

use std::io::Write;

use anyhow::Context;
use sync_agent::identity::Identity;

use crate::exit::Outcome;
use crate::{FingerprintOptions, KeygenOptions};

fn print(fp: String, json: bool) -> Outcome {
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer(&mut out, &serde_json::json!({ "fingerprint": fp }))?;
        writeln!(out)?;
    } else {
        writeln!(out, "{fp}")?;
    }
    Ok(0)
}

pub fn keygen(o: KeygenOptions) -> Outcome {
    let host = o.name.unwrap_or_else(|| "sync-agent".to_string());
    let id = Identity::generate(&o.out, &host)
        .with_context(|| format!("creating an identity in {}", o.out.display()))?;
    print(id.fingerprint().to_string(), o.json)
}

pub fn fingerprint(o: FingerprintOptions) -> Outcome {
    let id = Identity::load(&o.dir)
        .with_context(|| format!("loading the identity in {}", o.dir.display()))?;
    print(id.fingerprint().to_string(), o.json)
}
