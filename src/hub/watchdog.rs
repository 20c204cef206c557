//! A hub that stops answering, as an error: hf-hub's client sets no read timeout.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// hf-hub's client sets no read timeout: a hub that keeps the connection open and sends nothing
/// would hang the run. The watchdog ends the process with an error once no byte has come for
/// `HF_HUB_DOWNLOAD_TIMEOUT` seconds (huggingface_hub's variable; default 60 here, where
/// huggingface_hub gives up after 5 tries of 10 s). What was downloaded stays in the cache's
/// `.part` file, and a rerun resumes it.
pub(super) struct Watchdog {
    done: Arc<AtomicBool>,
    /// Milliseconds since `start` at the last sign of life.
    last: Arc<AtomicU64>,
    start: Instant,
    /// What is being fetched.
    what: Arc<Mutex<String>>,
}

impl Watchdog {
    pub(super) fn start(endpoint: String) -> Self {
        let limit = std::env::var("HF_HUB_DOWNLOAD_TIMEOUT")
            .ok()
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s > 0.0)
            .unwrap_or(60.0);
        let dog = Self {
            done: Arc::default(),
            last: Arc::default(),
            start: Instant::now(),
            what: Arc::default(),
        };
        let (done, last, what, start) = (
            dog.done.clone(),
            dog.last.clone(),
            dog.what.clone(),
            dog.start,
        );
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(250));
                let now = start.elapsed().as_millis() as u64;
                let quiet = now.saturating_sub(last.load(Ordering::Relaxed));
                if quiet as f64 > limit * 1e3 && !done.load(Ordering::Relaxed) {
                    let what = what.lock().map(|w| w.clone()).unwrap_or_default();
                    crate::error::note!(
                        "error: the hub at {endpoint} stopped answering: nothing came for {limit} s \
                         while fetching {what}. Check the network and HF_ENDPOINT (a rerun resumes \
                         the download; HF_HUB_DOWNLOAD_TIMEOUT sets the wait)"
                    );
                    std::process::exit(1);
                }
            }
        });
        dog
    }

    /// A sign of life: a request begins, or bytes came.
    fn alive(&self) {
        let now = self.start.elapsed().as_millis() as u64;
        self.last.store(now, Ordering::Relaxed);
    }

    pub(super) fn fetching(&self, what: String) {
        if let Ok(mut w) = self.what.lock() {
            *w = what;
        }
        self.alive();
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
    }
}

/// hf-hub's download progress as the watchdog's signs of life.
pub(super) struct Alive<'a>(pub(super) &'a Watchdog);

impl hf_hub::api::Progress for Alive<'_> {
    fn init(&mut self, _size: usize, _filename: &str) {
        self.0.alive();
    }
    fn update(&mut self, _size: usize) {
        self.0.alive();
    }
    fn finish(&mut self) {
        self.0.alive();
    }
}
