//! `refdpo selftest [--device D]`: the device's numbers against the CPU f32 reference, so a user can
//! trust a GPU setup before spending hours on it. Each fused op's forward against the composed
//! version, each composed op's backward, and a whole random tiny model of each family — reference
//! log-probs and every parameter's gradient — in f32 and bf16. One line per check with its error
//! and tolerance; the command fails unless every check passes.

mod fused;
mod models;
mod ops;
mod optim;

use crate::error::{Error, Result};
use crate::model::fused::setting::{self, Kernel};
use crate::model::init;
use candle_core::{DType, Device, Tensor};
use fused::fused_ops;
use models::{decode, lora, model};
use ops::ops;
use std::fmt::Write;

/// One comparison: the largest error relative to the reference's largest magnitude.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: String,
    pub error: f64,
    pub tolerance: f64,
    /// The fused kernel whose own check this is: when it fails, `REFDPO_FUSED=-name` runs the
    /// composed ops in that kernel's place.
    pub kernel: Option<Kernel>,
    /// Why nothing was compared: the error the device gave (the check fails).
    pub note: Option<String>,
}

impl Check {
    pub fn passed(&self) -> bool {
        self.error <= self.tolerance
    }

    /// `got` (any device, any dtype) against `want` (CPU f32).
    pub(super) fn compare(
        name: String,
        got: &Tensor,
        want: &Tensor,
        tolerance: f64,
    ) -> Result<Self> {
        let got = got.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        let scale = want.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-6);
        // A max over a tensor skips NaN, so count them first: any NaN fails.
        let nans = got
            .ne(&got)?
            .to_dtype(DType::F32)?
            .sum_all()?
            .to_scalar::<f32>()?;
        let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let error = if nans == 0.0 && diff.is_finite() {
            f64::from(diff / scale)
        } else {
            f64::INFINITY
        };
        Ok(Self {
            name,
            error,
            tolerance,
            kernel: None,
            note: None,
        })
    }

    /// A check of an `error` computed by the caller (any non-finite one fails).
    pub(super) fn of_error(name: String, error: f64, tolerance: f64) -> Self {
        Self {
            name,
            error: if error.is_finite() {
                error
            } else {
                f64::INFINITY
            },
            tolerance,
            kernel: None,
            note: None,
        }
    }

    /// This check as `kernel`'s own.
    pub(super) fn of(self, kernel: Kernel) -> Self {
        Self {
            kernel: Some(kernel),
            ..self
        }
    }

    /// A check that could not compare: the device's `error` on the way (it fails).
    pub(super) fn errored(name: String, kernel: Option<Kernel>, error: &Error) -> Self {
        Self {
            name,
            error: f64::INFINITY,
            tolerance: 0.0,
            kernel,
            note: Some(error.to_string()),
        }
    }
}

/// Runs `f`, which pushes its checks; an error on the way (a kernel the device cannot load or
/// launch) becomes one failed check named `name`, and the checks after it still run. Where the
/// error left the device unusable (a CUDA kernel's illegal address poisons its context: every
/// later call fails too), the failed check is pushed and the error returned, so that no later
/// check is blamed for it.
pub(super) fn guarded(
    checks: &mut Vec<Check>,
    device: &Device,
    name: String,
    kernel: Option<Kernel>,
    f: impl FnOnce(&mut Vec<Check>) -> Result<()>,
) -> Result<()> {
    let Err(e) = f(checks) else {
        return Ok(());
    };
    checks.push(Check::errored(name.clone(), kernel, &e));
    if alive(device) {
        Ok(())
    } else {
        Err(Error::Model(format!(
            "{device:?} stopped answering after `{name}`: {e}"
        )))
    }
}

/// Whether `device` still runs work and copies results back.
fn alive(device: &Device) -> bool {
    Tensor::zeros(4, DType::F32, device)
        .and_then(|t| (t + 1.0)?.to_vec1::<f32>())
        .is_ok_and(|v| v == [1.0; 4])
}

/// Relative tolerance of a dtype's results against f32 on the CPU.
pub(super) fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-4,
        _ => 3e-2,
    }
}

pub(super) fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "?",
    }
}

/// Deterministic values in [-1, 1) (the init formula's generator).
pub(super) fn values(shape: &[usize], seed: u64) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n as u64)
        .map(|i| init::uniform(seed, i + 1) as f32)
        .collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// How the device computes in a model check: f32 with full-precision matmuls, f32 with TF32
/// matmuls (what runs on CUDA use, as PyTorch's `allow_tf32`), or bf16.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Precision {
    F32,
    Tf32,
    Bf16,
}

impl Precision {
    pub(super) fn dtype(self) -> DType {
        match self {
            Precision::F32 | Precision::Tf32 => DType::F32,
            Precision::Bf16 => DType::BF16,
        }
    }

    pub(super) fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Tf32 => "f32 (TF32 matmuls)",
            Precision::Bf16 => "bf16",
        }
    }

    /// Relative L2 tolerance of the whole gradient. TF32 keeps 10 mantissa bits (about 1e-3
    /// per product; measured 0.9e-3 to 1.1e-3 on an H200); bf16 compute over f32 masters
    /// measured 1.7e-2 on the CPU for both families.
    pub(super) fn grad_tolerance(self) -> f64 {
        match self {
            Precision::F32 => 1e-4,
            Precision::Tf32 => 1e-2,
            Precision::Bf16 => 5e-2,
        }
    }
}

/// Runs every check on `device`; returns them in order. The f32 checks turn TF32 off, so they
/// test the kernels at full precision; on CUDA a TF32 set follows, as runs compute.
pub fn run(device: &Device) -> Result<Vec<Check>> {
    let tf32 = candle_core::cuda::gemm_reduced_precision_f32();
    candle_core::cuda::set_gemm_reduced_precision_f32(false);
    let checks = all_checks(device);
    candle_core::cuda::set_gemm_reduced_precision_f32(tf32);
    checks
}

fn all_checks(device: &Device) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    match every_check(device, &mut checks) {
        Ok(()) => Ok(checks),
        // the device stopped answering: what ran is reported, the rest did not run
        Err(e) if !alive(device) => {
            let name = "the remaining checks (not run: the device stopped answering)".into();
            checks.push(Check::errored(name, None, &e));
            Ok(checks)
        }
        Err(e) => Err(e),
    }
}

fn every_check(device: &Device, checks: &mut Vec<Check>) -> Result<()> {
    // at most 40 s of reruns in the search for culprits (the device call gives the selftest 150)
    let mut search = Search::new(std::time::Duration::from_secs(40));
    for dtype in [DType::F32, DType::BF16] {
        let d = dtype_name(dtype);
        guarded(checks, device, format!("candle's ops {d}"), None, |c| {
            ops(device, dtype, c)
        })?;
        fused_ops(device, dtype, checks)?;
    }
    let mut precisions = vec![Precision::F32, Precision::Bf16];
    if device.is_cuda() {
        precisions.push(Precision::Tf32);
    }
    for arch in [
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "olmo2",
        "phi3",
        "gemma2",
        "gemma3_text",
    ] {
        for &p in &precisions {
            candle_core::cuda::set_gemm_reduced_precision_f32(p == Precision::Tf32);
            let group = |checks: &mut Vec<Check>| -> Result<()> {
                let name = |what: &str| format!("{arch} {what} {}", p.name());
                guarded(checks, device, name("model"), None, |c| {
                    model(arch, device, p, c)
                })?;
                guarded(checks, device, name("decoding"), None, |c| {
                    decode(arch, device, p, c)
                })?;
                // LoRA on a frozen base, plain and with Phi-3's fused projections
                if matches!(arch, "llama" | "phi3") {
                    guarded(checks, device, name("LoRA"), None, |c| {
                        lora(arch, device, p, c)
                    })?;
                }
                Ok(())
            };
            let start = checks.len();
            group(checks)?;
            if let Some(found) = culprit(device, &checks[start..], &group, &mut search) {
                checks.push(Check {
                    name: format!("{arch} {} through the fused kernels", p.name()),
                    ..found
                });
            }
        }
    }
    Ok(())
}

/// Where some of `group`'s checks failed through the fused ops, the one kernel whose absence lets
/// every check of the group pass (its checks run again with each kernel left out in turn): a
/// failed check tagged with it, at the worst failure's error, so that the report's setting
/// leaves it out. None where the group passed, the fused ops are not in use, or no single
/// kernel explains the failure.
fn culprit(
    device: &Device,
    group_checks: &[Check],
    group: &dyn Fn(&mut Vec<Check>) -> Result<()>,
    search: &mut Search,
) -> Option<Check> {
    if !crate::model::fused::enabled(device) || !alive(device) {
        return None;
    }
    culprit_under(setting::current(), group_checks, group, search, &|s, f| {
        setting::with(s, f)
    })
}

/// What the search for culprits has found, and until when it may look: each family's failing
/// checks rerun with each of 9 kernels left out could take minutes on a device where the
/// failure is no kernel's; a kernel blamed once is tried first for the next family.
pub(super) struct Search {
    blamed: Vec<Kernel>,
    until: std::time::Instant,
    /// Whether the time ran out (said once on stderr).
    ran_out: std::cell::Cell<bool>,
}

impl Search {
    pub(super) fn new(budget: std::time::Duration) -> Self {
        Self {
            blamed: Vec::new(),
            until: std::time::Instant::now() + budget,
            ran_out: std::cell::Cell::new(false),
        }
    }

    /// Whether another rerun may start; the first refusal is said on stderr.
    fn may_run(&self) -> bool {
        if std::time::Instant::now() < self.until {
            return true;
        }
        if !self.ran_out.replace(true) {
            crate::error::note!(
                "note: selftest: the search for the kernel behind failing model checks ran out \
                 of time; the families after it name none"
            );
        }
        false
    }
}

/// [`culprit`] from the setting `current`, each trial run by `with` under its setting.
fn culprit_under(
    current: setting::Setting,
    group_checks: &[Check],
    group: &dyn Fn(&mut Vec<Check>) -> Result<()>,
    search: &mut Search,
    with: &dyn Fn(setting::Setting, &mut dyn FnMut() -> bool) -> bool,
) -> Option<Check> {
    let worst = group_checks
        .iter()
        .filter(|c| !c.passed())
        .max_by(|a, b| (a.error / a.tolerance).total_cmp(&(b.error / b.tolerance)))?;
    let kernel = setting::culprit(current, &search.blamed, |s| {
        search.may_run()
            && with(s, &mut || {
                let mut again = Vec::new();
                group(&mut again).is_ok() && again.iter().all(Check::passed)
            })
    })?;
    if !search.blamed.contains(&kernel) {
        search.blamed.push(kernel);
    }
    Some(Check {
        name: String::new(),
        error: worst.error,
        tolerance: worst.tolerance,
        kernel: Some(kernel),
        note: Some(format!(
            "every check of this family and precision passes with REFDPO_FUSED leaving out {} \
             (the worst failure: {})",
            kernel.name(),
            worst.name
        )),
    })
}

/// The report: one line per check, then a summary line naming the device, the kernels
/// `REFDPO_FUSED` left out and, where a fused kernel's own check failed, the setting that runs
/// without it.
pub fn report(device: &str, checks: &[Check]) -> (String, bool) {
    let mut out = String::new();
    let width = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
    for c in checks {
        let _ = writeln!(
            out,
            "{}  {:<width$}  error {:.1e}  tolerance {:.0e}",
            if c.passed() { "ok  " } else { "FAIL" },
            c.name,
            c.error,
            c.tolerance
        );
        for line in c.note.iter().flat_map(|n| n.lines()) {
            let _ = writeln!(out, "      {line}");
        }
    }
    let failed = checks.iter().filter(|c| !c.passed()).count();
    let _ = write!(
        out,
        "selftest on {device}: {} passed, {failed} failed",
        checks.len() - failed
    );
    let current = setting::current();
    let left_out = current.left_out();
    if !left_out.is_empty() {
        let _ = write!(
            out,
            "\nleft out by REFDPO_FUSED (their own checks not run): {}",
            names(&left_out)
        );
    }
    let failing: Vec<Kernel> = Kernel::ALL
        .into_iter()
        .filter(|&k| checks.iter().any(|c| c.kernel == Some(k) && !c.passed()))
        .collect();
    if !failing.is_empty() {
        let without: Vec<Kernel> = Kernel::ALL
            .into_iter()
            .filter(|k| left_out.contains(k) || failing.contains(k))
            .collect();
        let _ = write!(
            out,
            "\nfused kernels that failed a check: {}\nto run the composed ops in their place: {}",
            names(&failing),
            setting::leaving_out(current.forced, &without)
        );
    } else if failed > 0 && current.forced != Some(false) {
        let _ = write!(
            out,
            "\nno single fused kernel explains the failures: REFDPO_FUSED=0 runs the composed ops everywhere"
        );
    }
    (out, failed == 0)
}

fn names(kernels: &[Kernel]) -> String {
    kernels
        .iter()
        .map(|k| k.name())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failed check of a kernel's own names the kernel and the setting that leaves it out; a
    /// failure elsewhere names `REFDPO_FUSED=0`; an error becomes a failed check with its text.
    #[test]
    fn the_report_names_the_kernels_whose_own_checks_failed() {
        let ok = |name: &str| Check::of_error(name.into(), 1e-6, 1e-4);
        let off = |name: &str| Check::of_error(name.into(), 1e-1, 1e-4);
        let mut checks = vec![
            ok("fused rope forward f32").of(Kernel::Rope),
            ok("fused tiled attention forward f32").of(Kernel::Tiled),
            off("llama reference log-probs f32"),
        ];
        let (text, passed) = report("cpu", &checks);
        assert!(!passed);
        assert!(
            text.ends_with("REFDPO_FUSED=0 runs the composed ops everywhere"),
            "{text}"
        );
        checks.push(off("fused rope backward f32").of(Kernel::Rope));
        guarded(
            &mut checks,
            &Device::Cpu,
            "fused optimizer step bf16".into(),
            Some(Kernel::Adamw),
            |_| Err(Error::Model("CUDA_ERROR_NO_BINARY_FOR_GPU".into())),
        )
        .unwrap();
        guarded(
            &mut checks,
            &Device::Cpu,
            "fine".into(),
            Some(Kernel::Norm),
            |c| {
                c.push(ok("fused rms_norm forward f32").of(Kernel::Norm));
                Ok(())
            },
        )
        .unwrap();
        let (text, passed) = report("cpu", &checks);
        assert!(!passed);
        assert!(text.contains("FAIL  fused optimizer step bf16"), "{text}");
        assert!(
            text.contains("      model: CUDA_ERROR_NO_BINARY_FOR_GPU"),
            "{text}"
        );
        assert!(
            text.ends_with(
                "fused kernels that failed a check: rope, adamw\n\
                 to run the composed ops in their place: REFDPO_FUSED=-rope,-adamw"
            ),
            "{text}"
        );
        assert!(text.contains("3 passed, 3 failed"), "{text}");
    }

    /// A family's checks that pass only with one kernel left out name it (here, under a stand-in
    /// for the process-wide setting); a group that passed, or fails whatever is left out, names
    /// none.
    #[test]
    fn a_failing_model_check_names_the_kernel_whose_absence_fixes_it() {
        use std::cell::Cell;
        let under = Cell::new(setting::Setting::default());
        let group = |c: &mut Vec<Check>| {
            let err = if under.get().leaves_out(Kernel::Rope) {
                1e-6
            } else {
                0.5
            };
            c.push(Check::of_error(
                "llama reference log-probs bf16".into(),
                err,
                3e-2,
            ));
            c.push(Check::of_error(
                "llama cached decoding logits bf16".into(),
                1e-3,
                5e-2,
            ));
            Ok(())
        };
        let with = |s: setting::Setting, f: &mut dyn FnMut() -> bool| {
            let before = under.replace(s);
            let out = f();
            under.set(before);
            out
        };
        let mut first = Vec::new();
        group(&mut first).unwrap();
        let mut search = Search::new(std::time::Duration::from_secs(60));
        let found = culprit_under(
            setting::Setting::default(),
            &first,
            &group,
            &mut search,
            &with,
        )
        .unwrap();
        assert_eq!(found.kernel, Some(Kernel::Rope));
        assert!(!found.passed() && found.error == 0.5, "{found:?}");
        let note = found.note.unwrap();
        assert!(
            note.contains("leaving out rope") && note.contains("reference log-probs"),
            "{note}"
        );
        // passed: nothing to look for
        let passed = [Check::of_error("ok".into(), 0.0, 1e-4)];
        assert!(culprit_under(
            setting::Setting::default(),
            &passed,
            &group,
            &mut search,
            &with
        )
        .is_none());
        // fails whatever is left out
        let always = |c: &mut Vec<Check>| {
            c.push(Check::of_error("x".into(), 1.0, 1e-4));
            Ok(())
        };
        let failed = [Check::of_error("x".into(), 1.0, 1e-4)];
        assert!(culprit_under(
            setting::Setting::default(),
            &failed,
            &always,
            &mut search,
            &with
        )
        .is_none());
        // the blamed kernel is remembered, and a spent budget tries nothing
        assert_eq!(search.blamed, [Kernel::Rope]);
        let mut spent = Search::new(std::time::Duration::ZERO);
        assert!(culprit_under(
            setting::Setting::default(),
            &first,
            &group,
            &mut spent,
            &with
        )
        .is_none());
    }

    #[test]
    fn a_comparison_fails_past_its_tolerance_and_on_nan() {
        let want = Tensor::new(&[1.0f32, -2.0, 4.0], &Device::Cpu).unwrap();
        let near = Tensor::new(&[1.0f32, -2.0, 4.0002], &Device::Cpu).unwrap();
        let off = Tensor::new(&[1.0f32, -2.1, 4.0], &Device::Cpu).unwrap();
        let nan = Tensor::new(&[1.0f32, f32::NAN, 4.0], &Device::Cpu).unwrap();
        assert!(Check::compare("near".into(), &near, &want, 1e-4)
            .unwrap()
            .passed());
        assert!(!Check::compare("off".into(), &off, &want, 1e-2)
            .unwrap()
            .passed());
        assert!(!Check::compare("nan".into(), &nan, &want, 1.0)
            .unwrap()
            .passed());
    }
}
