//! A phase spinner on stderr for long interactive work; silent when stderr
//! is not a terminal or output is for scripts.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

pub struct Phase(Option<ProgressBar>);

impl Phase {
    pub fn start(interactive: bool, msg: &'static str) -> Phase {
        if !interactive || !std::io::stderr().is_terminal() {
            return Phase(None);
        }
        let pb = ProgressBar::new_spinner();
        pb.set_style(
            ProgressStyle::with_template("{spinner} {msg} [{elapsed}]").expect("static template"),
        );
        pb.enable_steady_tick(Duration::from_millis(120));
        pb.set_message(msg);
        Phase(Some(pb))
    }

    pub fn next(&self, msg: &'static str) {
        if let Some(pb) = &self.0 {
            pb.set_message(msg);
        }
    }

    pub fn finish(&self) {
        if let Some(pb) = &self.0 {
            pb.finish_and_clear();
        }
    }
}
