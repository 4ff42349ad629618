//! Turning a stream of change hints into rescans: directories are marked
//! dirty as events arrive; a batch is released after a quiet period with no
//! new event, or after a maximum delay under steady churn, so a build that
//! writes for minutes still publishes regularly. A lost event stream (queue
//! overflow, a watch that could not be added) asks for a full rescan. Time
//! is passed in; no IO, no clock.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// What to rescan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Batch {
    /// Everything: the hints are incomplete.
    Full,
    /// These directories (relative paths; `b""` is the root).
    Dirs(Vec<Vec<u8>>),
}

#[derive(Debug)]
pub struct Debouncer {
    quiet: Duration,
    max_delay: Duration,
    dirty: BTreeSet<Vec<u8>>,
    full: bool,
    first: Option<Instant>,
    last: Option<Instant>,
}

impl Debouncer {
    pub fn new(quiet: Duration, max_delay: Duration) -> Debouncer {
        Debouncer {
            quiet,
            max_delay: max_delay.max(quiet),
            dirty: BTreeSet::new(),
            full: false,
            first: None,
            last: None,
        }
    }

    fn touch(&mut self, now: Instant) {
        self.first.get_or_insert(now);
        self.last = Some(now);
    }

    /// A change under the directory `dir`.
    pub fn mark(&mut self, dir: Vec<u8>, now: Instant) {
        if !self.full {
            self.dirty.insert(dir);
        }
        self.touch(now);
    }

    /// The hints were lost: the next batch is a full rescan.
    pub fn mark_full(&mut self, now: Instant) {
        self.full = true;
        self.dirty.clear();
        self.touch(now);
    }

    pub fn is_pending(&self) -> bool {
        self.first.is_some()
    }

    /// When the pending batch is due, if any.
    pub fn deadline(&self) -> Option<Instant> {
        let (first, last) = (self.first?, self.last?);
        Some((last + self.quiet).min(first + self.max_delay))
    }

    /// The batch, once it is due.
    pub fn poll(&mut self, now: Instant) -> Option<Batch> {
        if now < self.deadline()? {
            return None;
        }
        self.first = None;
        self.last = None;
        if std::mem::take(&mut self.full) {
            return Some(Batch::Full);
        }
        Some(Batch::Dirs(
            std::mem::take(&mut self.dirty).into_iter().collect(),
        ))
    }

    /// Put a batch back (its rescan failed, e.g. a file was still being
    /// written): it is retried after another quiet period.
    pub fn retry(&mut self, batch: Batch, now: Instant) {
        match batch {
            Batch::Full => self.mark_full(now),
            Batch::Dirs(dirs) => {
                for d in dirs {
                    self.mark(d, now);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn waits_for_quiet_then_releases_once() {
        let t0 = Instant::now();
        let mut d = Debouncer::new(100 * MS, 1000 * MS);
        assert_eq!(d.poll(t0), None);
        d.mark(b"a".to_vec(), t0);
        d.mark(b"b".to_vec(), t0 + 50 * MS);
        assert_eq!(d.deadline(), Some(t0 + 150 * MS));
        assert_eq!(d.poll(t0 + 149 * MS), None);
        assert_eq!(
            d.poll(t0 + 150 * MS),
            Some(Batch::Dirs(vec![b"a".to_vec(), b"b".to_vec()]))
        );
        assert_eq!(d.poll(t0 + 500 * MS), None);
        assert!(!d.is_pending());
    }

    #[test]
    fn steady_churn_is_released_at_the_maximum_delay() {
        let t0 = Instant::now();
        let mut d = Debouncer::new(100 * MS, 300 * MS);
        let mut released = None;
        for i in 0..100u32 {
            let now = t0 + i * 20 * MS;
            if let Some(b) = d.poll(now) {
                released = Some((i, b));
                break;
            }
            d.mark(format!("d{i}").into_bytes(), now);
        }
        let (i, b) = released.expect("released under churn");
        assert_eq!(i, 15, "at 300 ms");
        assert!(matches!(b, Batch::Dirs(v) if v.len() == 15));
    }

    #[test]
    fn overflow_turns_the_batch_into_a_full_rescan() {
        let t0 = Instant::now();
        let mut d = Debouncer::new(10 * MS, 100 * MS);
        d.mark(b"a".to_vec(), t0);
        d.mark_full(t0);
        d.mark(b"b".to_vec(), t0);
        assert_eq!(d.poll(t0 + 10 * MS), Some(Batch::Full));
        d.retry(Batch::Dirs(vec![b"c".to_vec()]), t0 + 20 * MS);
        assert_eq!(d.poll(t0 + 30 * MS), Some(Batch::Dirs(vec![b"c".to_vec()])));
    }
}
