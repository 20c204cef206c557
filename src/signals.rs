//! Signals: Ctrl-C and SIGTERM ask training to stop cleanly after the current step (a second one,
//! half a second or more later, stops at once, saying so); SIGXFSZ (a file-size limit) becomes a write error that names the file instead
//! of killing the process without a word; SIGBUS in a memory-mapped cache that shrank names the
//! file ([`mapped`]).

pub mod mapped;

use crate::error::{Error, Result};
use signal_hook::consts::{SIGINT, SIGTERM, SIGXFSZ};
use signal_hook::SigId;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// Exit status of a second Ctrl-C / SIGTERM (128 + SIGINT, as shells report it).
const ABORT_STATUS: i32 = 130;

/// A second signal this soon after the first is the same request, delivered twice.
const SAME_REQUEST_NS: u64 = 500_000_000;

/// CLOCK_MONOTONIC in ns (clock_gettime is async-signal-safe).
fn monotonic_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    (t.tv_sec as u64).saturating_mul(1_000_000_000) + t.tv_nsec as u64
}

/// A pending request to stop, set by Ctrl-C or SIGTERM while this guard lives.
pub struct StopRequest {
    flag: Arc<AtomicBool>,
    ids: Vec<SigId>,
}

impl StopRequest {
    pub fn install() -> Result<Self> {
        let flag = Arc::new(AtomicBool::new(false));
        // When the first signal came (monotonic ns; 0 before it).
        let first = Arc::new(AtomicU64::new(0));
        let mut ids = Vec::new();
        for sig in [SIGINT, SIGTERM] {
            let (flag, first) = (flag.clone(), first.clone());
            let action = move || {
                let now = monotonic_ns();
                match first.compare_exchange(0, now, Ordering::SeqCst, Ordering::SeqCst) {
                    Ok(_) => flag.store(true, Ordering::SeqCst),
                    // One request delivered twice (coreutils `timeout` signals the process and
                    // then its group; a scheduler may too) is still the first request.
                    Err(at) if now.saturating_sub(at) < SAME_REQUEST_NS => {}
                    Err(_) => {
                        const SAID: &[u8] = b"\nrefdpo: interrupted again: stopping at once, \
                            without a checkpoint of the step under way\n";
                        // SAFETY: write(2) and _exit are async-signal-safe; SAID is static.
                        unsafe { libc::write(2, SAID.as_ptr().cast(), SAID.len()) };
                        signal_hook::low_level::exit(ABORT_STATUS);
                    }
                }
            };
            // SAFETY: the action only does async-signal-safe work (atomics, clock_gettime,
            // write, _exit): no allocation, no lock.
            let id = unsafe { signal_hook::low_level::register(sig, action) }
                .map_err(|e| Error::Train(format!("cannot install the Ctrl-C handler: {e}")))?;
            ids.push(id);
        }
        Ok(Self { flag, ids })
    }

    pub fn requested(&self) -> bool {
        self.flag.load(Ordering::Relaxed)
    }
}

impl Drop for StopRequest {
    fn drop(&mut self) {
        for id in self.ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}

/// Makes a file-size limit (`ulimit -f`) fail the write (EFBIG) instead of killing the process.
pub fn file_size_limit_as_error() {
    // A handler that only sets a flag nobody reads: the write then returns EFBIG, which the writer
    // reports with the file's name. Failing to install it leaves the default, which is no worse.
    let _ = signal_hook::flag::register(SIGXFSZ, Arc::new(AtomicBool::new(false)));
}
