//! A byte-rate limit shared by every stream it is given to: a token bucket
//! that lets a writer run into debt and then sleeps it off, so that large
//! frames pass whole and the average rate holds over any window longer
//! than the burst. Async (tokio timers), no IO of its own.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// At most `rate` bytes per second on average, in bursts of `burst`.
#[derive(Debug)]
pub struct RateLimit {
    rate: f64,
    burst: f64,
    bucket: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    /// Bytes that may go now; negative while writers owe time.
    tokens: f64,
    at: Instant,
}

impl RateLimit {
    /// A limit of `bytes_per_sec`, allowing a burst of a quarter second
    /// (at least 64 KiB) after an idle spell.
    pub fn new(bytes_per_sec: u64) -> RateLimit {
        let rate = bytes_per_sec.max(1) as f64;
        let burst = (rate / 4.0).max(65536.0);
        RateLimit {
            rate,
            burst,
            bucket: Mutex::new(Bucket {
                tokens: burst,
                at: Instant::now(),
            }),
        }
    }

    pub fn bytes_per_sec(&self) -> u64 {
        self.rate as u64
    }

    /// Account for `bytes` about to be written, waiting as long as the
    /// rate requires.
    pub async fn acquire(&self, bytes: usize) {
        let wait = {
            let mut b = self.bucket.lock().expect("rate limit lock");
            let now = Instant::now();
            let refill = now.duration_since(b.at).as_secs_f64() * self.rate;
            b.tokens = (b.tokens + refill).min(self.burst);
            b.at = now;
            b.tokens -= bytes as f64;
            if b.tokens < 0.0 {
                Duration::from_secs_f64(-b.tokens / self.rate)
            } else {
                Duration::ZERO
            }
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn holds_the_rate_across_writers() {
        let limit = Arc::new(RateLimit::new(1 << 20));
        let start = Instant::now();
        // Four writers, 256 KiB each in 16 KiB frames: 1 MiB at 1 MiB/s,
        // less the initial burst of 256 KiB.
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let l = limit.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..16 {
                    l.acquire(16 << 10).await;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let took = start.elapsed().as_secs_f64();
        assert!((0.74..2.0).contains(&took), "took {took} s");
    }

    #[tokio::test]
    async fn a_frame_larger_than_the_burst_passes_and_is_paid_for() {
        let limit = RateLimit::new(1_000_000);
        let start = Instant::now();
        limit.acquire(1_000_000).await;
        limit.acquire(1).await;
        let took = start.elapsed().as_secs_f64();
        assert!((0.74..2.0).contains(&took), "took {took} s");
        // Idle time refills at most one burst (a quarter second's worth).
        tokio::time::sleep(Duration::from_millis(400)).await;
        let start = Instant::now();
        limit.acquire(250_000).await;
        assert!(start.elapsed() < Duration::from_millis(50));
        let start = Instant::now();
        limit.acquire(100_000).await;
        assert!(start.elapsed() >= Duration::from_millis(95));
    }
}
