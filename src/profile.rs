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
//! on the heap, that says which phase sets the run's peak memory and by how much. On CUDA each
//! phase gets the device memory in use at its boundaries (the driver's total − free: the CUDA
//! context and candle's memory pool, which keeps what it has freed, so its high-water mark so
//! far), and the table names the phase in which it reached the run's peak.

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
    /// Device memory in use at the boundaries of each phase (the largest), then outside every
    /// phase; and the run's largest with the phase (index as above) that reached it first.
    device_used: [Option<usize>; Phase::ALL.len() + 1],
    device_peak: Option<(usize, usize)>,
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
            device_used: Default::default(),
            device_peak: None,
        }
    }

    /// Device memory in use, `used` bytes, at the end of an interval credited to `at`.
    fn record_device(&mut self, at: usize, used: usize) {
        let slot = &mut self.device_used[at];
        *slot = Some(slot.map_or(used, |u| u.max(used)));
        if self.device_peak.is_none_or(|(peak, _)| used > peak) {
            self.device_peak = Some((used, at));
        }
    }

    fn at_name(at: usize) -> &'static str {
        Phase::ALL
            .get(at)
            .map_or("other (data, host work, loading, writing)", |p| p.name())
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
        let on_device = self.device_peak.is_some();
        let device = |i: usize| -> String {
            match (on_device, self.device_used[i]) {
                (false, _) => String::new(),
                (true, Some(u)) => format!(" {:>12.1}", u as f64 / (1 << 20) as f64),
                (true, None) => format!(" {:>12}", "-"),
            }
        };
        let mut out = format!(
            "profile (device synced at each phase boundary; {wall:.2} s in all)\n{:<50} {:>9} {:>6} {:>9}{}{}\n",
            "phase",
            "seconds",
            "share",
            "calls",
            if counted { " peak heap MiB" } else { "" },
            if on_device { "   device MiB" } else { "" }
        );
        let mut inside = 0.0;
        for p in Phase::ALL {
            let t = self.totals[p as usize].as_secs_f64();
            inside += t;
            out += &format!(
                "{:<50} {t:>9.3} {:>5.1}% {:>9}{}{}\n",
                p.name(),
                100.0 * t / wall,
                self.calls[p as usize],
                peak(p as usize),
                device(p as usize)
            );
        }
        let rest = (wall - inside).max(0.0);
        let other = Phase::ALL.len();
        // no calls column there; blank it when a memory column follows
        let calls = if counted || on_device {
            " ".repeat(10)
        } else {
            String::new()
        };
        out += &format!(
            "{:<50} {rest:>9.3} {:>5.1}%{calls}{}{}\n",
            Self::at_name(other),
            100.0 * rest / wall,
            peak(other),
            device(other)
        );
        if let Some((used, at)) = self.device_peak {
            out += &format!(
                "device memory in use peaked at {:.1} MiB (CUDA context and memory pool included), \
                 first reached in: {}\n",
                used as f64 / (1 << 20) as f64,
                Self::at_name(at)
            );
        }
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
        if let Some(used) = device_used(&self.device) {
            self.record_device(at, used);
        }
        self.last = now;
    }
}

/// The high-water marks of a CUDA device's memory pool, where candle allocates: bytes held by
/// allocations, and bytes the pool reserved from the driver (blocks it keeps after a free and
/// fragmentation included; refdpo sets it to keep everything, `run.rs`). None elsewhere.
fn pool_high_water(device: &Device) -> Option<(u64, u64)> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            use candle_core::cuda_backend::cudarc::driver::{result, sys};
            let ordinal = d.cuda_stream().context().ordinal();
            /// SAFETY (callers): `pool` is a valid pool; both attributes read are u64.
            unsafe fn get(pool: sys::CUmemoryPool, attr: sys::CUmemPool_attribute) -> Option<u64> {
                let mut v = 0u64;
                // SAFETY: as the function's contract says
                unsafe { result::mem_pool::get_attribute(pool, attr, (&mut v as *mut u64).cast()) }
                    .ok()?;
                Some(v)
            }
            // SAFETY: the pool handle comes from the driver for this device, and
            // USED_MEM_HIGH and RESERVED_MEM_HIGH are cuuint64_t attributes.
            unsafe {
                let dev = result::device::get(ordinal as i32).ok()?;
                let pool = result::device::get_mem_pool(dev).ok()?;
                use sys::CUmemPool_attribute::*;
                Some((
                    get(pool, CU_MEMPOOL_ATTR_USED_MEM_HIGH)?,
                    get(pool, CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)?,
                ))
            }
        }
        _ => None,
    }
}

/// Device memory in use on a CUDA device (the driver's total − free); None elsewhere.
fn device_used(device: &Device) -> Option<usize> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            let (free, total) = d.cuda_stream().context().mem_get_info().ok()?;
            Some(total.saturating_sub(free))
        }
        _ => None,
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
        crate::error::note!("note: {msg}");
        notes.push(msg);
    }
}

/// Stops profiling and returns the table (None when profiling was off), with the notes.
pub fn report() -> Option<String> {
    ENABLED.store(false, Ordering::Release);
    let mut state = STATE.lock().unwrap_or_else(|e| e.into_inner()).take()?;
    let mut table = state.table();
    if let Some((used, reserved)) = pool_high_water(&state.device) {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        table += &format!(
            "\ndevice memory pool: at most {:.1} MiB held by tensors, {:.1} MiB reserved from the \
             driver (the pool's own high-water marks; the column above is the driver's total − \
             free, the CUDA context included)",
            mib(used),
            mib(reserved)
        );
    }
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
        assert!(
            !text.contains("device MiB"),
            "no device column on the CPU: {text}"
        );
    }

    #[test]
    fn the_phase_that_first_reaches_the_device_peak_is_named() {
        let mut s = State::new(&Device::Cpu);
        let (attn, other) = (Phase::Attention as usize, Phase::ALL.len());
        let backward = Phase::Backward as usize;
        s.record_device(other, 900 << 20);
        s.record_device(attn, 2000 << 20);
        s.record_device(backward, 3000 << 20);
        // the pool keeps what it reached: later boundaries see the same figure
        s.record_device(attn, 3000 << 20);
        s.record_device(other, 3000 << 20);
        let text = s.table();
        assert!(
            text.contains("peaked at 3000.0 MiB")
                && text.contains("first reached in: autograd backward"),
            "{text}"
        );
        let line = text.lines().find(|l| l.starts_with("MLP")).unwrap();
        assert!(line.trim_end().ends_with('-'), "a phase never seen: {line}");
        let line = text.lines().find(|l| l.starts_with("attention")).unwrap();
        assert!(line.trim_end().ends_with("3000.0"), "{line}");
    }
}
