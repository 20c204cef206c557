//! Command dispatch: validated config + device → the stage that does the work.

use crate::cli::{Cli, Command, ConfigArgs, JudgeArgs, StatsArgs};
use crate::config::Config;
use crate::dirs::{CacheDir, RunDir};
use crate::error::{Error, Result};
use crate::outputs::Existing;
use candle_core::Device;

/// Writes to standard output. A reader that went away (`refdpo stats … | head`) ends the
/// process quietly with status 141 (128 + SIGPIPE), as `cat` does, instead of a panic; any
/// other failure is an error.
fn out(text: std::fmt::Arguments) -> Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_fmt(text).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(141),
        Err(e) => Err(Error::io(
            "cannot write",
            std::path::Path::new("<stdout>"),
            e,
        )),
        Ok(()) => Ok(()),
    }
}

/// `print!` through [`out`].
macro_rules! say {
    ($($t:tt)*) => { out(format_args!($($t)*))? };
}

/// `println!` through [`out`].
macro_rules! sayln {
    ($($t:tt)*) => { out(format_args!("{}\n", format_args!($($t)*)))? };
}

/// The most worker threads per core `RAYON_NUM_THREADS` may ask for.
const MAX_THREADS_PER_CORE: usize = 16;

/// Starts the worker threads (rayon's global pool: `RAYON_NUM_THREADS`, else one per core) now,
/// so that a system that refuses them (a memory or process limit) is an error here, not a panic
/// in the first parallel loop. A pool already started (a test that ran before) is kept.
fn start_threads() -> anyhow::Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let most = MAX_THREADS_PER_CORE * cores.max(16);
    // rayon's two names (the older one still read) and polars' pool (`stats`)
    for key in [
        "RAYON_NUM_THREADS",
        "RAYON_RS_NUM_CPUS",
        "POLARS_MAX_THREADS",
    ] {
        let set = std::env::var(key).ok().filter(|v| !v.trim().is_empty());
        let asked = set.as_deref().map(|n| n.trim().parse::<u64>());
        if let (Some(v), Some(Err(_))) = (&set, &asked) {
            // rayon and polars read such a value as unset: say so rather than run otherwise
            anyhow::bail!(
                "{key}={v:?} is not a number of threads: set a whole number (at most {most}; 0 \
                 or unset for one per core)"
            );
        }
        if key == "POLARS_MAX_THREADS" && asked.as_ref().is_some_and(|r| r.as_ref() == Ok(&0)) {
            // polars refuses 0 ("Worker threads cannot be set to 0") where rayon reads it as one
            // per core: unset, it is one per core for both, as said (before any thread reads it)
            std::env::remove_var(key);
            continue;
        }
        if let Some(n) = asked.and_then(|r| r.ok()).filter(|&n| n > most as u64) {
            // thousands of threads take minutes to start (each its stack) before any work, then
            // only contend for the cores
            anyhow::bail!(
                "{key}={n} asks for more worker threads than refdpo starts ({most}, \
                 {MAX_THREADS_PER_CORE} per core of at least 16; this machine has {cores}): set \
                 it to at most {most}, or leave it unset for one per core"
            );
        }
    }
    match rayon::ThreadPoolBuilder::new().build_global() {
        Err(e) if std::error::Error::source(&e).is_some() => Err(anyhow::anyhow!(
            "cannot start {} worker threads: {e}: run fewer (`RAYON_NUM_THREADS=1`), or raise \
             the process's limits (`ulimit -v`, `ulimit -u`)",
            std::env::var("RAYON_NUM_THREADS")
                .ok()
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|&n| n > 0)
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        )),
        _ => Ok(()),
    }
}

/// Parses `--device` (default: CUDA when built with it and present, else CPU). Nothing about
/// the device is changed: see [`compute_device`].
pub fn device(spec: Option<&str>) -> Result<Device> {
    parse_device(spec)
}

/// The device of a command that computes as training runs do (precompute, train, generate,
/// stats): on CUDA, f32 matmuls may use TF32 (as `torch.backends.cuda.matmul.allow_tf32`; bf16
/// ones are unchanged) and the memory settings of [`keep_cuda_memory`]; on the CPU, those of
/// [`keep_cpu_memory`]. `selftest` does not take these: it sets TF32 per check.
pub fn compute_device(spec: Option<&str>) -> Result<Device> {
    let device = parse_device(spec)?;
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if device.is_cpu() {
        keep_cpu_memory();
    }
    if device.is_cuda() {
        candle_core::cuda::set_gemm_reduced_precision_f32(true);
        #[cfg(feature = "cuda")]
        keep_cuda_memory(&device)?;
    }
    Ok(device)
}

/// Two CUDA settings every refdpo run wants, as PyTorch's caching allocator behaves:
/// - the device's memory pool keeps freed memory (release threshold: all of it) instead of
///   handing it back to the driver at every synchronization, which makes the next step's
///   allocations map fresh pages again;
/// - allocations skip cudarc's per-allocation CUDA events (two events created per tensor),
///   which exist to order uses across streams.
#[cfg(feature = "cuda")]
fn keep_cuda_memory(device: &Device) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    let Device::Cuda(cuda) = device else {
        return Ok(());
    };
    let ordinal = cuda.cuda_stream().context().ordinal();
    let mut keep = u64::MAX;
    // SAFETY: (1) refdpo runs every CUDA operation on the one stream candle gives the thread that
    // parses the command (tokenizer threads create no tensors and drop none), which is the
    // condition under which cudarc's event tracking may be off; (2) the pool handle comes from
    // the driver for this device, and the release threshold attribute takes a u64.
    unsafe {
        cuda.disable_event_tracking();
        let dev = result::device::get(ordinal as i32)
            .map_err(|e| Error::Model(format!("CUDA device {ordinal}: {e:?}")))?;
        let pool = result::device::get_mem_pool(dev)
            .map_err(|e| Error::Model(format!("CUDA memory pool of device {ordinal}: {e:?}")))?;
        result::mem_pool::set_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut keep as *mut u64).cast(),
        )
        .map_err(|e| Error::Model(format!("CUDA memory pool of device {ordinal}: {e:?}")))?;
    }
    Ok(())
}

/// On the CPU, freed buffers stay with the process for the next step or chunk. By default glibc
/// maps each buffer above its mmap threshold (32 MiB at most) afresh and unmaps it when freed,
/// so every chunk of logits, every block's activations and their gradients are page-faulted in
/// anew: a fifth of a training step's CPU time went to the kernel (BENCHMARKS.md, "CPU page
/// faults"). Large buffers come from the heap instead (`M_MMAP_MAX` 0), and the heap is not
/// trimmed; stage one's chunks of logits are then 8× larger ([`crate::logprobs`]).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_cpu_memory() {
    // SAFETY: `mallopt` only sets two of glibc's allocator parameters (it takes the allocator's
    // own lock); no memory is touched.
    let kept = unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
    };
    if kept {
        crate::logprobs::heap_kept();
    }
}

fn parse_device(spec: Option<&str>) -> Result<Device> {
    match spec {
        None => Ok(Device::cuda_if_available(0)?),
        Some("cpu") => Ok(Device::Cpu),
        Some(s) if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = s.strip_prefix("cuda:").map_or(Ok(0), |n| {
                n.parse::<usize>()
                    .map_err(|_| Error::Config(format!("--device {s}: expected cuda:N")))
            })?;
            if !cfg!(feature = "cuda") {
                return Err(Error::Config(format!(
                    "--device {s}: this refdpo was built without CUDA. Build it with CUDA \
                     (`make precompute CUDA=1`, or `cargo build --release --features cuda`; \
                     needs the CUDA toolkit's nvcc), or use --device cpu"
                )));
            }
            Device::new_cuda(ordinal).map_err(|e| {
                Error::Config(format!(
                    "--device {s}: no usable CUDA device {ordinal} ({e}). Check `nvidia-smi` and \
                     the driver, pick another with cuda:N, or use --device cpu"
                ))
            })
        }
        Some(other) => Err(Error::Config(format!(
            "--device {other}: use cpu, cuda or cuda:N"
        ))),
    }
}

/// `cpu` or `cuda:N`, and on the CPU whether CUDA was compiled in.
fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Cpu if cfg!(feature = "cuda") => {
            "cpu (no CUDA device found; --device cuda to require one)".into()
        }
        candle_core::DeviceLocation::Cpu => "cpu (built without CUDA)".into(),
        other => format!("{other:?}"),
    }
}

/// Where a run computes: the first thing it says (on stderr).
fn announce(command: &str, device: &Device, quiet: bool) {
    if !quiet {
        crate::error::note!("refdpo {command} on {}", device_name(device));
    }
}

fn load(args: &ConfigArgs) -> Result<Config> {
    Config::load(&args.config, &args.overrides)
}

/// Refuses a command whose resolved config (`written`, saved beside its outputs) would replace
/// the `--config` file it was given.
fn keeps_config(args: &ConfigArgs, written: std::path::PathBuf) -> Result<()> {
    crate::outputs::refuse_writing_over(&[written], &[(args.config.clone(), "the --config file")])
}

/// What to do with outputs already there: `--resume` continues them, `--overwrite` replaces them.
fn existing(resume: bool, overwrite: bool) -> Existing {
    match (resume, overwrite) {
        (true, _) => Existing::Resume,
        (false, true) => Existing::Overwrite,
        (false, false) => Existing::Refuse,
    }
}

/// Runs a stage and prints its summary; with `--profile`, the phase table after it (stderr).
fn profiled(on: bool, device: &Device, stage: impl FnOnce() -> Result<String>) -> Result<()> {
    if on {
        crate::profile::enable(device);
    }
    let summary = stage();
    let table = crate::profile::report();
    sayln!("{}", summary?);
    if let Some(table) = table {
        use std::io::Write as _;
        let _ = write!(std::io::stderr(), "{table}");
    }
    Ok(())
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    crate::signals::file_size_limit_as_error();
    start_threads()?;
    crate::model::fused::setting::check()?;
    crate::logprobs::check_share_setting()?;
    crate::train::recompute::budget_setting()?;
    match cli.command {
        Command::Precompute { run: a, shard } => {
            let mut cfg = load(&a.config)?;
            if let Some(s) = shard {
                cfg.precompute.shard = crate::config::Shard::parse(&s)
                    .map_err(|e| Error::Config(format!("--shard {s}: {e}")))?;
            }
            let dev = compute_device(a.dev.device.as_deref())?;
            announce("precompute", &dev, a.dev.quiet);
            let mode = existing(false, a.overwrite);
            keeps_config(&a.config, CacheDir::new(&cfg.precompute.out).config())?;
            profiled(a.profile, &dev, || {
                crate::precompute::run(&cfg, &dev, mode, a.dev.quiet)
            })?;
        }
        Command::Train { run, resume } => {
            let cfg = load(&run.config)?;
            let dev = compute_device(run.dev.device.as_deref())?;
            announce("train", &dev, run.dev.quiet);
            let mode = existing(resume, run.overwrite);
            keeps_config(&run.config, RunDir::new(&cfg.train.out).config())?;
            profiled(run.profile, &dev, || {
                crate::train::run(&cfg, &dev, mode, run.dev.quiet)
            })?;
        }
        Command::Stats(a) => stats(a)?,
        Command::Selftest { device: spec } => {
            let dev = device(spec.as_deref())?;
            let checks = crate::selftest::run(&dev)?;
            let (text, passed) = crate::selftest::report(&device_name(&dev), &checks);
            sayln!("{text}");
            if !passed {
                return Err(
                    Error::Model("selftest failed: see the FAIL lines above".into()).into(),
                );
            }
        }
        Command::Plot { run, out } => {
            for f in crate::train::curves::plot(&run, &out)? {
                sayln!("{}", f.display());
            }
        }
        Command::Generate(a) => {
            let cfg = load(&a.config)?;
            let dev = compute_device(a.dev.device.as_deref())?;
            announce("generate", &dev, a.dev.quiet);
            let opts = crate::generate::Options {
                run: a.run,
                split: a.split,
                limit: a.limit,
                max_new_tokens: a.max_new_tokens,
                sampling: crate::generate::Sampling {
                    temperature: a.temperature,
                    top_p: a.top_p,
                    top_k: a.top_k,
                    repetition_penalty: a.repetition_penalty,
                    seed: a.seed,
                },
                out: a.out,
                plot: a.plot.clone(),
            };
            let r = crate::generate::run(&cfg, &opts, &dev, a.dev.quiet)?;
            say!("{}", r.summary.text());
            sayln!(
                "{} tokens in {:.2} s ({:.0} tokens/s); generations in {}",
                r.tokens,
                r.seconds,
                r.tokens as f64 / r.seconds.max(1e-9),
                r.path.display()
            );
            if let Some(dir) = a.plot {
                sayln!("chart in {}", dir.join("generation_lengths.svg").display());
            }
        }
        Command::Judge(a) => judge(a)?,
        Command::Merge {
            adapter,
            out,
            base,
            revision,
        } => {
            let base =
                crate::train::merge::merge(&adapter, base.as_deref(), revision.as_deref(), &out)?;
            sayln!(
                "merged {} into {} ({}); wrote {}",
                adapter.display(),
                base.dir.display(),
                base.revision,
                out.display()
            );
        }
        Command::Show {
            config,
            index,
            split,
        } => {
            let cfg = load(&config)?;
            let split = split.unwrap_or_else(|| cfg.dataset.train_split.clone());
            say!("{}", crate::show::show(&cfg, &split, index)?);
        }
    }
    Ok(())
}

fn judge(a: JudgeArgs) -> Result<()> {
    let config = match (&a.config, &a.run) {
        (Some(c), _) => c.clone(),
        (None, Some(run)) => crate::dirs::RunDir::new(run).config_file()?,
        (None, None) => {
            return Err(Error::Config(
                "judge needs --run DIR, or --generations FILE with --config FILE".into(),
            ))
        }
    };
    let cfg = Config::load(&config, &a.overrides)?;
    let dev = compute_device(a.dev.device.as_deref())?;
    announce("judge", &dev, a.dev.quiet || a.json);
    let opts = crate::judge::Options {
        run: a.run,
        generations: a.generations,
        split: a.split,
        reward_model: a.reward_model,
        out: a.out,
        plot: a.plot.clone(),
        seed: a.seed,
    };
    let j = crate::judge::run(&cfg, &opts, &dev, a.dev.quiet || a.json)?;
    if a.json {
        sayln!("{}", serde_json::to_string_pretty(&j.to_json())?);
    } else {
        say!("{}", j.text());
        if let Some(dir) = a.plot {
            sayln!("charts in {}", dir.display());
        }
    }
    Ok(())
}

fn stats(a: StatsArgs) -> Result<()> {
    if a.config.is_none() && !a.overrides.is_empty() {
        return Err(Error::Config(format!(
            "--set {} changes --config's settings, and none is given: stats --cache reads the \
             cache as it is; pass --config FILE with --set",
            a.overrides[0]
        )));
    }
    let (cache, cfg) = match (&a.cache, &a.config) {
        (Some(c), _) => (
            c.clone(),
            a.config
                .as_ref()
                .map(|p| Config::load(p, &a.overrides))
                .transpose()?,
        ),
        (None, Some(p)) => {
            let cfg = Config::load(p, &a.overrides)?;
            (cfg.precompute.out.clone(), Some(cfg))
        }
        (None, None) => {
            return Err(Error::Config(
                "stats needs --cache DIR_OR_PARQUET or --config FILE".into(),
            ))
        }
    };
    let opts = crate::stats::StatsOptions {
        cache,
        split: a.split,
        run: a.run,
        json: a.json,
        plot: a.plot,
        config: cfg,
        cache_of_config: a.cache.is_none(),
        device: compute_device(a.device.as_deref())?,
    };
    say!("{}", crate::stats::run(&opts)?);
    Ok(())
}
