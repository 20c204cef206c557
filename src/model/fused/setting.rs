//! `REFDPO_FUSED`: which of refdpo's fused kernels a run uses. Unset, CUDA runs every one and the
//! CPU its f32 training loops; `0` runs candle's composed ops everywhere; `1` runs the fused ops
//! on the CPU too (testing them without a GPU); `-name` leaves one kernel out, so that a kernel
//! that fails `refdpo selftest` on a GPU costs the run that kernel alone (the selftest prints the
//! setting that leaves out those that failed). Items combine with commas: `1,-tiled,-rope`.

use crate::error::{Error, Result};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

/// refdpo's fused kernels, each of which `REFDPO_FUSED=-name` can leave out. The name of each is
/// the one the selftest's checks carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// The tiled attention (FlashAttention-2's algorithm; the Triton cubins on CUDA).
    Tiled,
    /// The attention row op (scale, mask and softmax over stored scores).
    Softmax,
    /// RMSNorm, forward and backward.
    Norm,
    /// RoPE, forward and backward.
    Rope,
    /// SwiGLU, forward and backward.
    Swiglu,
    /// The completion log-probs and their gradient, over vocabulary chunks.
    Logprobs,
    /// Gradient accumulation in place.
    Accumulate,
    /// The optimizer step over all tensors at once (the Triton cubins on CUDA).
    Adamw,
    /// Its 8-bit moments' update (`train.optim = "adamw_8bit"`; the Triton cubins on CUDA, the
    /// CPU's loops over blocks).
    Adamw8,
}

impl Kernel {
    pub const ALL: [Kernel; 9] = [
        Kernel::Tiled,
        Kernel::Softmax,
        Kernel::Norm,
        Kernel::Rope,
        Kernel::Swiglu,
        Kernel::Logprobs,
        Kernel::Accumulate,
        Kernel::Adamw,
        Kernel::Adamw8,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Tiled => "tiled",
            Kernel::Softmax => "softmax",
            Kernel::Norm => "norm",
            Kernel::Rope => "rope",
            Kernel::Swiglu => "swiglu",
            Kernel::Logprobs => "logprobs",
            Kernel::Accumulate => "accumulate",
            Kernel::Adamw => "adamw",
            Kernel::Adamw8 => "adamw8",
        }
    }

    fn bit(self) -> u16 {
        1 << Kernel::ALL.iter().position(|&k| k == self).unwrap_or(0)
    }
}

/// A parsed `REFDPO_FUSED`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Setting {
    /// `Some(false)` for `0`, `Some(true)` for `1`, `None`: each device's default.
    pub forced: Option<bool>,
    /// The kernels left out (bits of [`Kernel::ALL`]).
    without: u16,
}

impl Setting {
    /// Parses the variable's value (empty: the defaults).
    pub fn parse(value: &str) -> std::result::Result<Self, String> {
        let mut s = Setting::default();
        for item in value.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            match item {
                "0" => s.forced = Some(false),
                "1" => s.forced = Some(true),
                _ => {
                    let name = item.strip_prefix('-').ok_or_else(|| {
                        format!("`{item}` is neither 0, 1 nor -name (a kernel to leave out)")
                    })?;
                    let k = Kernel::ALL
                        .into_iter()
                        .find(|k| k.name() == name)
                        .ok_or_else(|| format!("no fused kernel is called `{name}`"))?;
                    s.without |= k.bit();
                }
            }
        }
        if s.forced == Some(false) && s.without != 0 {
            return Err("0 leaves out every kernel already: drop the -name items".into());
        }
        Ok(s)
    }

    /// Whether `kernel` is left out.
    pub fn leaves_out(self, kernel: Kernel) -> bool {
        self.forced == Some(false) || self.without & kernel.bit() != 0
    }

    /// This setting with `kernel` left out too.
    pub fn without(self, kernel: Kernel) -> Self {
        Self {
            without: self.without | kernel.bit(),
            ..self
        }
    }

    /// The kernels left out by name (not counting `0`).
    pub fn left_out(self) -> Vec<Kernel> {
        Kernel::ALL
            .into_iter()
            .filter(|k| self.without & k.bit() != 0)
            .collect()
    }
}

/// The setting `REFDPO_FUSED=…` that leaves out `kernels` (with `1` first where `forced` is:
/// the fused ops on the CPU).
pub fn leaving_out(forced: Option<bool>, kernels: &[Kernel]) -> String {
    let items: Vec<String> = (forced == Some(true))
        .then(|| "1".to_string())
        .into_iter()
        .chain(kernels.iter().map(|k| format!("-{}", k.name())))
        .collect();
    format!("REFDPO_FUSED={}", items.join(","))
}

/// A setting in place of the environment's while [`with`] runs ([`encode`]; 0: none).
static OVERRIDE: AtomicU32 = AtomicU32::new(0);

/// `s` as one word: bit 31 set, the forced state in bits 16-17 (1: `0`, 2: `1`), the kernels left
/// out below.
fn encode(s: Setting) -> u32 {
    let forced = match s.forced {
        None => 0,
        Some(false) => 1,
        Some(true) => 2,
    };
    1 << 31 | forced << 16 | u32::from(s.without)
}

/// [`encode`]'s word back (None for 0).
fn decode(word: u32) -> Option<Setting> {
    (word != 0).then_some(Setting {
        forced: match (word >> 16) & 3 {
            1 => Some(false),
            2 => Some(true),
            _ => None,
        },
        without: (word & 0xFFFF) as u16,
    })
}

/// This process's setting: an invalid value reads as the defaults here, and [`check`] (run by
/// every command first) refuses it.
pub fn current() -> Setting {
    if let Some(s) = decode(OVERRIDE.load(Ordering::Acquire)) {
        return s;
    }
    static SETTING: OnceLock<Setting> = OnceLock::new();
    *SETTING.get_or_init(|| {
        std::env::var("REFDPO_FUSED")
            .ok()
            .and_then(|v| Setting::parse(&v).ok())
            .unwrap_or_default()
    })
}

/// Runs `f` under `setting` in place of the environment's, for the whole process (its threads
/// too), and puts the environment's back: the selftest's search for the kernel whose absence
/// lets a failing model check pass. Not for concurrent use.
pub fn with<R>(setting: Setting, f: impl FnOnce() -> R) -> R {
    let before = OVERRIDE.swap(encode(setting), Ordering::AcqRel);
    let out = f();
    OVERRIDE.store(before, Ordering::Release);
    out
}

/// The one kernel whose absence (besides those `current` leaves out) makes `passes` hold, trying
/// those in `first` (kernels already blamed elsewhere), then the rest in [`Kernel::ALL`]'s
/// order: where a check that no kernel's own check explains fails, what a run should leave out.
pub fn culprit(
    current: Setting,
    first: &[Kernel],
    mut passes: impl FnMut(Setting) -> bool,
) -> Option<Kernel> {
    if current.forced == Some(false) {
        return None;
    }
    first
        .iter()
        .copied()
        .chain(Kernel::ALL.into_iter().filter(|k| !first.contains(k)))
        .filter(|&k| !current.leaves_out(k))
        .find(|&k| passes(current.without(k)))
}

/// Refuses an invalid `REFDPO_FUSED`, naming the kernels it may leave out; says once (stderr
/// and `--profile`) which kernels a valid one leaves out.
pub fn check() -> Result<()> {
    let value = match std::env::var("REFDPO_FUSED") {
        Ok(value) => value,
        Err(std::env::VarError::NotPresent) => return Ok(()),
        Err(std::env::VarError::NotUnicode(v)) => {
            return Err(Error::Config(format!(
                "REFDPO_FUSED={v:?} is not UTF-8 text: set it to 0, 1 or -name items, or unset it"
            )))
        }
    };
    let setting = Setting::parse(&value).map_err(|why| {
        let names: Vec<&str> = Kernel::ALL.iter().map(|k| k.name()).collect();
        Error::Config(format!(
            "REFDPO_FUSED={value:?}: {why}. It takes 0 (the composed ops everywhere), 1 (the \
             fused ops on the CPU too) and -name to leave one kernel out, comma-separated, for \
             name one of {} (e.g. REFDPO_FUSED=-tiled,-rope); unset it for the defaults",
            names.join(", ")
        ))
    })?;
    let left_out: Vec<&str> = setting.left_out().iter().map(|k| k.name()).collect();
    if !left_out.is_empty() {
        crate::profile::note_once(format!(
            "REFDPO_FUSED leaves out {}: the composed ops run in their place",
            left_out.join(", ")
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_culprit_is_the_one_kernel_whose_absence_lets_the_check_pass() {
        let base = Setting::parse("-tiled").unwrap();
        let mut tried = Vec::new();
        let found = culprit(base, &[], |s| {
            tried.push(s.left_out());
            s.leaves_out(Kernel::Swiglu)
        });
        assert_eq!(found, Some(Kernel::Swiglu));
        // each kernel not yet left out, one at a time, in order, up to the culprit
        assert_eq!(tried[0], [Kernel::Tiled, Kernel::Softmax]);
        assert_eq!(tried.last().unwrap(), &[Kernel::Tiled, Kernel::Swiglu]);
        assert_eq!(tried.len(), 4);
        // two broken kernels: no single one explains the failure
        assert_eq!(
            culprit(Setting::default(), &[], |s| s.leaves_out(Kernel::Norm)
                && s.leaves_out(Kernel::Rope)),
            None
        );
        assert_eq!(culprit(Setting::parse("0").unwrap(), &[], |_| true), None);
        // a kernel blamed before is tried first
        let mut tried = Vec::new();
        let found = culprit(Setting::default(), &[Kernel::Adamw8], |s| {
            tried.push(s.left_out());
            s.leaves_out(Kernel::Adamw8)
        });
        assert_eq!((found, tried.len()), (Some(Kernel::Adamw8), 1));
        // an override's word reads back as the setting it stands for
        for text in ["", "0", "1", "-adamw8", "1,-tiled,-accumulate"] {
            let s = Setting::parse(text).unwrap();
            assert_eq!(decode(encode(s)), Some(s), "{text}");
        }
        assert_eq!(decode(0), None);
    }

    #[test]
    fn the_setting_parses_and_refuses_what_it_does_not_know() {
        assert_eq!(Setting::parse("").unwrap(), Setting::default());
        assert_eq!(Setting::parse("0").unwrap().forced, Some(false));
        let s = Setting::parse("1, -tiled,-rope").unwrap();
        assert_eq!(s.forced, Some(true));
        assert_eq!(s.left_out(), [Kernel::Tiled, Kernel::Rope]);
        assert!(s.leaves_out(Kernel::Rope) && !s.leaves_out(Kernel::Norm));
        assert!(Setting::parse("0").unwrap().leaves_out(Kernel::Adamw));
        for bad in ["-flash", "tiled", "2", "0,-rope"] {
            assert!(Setting::parse(bad).is_err(), "{bad}");
        }
        // what the selftest prints parses back to the kernels it names
        let printed = leaving_out(None, &[Kernel::Softmax, Kernel::Adamw]);
        assert_eq!(printed, "REFDPO_FUSED=-softmax,-adamw");
        let s = Setting::parse(printed.strip_prefix("REFDPO_FUSED=").unwrap()).unwrap();
        assert_eq!(s.left_out(), [Kernel::Softmax, Kernel::Adamw]);
        let printed = leaving_out(Some(true), &[Kernel::Tiled]);
        let s = Setting::parse(printed.strip_prefix("REFDPO_FUSED=").unwrap()).unwrap();
        assert_eq!((s.forced, s.left_out()), (Some(true), vec![Kernel::Tiled]));
        for k in Kernel::ALL {
            assert_eq!(
                Setting::parse(&format!("-{}", k.name()))
                    .unwrap()
                    .left_out(),
                [k]
            );
        }
    }
}
