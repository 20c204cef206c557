//! A file read through a memory map that shrinks under refdpo (another program truncates or
//! rewrites a cache in place while `train` reads it) faults on the next read of a page past its
//! new end: SIGBUS, which kills the process without a word (exit status 135). Each map is noted
//! here ([`watch`]) with its file's name, and a SIGBUS inside one ends the process with an
//! `error:` naming that file and what to do (exit code 1). A SIGBUS anywhere else is left to the
//! system's default action.

use std::path::Path;
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::sync::Once;

/// How many maps are remembered at once (a run maps a few: each split's cache file, its shards);
/// past that the oldest note is replaced.
const SLOTS: usize = 16;

/// One map: its address range and its file's name (leaked: a few hundred bytes per map, a few
/// maps per process). `end == 0` marks a slot being written, never used or let go.
struct Slot {
    /// Which note holds the slot (the [`Watched`] that may let it go).
    note: AtomicUsize,
    start: AtomicUsize,
    end: AtomicUsize,
    name: AtomicPtr<u8>,
    name_len: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)] // the initialiser of each slot, copied
const EMPTY: Slot = Slot {
    note: AtomicUsize::new(usize::MAX),
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    name: AtomicPtr::new(std::ptr::null_mut()),
    name_len: AtomicUsize::new(0),
};

static MAPS: [Slot; SLOTS] = [EMPTY; SLOTS];
static NEXT: AtomicUsize = AtomicUsize::new(0);
static INSTALL: Once = Once::new();

/// A memory map noted by [`watch`]; the note is let go with it (the addresses may then hold
/// another file).
pub struct Watched<T> {
    map: T,
    note: usize,
}

impl<T: AsRef<[u8]>> AsRef<[u8]> for Watched<T> {
    fn as_ref(&self) -> &[u8] {
        self.map.as_ref()
    }
}

impl<T> Drop for Watched<T> {
    fn drop(&mut self) {
        let slot = &MAPS[self.note % SLOTS];
        if slot.note.load(Ordering::SeqCst) == self.note {
            slot.end.store(0, Ordering::SeqCst);
        }
    }
}

/// Notes that `map` (a live memory map) holds the file `path`, so that a SIGBUS inside it names
/// the file, for as long as the returned guard lives. Installs the handler on the first call.
pub fn watch<T: AsRef<[u8]>>(map: T, path: &Path) -> Watched<T> {
    INSTALL.call_once(install);
    let bytes = map.as_ref();
    let name: &'static [u8] = Box::leak(path.as_os_str().as_encoded_bytes().into());
    let note = NEXT.fetch_add(1, Ordering::Relaxed);
    let slot = &MAPS[note % SLOTS];
    // Invalidate, write the name, then the range: a handler reading the slot meanwhile finds
    // `end == 0` and skips it.
    slot.end.store(0, Ordering::SeqCst);
    slot.note.store(note, Ordering::SeqCst);
    slot.name.store(name.as_ptr().cast_mut(), Ordering::SeqCst);
    slot.name_len.store(name.len(), Ordering::SeqCst);
    slot.start.store(bytes.as_ptr() as usize, Ordering::SeqCst);
    slot.end
        .store(bytes.as_ptr() as usize + bytes.len(), Ordering::SeqCst);
    Watched { map, note }
}

/// The noted file whose map holds `addr`.
fn file_at(addr: usize) -> Option<&'static [u8]> {
    MAPS.iter().find_map(|slot| {
        let end = slot.end.load(Ordering::SeqCst);
        let start = slot.start.load(Ordering::SeqCst);
        if end == 0 || addr < start || addr >= end {
            return None;
        }
        let name = slot.name.load(Ordering::SeqCst);
        let len = slot.name_len.load(Ordering::SeqCst);
        // SAFETY: `name` and `len` describe a leaked (never freed) byte slice; the slot's range
        // was stored after them, so a reader that saw the range sees them.
        Some(unsafe { std::slice::from_raw_parts(name, len) })
    })
}

fn install() {
    // SAFETY: a zeroed sigaction is a valid value to fill in; the handler only does
    // async-signal-safe work (atomic loads, write, _exit, sigaction).
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigbus as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        // Failing to install leaves the default action, which is no worse.
        libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut());
    }
}

extern "C" fn on_sigbus(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for a SA_SIGINFO handler; SIGBUS sets si_addr.
    let addr = unsafe { (*info).si_addr() } as usize;
    let Some(name) = file_at(addr) else {
        // Not a file of ours: back to the default action, which the faulting access, run again
        // on return, then takes.
        // SAFETY: a zeroed sigaction with SIG_DFL (0) restores the default.
        unsafe {
            let mut default: libc::sigaction = std::mem::zeroed();
            default.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(libc::SIGBUS, &default, std::ptr::null_mut());
        }
        return;
    };
    let parts: [&[u8]; 3] = [
        b"error: `",
        name,
        b"` shrank while refdpo read it (SIGBUS): another program truncated or rewrote it in \
          place. A cache must not change while a command reads it: make it again with the same \
          `refdpo precompute`, then run this command again (`train --resume` continues from \
          the last checkpoint)\n",
    ];
    for part in parts {
        // SAFETY: write(2) is async-signal-safe; each part is a valid byte slice.
        unsafe { libc::write(2, part.as_ptr().cast(), part.len()) };
    }
    // SAFETY: _exit is async-signal-safe and runs nothing else.
    unsafe { libc::_exit(1) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A noted map is found by any address inside it, and only inside it, until it is let go.
    #[test]
    fn a_noted_map_is_found_by_its_addresses() {
        let watched = watch(vec![0u8; 4096], Path::new("/tmp/x/train_prefs.arrow"));
        let start = watched.as_ref().as_ptr() as usize;
        assert_eq!(file_at(start + 100), Some(&b"/tmp/x/train_prefs.arrow"[..]));
        assert_eq!(
            file_at(start + 4095),
            Some(&b"/tmp/x/train_prefs.arrow"[..])
        );
        assert_eq!(file_at(start + 4096), None);
        assert_eq!(file_at(start.wrapping_sub(1)), None);
        drop(watched);
        assert_eq!(file_at(start + 100), None);
    }
}
