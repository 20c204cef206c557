//! Signals: Ctrl-C and SIGTERM ask training to stop cleanly after the current step (a second one
//! stops at once); SIGXFSZ (a file-size limit) becomes a write error that names the file instead
//! of killing the process without a word.

use crate::error::{Error, Result};
use signal_hook::consts::{SIGINT, SIGTERM, SIGXFSZ};
use signal_hook::SigId;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Exit status of a second Ctrl-C / SIGTERM (128 + SIGINT, as shells report it).
const ABORT_STATUS: i32 = 130;

/// A pending request to stop, set by Ctrl-C or SIGTERM while this guard lives.
pub struct StopRequest {
    flag: Arc<AtomicBool>,
    ids: Vec<SigId>,
}

impl StopRequest {
    pub fn install() -> Result<Self> {
        let flag = Arc::new(AtomicBool::new(false));
        let mut ids = Vec::new();
        for sig in [SIGINT, SIGTERM] {
            // Registered first, so it sees the flag as the previous signal left it: a second
            // signal exits at once.
            ids.push(
                signal_hook::flag::register_conditional_shutdown(sig, ABORT_STATUS, flag.clone())
                    .map_err(|e| Error::Train(format!("cannot install the Ctrl-C handler: {e}")))?,
            );
            ids.push(
                signal_hook::flag::register(sig, flag.clone())
                    .map_err(|e| Error::Train(format!("cannot install the Ctrl-C handler: {e}")))?,
            );
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
