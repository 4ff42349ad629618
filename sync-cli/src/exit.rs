//! Exit codes, documented in the README:
//! 0 success; 1 the command failed (error printed); 2 bad usage (clap);
//! 3 `verify` found differences.

use std::process::ExitCode;

pub const FAILURE: u8 = 1;
pub const DIFFERENCES: u8 = 3;

/// What a command returns: the exit code it wants on success.
pub type Outcome = anyhow::Result<u8>;

pub fn report(result: Outcome) -> ExitCode {
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // A closed pipe (`| head`) is not a failure worth a message.
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                return ExitCode::SUCCESS;
            }
            eprintln!("sync-cli: error: {}", chain(&e));
            ExitCode::from(FAILURE)
        }
    }
}

/// The error and its causes, skipping a cause whose text the message
/// before it already carries (library errors often embed their source).
pub fn chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}
