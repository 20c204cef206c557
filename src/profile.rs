//! `--profile`: where a run's time goes, by phase, with a device sync at every phase boundary.
//!
//! Off by default, and then a [`scope`] costs one atomic load. On, each phase boundary waits
//! for the device (so GPU time lands in the phase that queued it) and the time since the last
//! boundary is credited to the innermost open phase: the figures are exclusive and add up to
//! the wall time between [`enable`] and [`report`]. The syncs themselves slow a GPU run down,
//! so compare phases within one profiled run, and time without `--profile`.
//!
//! Where the binary counts its heap ([`heap::Counting`]), each phase also gets the high-water
//! mark of live heap bytes while it was the innermost phase: on the CPU, where every tensor is
//! on the heap, that says which phase sets the run's peak memory and by how much.

pub mod heap;

use candle_core::Device;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A part of a forward/backward step. Attention, MLP and norms include the backward pass's
/// recomputation of checkpointed blocks; `Backward` is candle's autograd alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Embedding,
    Norms,
    Attention,
    Mlp,
    Logprobs,
    Backward,
    Grads,
    Optimizer,
}

impl Phase {
    const ALL: [Phase; 8] = [
        Phase::Embedding,
        Phase::Norms,
        Phase::Attention,
        Phase::Mlp,
        Phase::Logprobs,
        Phase::Backward,
        Phase::Grads,
        Phase::Optimizer,
    ];

    fn name(self) -> &'static str {
        match self {
            Phase::Embedding => "embedding (lookup and its gradient)",
            Phase::Norms => "RMSNorm",
            Phase::Attention => "attention (q/k/v/o, RoPE, scores)",
            Phase::Mlp => "MLP",
            Phase::Logprobs => "log-probs (lm_head, log-sum-exp, its backward)",
            Phase::Backward => "autograd backward",
            Phase::Grads => "gradient accumulation",
            Phase::Optimizer => "optimizer",
        }
    }
}

struct State {
    device: Device,
    started: Instant,
    last: Instant,
    open: Vec<Phase>,
    totals: [Duration; Phase::ALL.len()],
    calls: [u64; Phase::ALL.len()],
    /// Heap high-water marks per phase, then outside every phase.
    peaks: [usize; Phase::ALL.len() + 1],
}

impl State {
    fn new(device: &Device) -> Self {
        heap::take_peak();
        let now = Instant::now();
        Self {
            device: device.clone(),
            started: now,
            last: now,
            open: Vec::new(),
            totals: Default::default(),
            calls: Default::default(),
            peaks: Default::default(),
        }
    }

    fn open(&mut self, phase: Phase) {
        self.boundary();
        self.open.push(phase);
        self.calls[phase as usize] += 1;
    }

    fn close(&mut self) {
        self.boundary();
        self.open.pop();
    }

    /// The table: seconds, share and calls per phase, then the rest.
    fn table(&mut self) -> String {
        self.boundary();
        let wall = (self.last - self.started).as_secs_f64().max(1e-9);
        let counted = heap::counting();
        let peak = |i: usize| -> String {
            if counted {
                format!(" {:>14.1}", self.peaks[i] as f64 / (1 << 20) as f64)
            } else {
                String::new()
            }
        };
        let mut out = format!(
            "profile (device synced at each phase boundary; {wall:.2} s in all)\n{:<50} {:>9} {:>6} {:>9}{}\n",
            "phase",
            "seconds",
            "share",
            "calls",
            if counted { " peak heap MiB" } else { "" }
        );
        let mut inside = 0.0;
        for p in Phase::ALL {
            let t = self.totals[p as usize].as_secs_f64();
            inside += t;
            out += &format!(
                "{:<50} {t:>9.3} {:>5.1}% {:>9}{}\n",
                p.name(),
                100.0 * t / wall,
                self.calls[p as usize],
                peak(p as usize)
            );
        }
        let rest = (wall - inside).max(0.0);
        out += &format!(
            "{:<50} {rest:>9.3} {:>5.1}%{}\n",
            "other (data, host work, loading, writing)",
            100.0 * rest / wall,
            if counted {
                format!(" {:>9}{}", "", peak(Phase::ALL.len()))
            } else {
                String::new()
            }
        );
        out
    }

    /// Waits for the device, then credits the time since the last boundary to the innermost
    /// open phase (none: time outside every phase).
    fn boundary(&mut self) {
        // A failed sync surfaces again at the next real device call; the profile just goes on.
        let _ = self.device.synchronize();
        let now = Instant::now();
        let at = match self.open.last() {
            Some(&p) => {
                self.totals[p as usize] += now - self.last;
                p as usize
            }
            None => Phase::ALL.len(),
        };
        self.peaks[at] = self.peaks[at].max(heap::take_peak());
        self.last = now;
    }
}

static ENABLED: AtomicBool = AtomicBool::new(false);
static STATE: Mutex<Option<State>> = Mutex::new(None);

/// Starts profiling on `device` (the clock starts now).
pub fn enable(device: &Device) {
    *STATE.lock().unwrap_or_else(|e| e.into_inner()) = Some(State::new(device));
    ENABLED.store(true, Ordering::Release);
}

/// An open phase; it closes when dropped.
#[must_use = "the phase closes when this is dropped"]
pub struct Scope(bool);

/// Opens `phase` until the returned guard is dropped (a no-op unless profiling).
pub fn scope(phase: Phase) -> Scope {
    if !ENABLED.load(Ordering::Acquire) {
        return Scope(false);
    }
    let mut guard = STATE.lock().unwrap_or_else(|e| e.into_inner());
    match guard.as_mut() {
        Some(s) => {
            s.open(phase);
            Scope(true)
        }
        None => Scope(false),
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        if self.0 {
            if let Some(s) = STATE.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
                s.close();
            }
        }
    }
}

static NOTES: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Says `msg` on stderr the first time it comes, and lists it under the `--profile` table: what
/// a fast path did not take, and why.
pub fn note_once(msg: String) {
    let mut notes = NOTES.lock().unwrap_or_else(|e| e.into_inner());
    if !notes.contains(&msg) {
        eprintln!("note: {msg}");
        notes.push(msg);
    }
}

/// Stops profiling and returns the table (None when profiling was off), with the notes.
pub fn report() -> Option<String> {
    ENABLED.store(false, Ordering::Release);
    let mut state = STATE.lock().unwrap_or_else(|e| e.into_inner()).take()?;
    let mut table = state.table();
    for note in NOTES.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        table += &format!("\nnote: {note}");
    }
    Some(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_are_exclusive_and_add_up_to_the_wall_time() {
        // A local state: the global one may see phases from tests running beside this one.
        let mut s = State::new(&Device::Cpu);
        s.open(Phase::Attention);
        std::thread::sleep(Duration::from_millis(20));
        s.open(Phase::Mlp);
        std::thread::sleep(Duration::from_millis(30));
        s.close();
        s.close();
        let text = s.table();
        let secs = |label: &str| -> f64 {
            let line = text.lines().find(|l| l.starts_with(label)).unwrap();
            line[50..]
                .split_whitespace()
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        let (attn, mlp) = (secs("attention"), secs("MLP"));
        // Attention would hold MLP's 30 ms too if phases were not exclusive.
        assert!((0.019..0.045).contains(&attn), "{text}");
        assert!(mlp >= 0.029, "{text}");
        assert!(text.contains("MLP") && text.lines().count() == 11, "{text}");
    }
}
