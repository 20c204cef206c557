//! Live heap bytes and their high-water mark, counted by the `refdpo` binary's global allocator
//! ([`Counting`]). On the CPU every tensor is a heap allocation, so the mark is the run's tensor
//! memory (plus the host's own data) at its worst: `--profile` reports it per phase. Where the
//! allocator is not installed (the library's tests), nothing is counted and [`counting`] says so.
//!
//! The same allocator bounds code that runs a program refdpo does not trust: a chat template can
//! double a string in a recursive macro and reach gigabytes in thirty instructions, or copy a
//! growing list on every one of 100,000 loop turns for hours, under any instruction budget and
//! without writing a byte. While a [`ThreadCap`] lives, the bytes its thread allocates and has
//! not freed are counted and its allocations timed, and past either cap the process stops with
//! an `error:` saying what ran away (exit code 1), where it would otherwise abort for memory or
//! run on.
//!
//! And where the system has no memory left to give (a container's limit, `ulimit -v`), the
//! process stops with an `error:` saying so and what to lower (exit code 1), not with Rust's
//! abort ("memory allocation of N bytes failed", SIGABRT, a core dump).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// The system allocator, counting live bytes.
pub struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(bytes: usize) {
    let now = LIVE.fetch_add(bytes, Relaxed) + bytes;
    if now > PEAK.load(Relaxed) {
        PEAK.fetch_max(now, Relaxed);
    }
}

fn shrank(bytes: usize) {
    LIVE.fetch_sub(bytes, Relaxed);
}

/// The smallest cap a [`ThreadCap`] sets.
pub const MIN_CAP: usize = 256 << 20;

/// How often (in allocations) a capped thread reads the clock.
const CLOCK_EVERY: u32 = 64;

#[derive(Clone, Copy)]
struct Cap {
    limit: usize,
    /// Bytes allocated on this thread since the cap began, less those freed on it.
    live: isize,
    seconds: u64,
    until: Instant,
    allocs: u32,
    what: &'static str,
}

thread_local! {
    /// This thread's cap, while a [`ThreadCap`] lives.
    static CAP: Cell<Option<Cap>> = const { Cell::new(None) };
}

/// Caps what this thread allocates and keeps, from now until the guard drops, at `bytes` (at
/// least [`MIN_CAP`]), and its time at `seconds` (the clock is read every few allocations, so
/// work that allocates nothing is not timed). Past either the process exits with
/// `error: {what}` and the bound it passed.
pub fn cap_thread(bytes: usize, seconds: u64, what: &'static str) -> ThreadCap {
    let before = CAP.with(Cell::get);
    let cap = Cap {
        // at most isize::MAX: `live` is compared as isize (usize::MAX would read as -1)
        limit: bytes.clamp(MIN_CAP, isize::MAX as usize),
        live: 0,
        seconds,
        until: Instant::now() + Duration::from_secs(seconds),
        allocs: 0,
        what,
    };
    CAP.with(|c| c.set(Some(cap)));
    ThreadCap(before)
}

/// The cap of [`cap_thread`], lifted when it drops (the one before it, if any, back in force).
pub struct ThreadCap(Option<Cap>);

impl Drop for ThreadCap {
    fn drop(&mut self) {
        CAP.with(|c| c.set(self.0));
    }
}

/// `delta` bytes allocated (freed where negative) on this thread, checked against its cap.
#[inline]
fn on_thread(delta: isize) {
    // `try_with`: an allocation while the thread's locals are torn down is not counted.
    let _ = CAP.try_with(|c| {
        let Some(mut cap) = c.get() else { return };
        cap.live += delta;
        if delta <= 0 {
            c.set(Some(cap));
            return;
        }
        cap.allocs = cap.allocs.wrapping_add(1);
        c.set(Some(cap));
        if cap.live > cap.limit as isize {
            c.set(None);
            exit_with(format_args!(
                "{} (it kept more than {} MiB)",
                cap.what,
                cap.limit >> 20
            ));
        }
        if cap.allocs % CLOCK_EVERY == 0 && Instant::now() > cap.until {
            c.set(None);
            exit_with(format_args!("{} (it ran past {} s)", cap.what, cap.seconds));
        }
    });
}

/// The system refused `bytes`: says so, with what to lower, and exits (see [`exit_with`]).
///
/// Every failed request ends here, `try_reserve`'s too: refdpo recovers from none, and a library
/// that would is still better stopped with this line than left to fail further on.
#[cold]
fn out_of_memory(bytes: usize) -> ! {
    exit_with(format_args!(
        "out of memory: the system refused {bytes} bytes with {} MiB of refdpo's heap in use. \
         Lower what a step holds at once (`precompute.batch_size`, `train.batch_size` with a \
         larger `train.grad_accum`, `tokenize.max_length`), or raise the memory limit \
         (`ulimit -v`, the container's)",
        live() >> 20
    ))
}

/// Says why and exits, from inside the allocator: the message is formatted on the stack and
/// written straight to stderr, nothing is allocated and no destructor runs.
#[cold]
fn exit_with(why: std::fmt::Arguments<'_>) -> ! {
    struct Line {
        bytes: [u8; 1024],
        len: usize,
    }
    impl std::fmt::Write for Line {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            let n = s.len().min(self.bytes.len() - self.len);
            self.bytes[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
            self.len += n;
            Ok(())
        }
    }
    let mut line = Line {
        bytes: [0; 1024],
        len: 0,
    };
    let _ = std::fmt::Write::write_fmt(&mut line, format_args!("error: {why}\n"));
    // SAFETY: writes `len` initialised bytes of `line` to fd 2, then ends the process without
    // running anything else (other threads may hold locks that a normal exit would take).
    unsafe {
        libc::write(2, line.bytes.as_ptr().cast(), line.len);
        libc::_exit(1)
    }
}

// SAFETY: every call is forwarded to `System` unchanged; the counters only observe sizes (a
// thread past its cap ends the process before the call is made, and a refused call ends it
// after, never returning null).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        on_thread(layout.size() as isize);
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        let p = unsafe { System.alloc(layout) };
        if p.is_null() {
            out_of_memory(layout.size());
        }
        grew(layout.size());
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        on_thread(layout.size() as isize);
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if p.is_null() {
            out_of_memory(layout.size());
        }
        grew(layout.size());
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, that is from `System`, with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        shrank(layout.size());
        on_thread(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        on_thread(new_size as isize - layout.size() as isize);
        // SAFETY: as for `dealloc`; `System` keeps the block when it returns null.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if p.is_null() {
            out_of_memory(new_size);
        }
        if new_size >= layout.size() {
            grew(new_size - layout.size());
        } else {
            shrank(layout.size() - new_size);
        }
        p
    }
}

/// Whether [`Counting`] is the global allocator (something has been counted).
pub fn counting() -> bool {
    PEAK.load(Relaxed) > 0
}

/// Bytes live now.
pub fn live() -> usize {
    LIVE.load(Relaxed)
}

/// The high-water mark since the last call, which restarts it from the bytes live now.
pub fn take_peak() -> usize {
    PEAK.swap(LIVE.load(Relaxed), Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// No limit (usize::MAX, a template without an output bound) is no cap, not a cap of -1
    /// bytes: a thread under it allocates as any other. (The library's tests run without the
    /// counting allocator, so `on_thread` is called here by hand.)
    #[test]
    fn an_unbounded_cap_never_stops_the_thread() {
        let _cap = cap_thread(usize::MAX, 3600, "test");
        on_thread(1 << 20);
        on_thread(-(1 << 20));
        let cap = CAP.with(Cell::get).expect("the cap is in force");
        assert_eq!(
            (cap.limit, cap.live, cap.allocs),
            (isize::MAX as usize, 0, 1)
        );
    }
}
