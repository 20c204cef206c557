//! The system's limits and other programs: a memory limit, a descriptor limit, a read-only cache
//! and a cache truncated while `train` maps it each end with an `error:` that says what happened
//! (exit code 1), never a signal, an abort or a misnamed cause.

use super::common::{fails, precomputed, refdpo_under, train_with, wait_for_lines};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// An exit of 1 with one `error:` line, not a signal (SIGABRT 134, SIGSEGV 139, SIGBUS 135) or
/// a panic (101).
fn assert_plain_error(out: &Output, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{what}: {:?}\n{stderr}",
        out.status
    );
    assert!(
        stderr.contains("error: ") && !stderr.contains("panicked"),
        "{what}:\n{stderr}"
    );
    stderr
}

/// Under a data-segment limit too small for training (12 MiB), `train` says memory ran out
/// and what to lower, or that its threads could not start: where Rust's handler aborted
/// ("memory allocation of N bytes failed", SIGABRT) and rayon panicked.
#[test]
fn a_memory_limit_is_an_error_that_says_what_to_lower() {
    let (tmp, cfg) = precomputed("");
    let cfg = cfg.to_str().unwrap();
    let out = refdpo_under(
        "-d 12288",
        &[
            "train",
            "--config",
            cfg,
            "--quiet",
            "--set",
            "train.max_steps=2",
        ],
        tmp.path(),
    );
    let stderr = assert_plain_error(&out, "train under ulimit -d 12288");
    assert!(
        (stderr.contains("out of memory: the system refused")
            && stderr.contains("`train.batch_size`"))
            || stderr.contains("worker threads"),
        "{stderr}"
    );
    // The same command without the limit trains: the limit was the cause.
    train_with(cfg, tmp.path(), &["train.max_steps=2"]);
}

/// `RAYON_NUM_THREADS` far past the cores (100,000) is refused at once, naming it and the most
/// refdpo starts: those threads took minutes to start before any work or error.
#[test]
fn thousands_of_worker_threads_are_refused_at_once() {
    let (tmp, cfg) = precomputed("");
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_refdpo"))
        .args(["train", "--config", cfg.to_str().unwrap(), "--quiet"])
        .env("RAYON_NUM_THREADS", "100000")
        .current_dir(tmp.path())
        .output()
        .unwrap();
    let stderr = assert_plain_error(&out, "RAYON_NUM_THREADS=100000");
    assert!(
        stderr.contains("RAYON_NUM_THREADS=100000") && stderr.contains("at most"),
        "{stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    // rayon's older name, and polars' pool (`stats`)
    for key in ["RAYON_RS_NUM_CPUS", "POLARS_MAX_THREADS"] {
        let out = Command::new(env!("CARGO_BIN_EXE_refdpo"))
            .args(["stats", "--config", cfg.to_str().unwrap(), "--json"])
            .env(key, "5000")
            .current_dir(tmp.path())
            .output()
            .unwrap();
        let stderr = assert_plain_error(&out, key);
        assert!(stderr.contains(&format!("{key}=5000")), "{stderr}");
    }
    // 0 is one per core, as said, for polars too (it refuses 0 itself: the cache had been called
    // damaged; fuzzer)
    let out = Command::new(env!("CARGO_BIN_EXE_refdpo"))
        .args(["stats", "--config", cfg.to_str().unwrap(), "--json"])
        .env("POLARS_MAX_THREADS", "0")
        .current_dir(tmp.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // a value rayon would read as unset (one per core) is refused by name, as is a count past
    // u64 (fuzzer: both ran with the default)
    for odd in ["abc", "-1", "99999999999999999999"] {
        let out = Command::new(env!("CARGO_BIN_EXE_refdpo"))
            .args(["stats", "--config", cfg.to_str().unwrap(), "--json"])
            .env("RAYON_NUM_THREADS", odd)
            .current_dir(tmp.path())
            .output()
            .unwrap();
        let stderr = assert_plain_error(&out, odd);
        assert!(
            stderr.contains(&format!(
                "RAYON_NUM_THREADS=\"{odd}\" is not a number of threads"
            )),
            "{stderr}"
        );
    }
}

/// Under small descriptor limits, stage one fails naming the file and the system's reason
/// ("Too many open files"), not calling a good dataset "not a readable parquet file"; with
/// enough descriptors the same command succeeds.
#[test]
fn too_many_open_files_is_the_systems_reason_not_the_files() {
    let (tmp, cfg) = precomputed("");
    let cfg = cfg.to_str().unwrap();
    let (mut refused, mut passed) = (0, false);
    for n in 6..=16 {
        let out_dir = tmp.path().join(format!("cache-{n}"));
        let set = format!("precompute.out={}", out_dir.display());
        let args = ["precompute", "--config", cfg, "--quiet", "--set", &set];
        let out = refdpo_under(&format!("-n {n}"), &args, tmp.path());
        if out.status.success() {
            passed = true;
            continue;
        }
        let stderr = assert_plain_error(&out, &format!("precompute under ulimit -n {n}"));
        assert!(
            !stderr.contains("not a readable"),
            "ulimit -n {n}: {stderr}"
        );
        assert!(
            stderr.contains("Too many open files"),
            "ulimit -n {n}: {stderr}"
        );
        refused += 1;
    }
    assert!(
        refused > 0 && passed,
        "refused at {refused} limits; passed: {passed}"
    );
}

/// A cache on a file system this process may not write, up to date, is reported up to date
/// with nothing written (where the lock file could not be created); one that needs scoring
/// still names what it cannot write. Needs a private mount namespace (`unshare -rm`).
#[test]
fn a_read_only_cache_that_is_up_to_date_needs_no_writing() {
    let (tmp, cfg) = precomputed("");
    let cfg = cfg.to_str().unwrap();
    let cache = tmp.path().join("cache");
    std::fs::remove_file(cache.join(".refdpo-precompute.lock")).unwrap();
    let read_only = |args: &[&str]| {
        let cache = cache.display();
        Command::new("unshare")
            .args(["-rm", "sh", "-c"])
            .arg(format!(
                "mount --bind {cache} {cache} && mount -o remount,bind,ro {cache} && \
                 exec \"$0\" \"$@\""
            ))
            .arg(env!("CARGO_BIN_EXE_refdpo"))
            .args(args)
            .current_dir(tmp.path())
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap()
    };
    let probe = read_only(&["--version"]);
    if !probe.status.success() {
        let why = String::from_utf8_lossy(&probe.stderr);
        assert!(
            std::env::var_os("CI").is_none(),
            "no private mount namespace (`unshare -rm`), required under CI=true: {why}"
        );
        eprintln!("skipped: no private mount namespace (`unshare -rm`): {why}");
        return;
    }
    let out = read_only(&["precompute", "--config", cfg]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("cache up to date in") && stdout.contains("nothing written"),
        "{stdout}"
    );
    assert!(!cache.join(".refdpo-precompute.lock").exists());
    // Another max_length needs scoring, which needs writing: named.
    let out = read_only(&[
        "precompute",
        "--config",
        cfg,
        "--set",
        "tokenize.max_length=80",
    ]);
    let stderr = assert_plain_error(&out, "a stale read-only cache");
    assert!(
        stderr.contains("cannot be written here (Read-only file system")
            && stderr.contains("not up to date")
            && stderr.contains("--set precompute.out=DIR"),
        "{stderr}"
    );
}

/// A cache truncated by another program while `train` reads it through its memory map ends the
/// run with an error naming the file and what to do, where SIGBUS killed it without a word.
#[test]
fn a_cache_truncated_under_train_is_named() {
    let (tmp, cfg) = precomputed("max_steps = 1000000\nlr_schedule = \"constant\"");
    let cfg = cfg.to_str().unwrap();
    let arrow = tmp.path().join("cache/train_prefs.arrow");
    let mut child = Command::new(env!("CARGO_BIN_EXE_refdpo"))
        .args(["train", "--config", cfg, "--quiet"])
        .args(["--set", "train.warmup_ratio=0"])
        .current_dir(tmp.path())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_lines(&mut child, &tmp.path().join("run/metrics.jsonl"), 2);
    let len = std::fs::metadata(&arrow).unwrap().len();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&arrow)
        .unwrap();
    file.set_len(len / 4).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("train ran on for 2 minutes over a cache cut to a quarter");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = assert_plain_error(&out, "train over a truncated cache");
    assert!(
        stderr.contains(&format!(
            "`{}` shrank while refdpo read it",
            arrow.display()
        )),
        "{stderr}"
    );
    // and the run refuses the damaged cache when resumed, by its checksum
    let err = fails(&["train", "--config", cfg, "--resume"], tmp.path());
    assert!(err.contains("train_prefs.arrow"), "{err}");
}
