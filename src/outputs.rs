//! Output directories — a cache (`precompute.out`) or a run (`train.out`): one writer at a time
//! (a lock file naming its holder's pid, released when the process ends, however it ends), and no
//! silent mixing of two runs: what is already there is refused unless `--resume` continues it or
//! `--overwrite` replaces it.

use crate::error::{fs, Error, Result};
use fs4::FileExt;
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// What to do with outputs already in the directory (`train --resume`, `--overwrite`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Existing {
    /// Refuse another run's outputs (the default).
    #[default]
    Refuse,
    /// Continue the run that is there.
    Resume,
    /// Delete the other run's outputs first.
    Overwrite,
}

/// An exclusive hold on an output directory, released on drop or when the process dies.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// The lock file's name in the directory it holds.
    pub fn file_name(what: &str) -> String {
        format!(".refdpo-{what}.lock")
    }

    /// The pid of the process that holds `<dir>/.refdpo-<what>.lock` now, as the kernel lists
    /// it in `/proc/locks`. Nothing is taken, so a writer starting meanwhile is not disturbed:
    /// this is for messages. None where no process holds it, or the system does not say.
    pub fn holder(dir: &Path, what: &str) -> Option<u32> {
        use std::os::unix::fs::MetadataExt;
        let ino = std::fs::symlink_metadata(dir.join(Self::file_name(what)))
            .ok()?
            .ino();
        // "1: FLOCK  ADVISORY  WRITE 4242 00:2a:1234 0 EOF" (a waiter's line has "->" first)
        let find = |locks: &str| {
            locks.lines().find_map(|line| {
                let words: Vec<&str> = line.split_whitespace().collect();
                let at = words.iter().position(|w| *w == "FLOCK")?;
                let (pid, file) = (words.get(at + 3)?, words.get(at + 4)?);
                let held = file.rsplit(':').next()?.parse::<u64>().ok()? == ino;
                held.then(|| pid.parse().ok()).flatten()
            })
        };
        // /proc/locks is made a page at a time: a list changing under the read (other locks
        // taken and released) can skip a line, so a lock not seen is looked for again
        (0..3).find_map(|_| find(&std::fs::read_to_string("/proc/locks").ok()?))
    }

    /// Creates `dir` and takes `<dir>/.refdpo-<what>.lock`. Held by a live process: refused at
    /// once, naming its pid. Left by a process that is gone: taken over (the OS released it).
    pub fn acquire(dir: &Path, what: &str) -> Result<Self> {
        fs::create_dir_all(dir)?;
        let path = dir.join(Self::file_name(what));
        // Never through a symlink (it would overwrite its target with a pid), and only a
        // regular file: O_NOFOLLOW fails on a link, and a pipe or device is refused below.
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
            .map_err(|e| {
                let e = if e.raw_os_error() == Some(libc::ELOOP) {
                    std::io::Error::other("it is a symbolic link; remove it")
                } else {
                    e
                };
                Error::io("cannot open", &path, e)
            })?;
        if !file.metadata().is_ok_and(|m| m.is_file()) {
            let e = std::io::Error::other("it is not a regular file; remove it");
            return Err(Error::io("cannot lock", &path, e));
        }
        match FileExt::try_lock(&file) {
            Ok(()) => {}
            Err(fs4::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                return Err(Error::Locked {
                    path: dir.to_path_buf(),
                    msg: format!(
                        "another `refdpo {what}` (pid {}) is writing here; wait for it to end or \
                         stop it (its lock is {})",
                        holder.trim(),
                        path.display()
                    ),
                });
            }
            Err(fs4::TryLockError::Error(e)) => return Err(Error::io("cannot lock", &path, e)),
        }
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| write!(file, "{}", std::process::id()))
            .map_err(|e| Error::io("cannot write", &path, e))?;
        Ok(Self { _file: file })
    }
}

/// An output folder being built under its temporary name (`<out>.tmp`) by this process alone: a
/// lock inside it refuses a second writer (which would write into the same folder, so that
/// whichever renamed it could publish the other's files); what a killed writer left is cleared.
/// [`Building::publish`] renames it into place, the lock with it, and removes the lock file.
#[derive(Debug)]
pub struct Building {
    dir: PathBuf,
    what: &'static str,
    lock: DirLock,
}

impl Building {
    /// Takes `<out>.tmp` for `refdpo <what>`, emptied.
    pub fn start(out: &Path, what: &'static str) -> Result<Self> {
        let dir = fs::tmp_path(out);
        let lock = DirLock::acquire(&dir, what)?;
        let name = DirLock::file_name(what);
        for entry in std::fs::read_dir(&dir).map_err(|e| Error::io("cannot read", &dir, e))? {
            let entry = entry.map_err(|e| Error::io("cannot read", &dir, e))?;
            if entry.file_name() != name.as_str() {
                remove(&entry.path())?;
            }
        }
        Ok(Self { dir, what, lock })
    }

    /// The folder to write into.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Moves the finished folder to `out` (which must not exist, or be an empty folder). Where
    /// that fails (another writer put its own folder there after this one began), the folder is
    /// removed: nothing is left behind.
    pub fn publish(self, out: &Path) -> Result<()> {
        let placed = match std::fs::remove_dir(out) {
            Err(e) if e.kind() == std::io::ErrorKind::DirectoryNotEmpty => Err(Error::Locked {
                path: out.to_path_buf(),
                msg: format!(
                    "another `refdpo {}` wrote it while this one ran; this one's output is \
                     removed. Choose a new --out, or delete it and run again",
                    self.what
                ),
            }),
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(Error::io("cannot replace", out, e))
            }
            _ => fs::rename(&self.dir, out),
        };
        if placed.is_err() {
            let _ = std::fs::remove_dir_all(&self.dir);
            return placed;
        }
        let _ = std::fs::remove_file(out.join(DirLock::file_name(self.what)));
        drop(self.lock);
        Ok(())
    }

    /// Gives the folder up, removing it (after an error: nothing is left behind).
    pub fn abandon(self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An `--out` file of JSON lines (`generate`, `judge`) must be named `*.jsonl`, and replaces an
/// existing file only if that holds the command's own lines (`own` takes its first line): so a
/// mistyped path cannot replace a cache, a checkpoint, a dataset or a run's `metrics.jsonl`.
pub fn check_jsonl_out(out: &Path, own: impl Fn(&str) -> bool) -> Result<()> {
    let refuse = |why: &str| {
        Err(Error::Config(format!(
            "--out {}: {why}; name another file (this keeps a mistyped path from replacing \
             an input or another output)",
            out.display()
        )))
    };
    if out.is_dir() {
        return refuse("it is a directory; the output is a file of JSON lines");
    }
    if out.extension().is_none_or(|e| e != "jsonl") {
        return refuse("the output is JSON lines, so its name must end in `.jsonl`");
    }
    if out.exists() {
        // its first line is enough to tell, without reading a large file whole
        use std::io::BufRead;
        let first = std::io::BufReader::new(fs::open(out)?)
            .lines()
            .find(|l| l.as_ref().map_or(true, |l| !l.trim().is_empty()));
        // a line that is not UTF-8 text is no line of this command's either
        if first.is_some_and(|l| l.map_or(true, |l| !own(&l))) {
            return refuse("it exists and holds other lines than this command writes");
        }
    }
    Ok(())
}

/// Whether a directory entry is part of a training run's outputs.
fn is_run_output(name: &str) -> bool {
    crate::dirs::RunDir::is_output(name)
}

/// A run's outputs in `dir`, sorted by name.
pub fn run_outputs(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(is_run_output)
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

/// A run's folder is not a model or checkpoint folder, nor inside one or inside another run:
/// checked before its lock is taken, so a refused folder gets no lock file either (fuzzer).
pub fn refuse_run_inside(dir: &Path) -> Result<()> {
    refuse_inside_another(dir, "train.out", true)
}

/// Makes `dir` ready for a new run: empty of run outputs, or refused (see [`Existing`]). A run
/// that stopped before its first step left only its `config.toml`: nothing to lose, so no refusal.
pub fn claim_run_dir(dir: &Path, existing: Existing) -> Result<()> {
    refuse_inside_another(dir, "train.out", true)?;
    let found = run_outputs(dir);
    let progress = found
        .iter()
        .any(|p| p.file_name().is_some_and(|n| n != "config.toml"));
    if !progress || existing == Existing::Resume {
        return Ok(());
    }
    if existing == Existing::Refuse {
        let mut names: Vec<String> = found
            .iter()
            .filter_map(|p| p.file_name()?.to_str().map(String::from))
            .collect();
        if names.len() > 6 {
            let more = names.len() - 5;
            names.truncate(5);
            names.push(format!("and {more} more"));
        }
        return Err(Error::Occupied {
            path: dir.to_path_buf(),
            msg: format!(
                "holds another run ({}): continue it with `refdpo train --resume`, train into a \
                 new directory with `--set train.out=DIR`, or delete it with `--overwrite`",
                names.join(", ")
            ),
        });
    }
    found.iter().try_for_each(|p| remove(p))
}

/// Refuses when a file a command would write (`writes`) is one of its inputs (`inputs`, each with
/// what it is): `--overwrite` replaces outputs, never the files a run reads (a dataset file named
/// as a cache split's file, a `--config` file named `config.toml` in the output folder). The same
/// file is the same device and inode, so links and hard links are found too.
pub fn refuse_writing_over(writes: &[PathBuf], inputs: &[(PathBuf, &str)]) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let id = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    for w in writes {
        let Some(at) = id(w) else { continue };
        if let Some((input, what)) = inputs.iter().find(|(i, _)| id(i) == Some(at)) {
            return Err(Error::Occupied {
                path: w.clone(),
                msg: format!(
                    "is {what} (`{}`), which this command would write over: choose another \
                     output folder, or move the input out of it",
                    input.display()
                ),
            });
        }
    }
    Ok(())
}

/// A cache (`precompute.out`) never goes into (or below) a model or checkpoint folder, or the
/// dataset's folder: its files would mix with theirs (a split's Parquet file matched as data by
/// a `data_files` glob, a model folder no longer a clean HF checkpoint).
pub fn refuse_cache_inside(dir: &Path, dataset_dir: Option<&Path>) -> Result<()> {
    refuse_inside_another(dir, "precompute.out", false)?;
    let cwd = std::env::current_dir().unwrap_or_default();
    let real = |p: &Path| std::fs::canonicalize(cwd.join(p)).ok();
    // the nearest existing folder of `dir`, links resolved (a cache not made yet is inside its
    // parent's; a link to a model's subfolder is inside the model)
    let Some(at) = cwd.join(dir).ancestors().find_map(real) else {
        return Ok(());
    };
    refuse_inside_another(&at, "precompute.out", false)?;
    let Some(data) = dataset_dir.and_then(real) else {
        return Ok(());
    };
    if at.starts_with(&data) {
        return Err(Error::Occupied {
            path: dir.to_path_buf(),
            msg: format!(
                "is the dataset's folder or inside it (`{}`): the cache's files would mix with \
                 the data (a glob of `dataset.data_files` could read them as rows); choose \
                 `precompute.out` outside it",
                data.display()
            ),
        });
    }
    Ok(())
}

/// A run never goes into (or below) a model or checkpoint folder, or below another run's folder
/// (`runs`): its files would mix with theirs (a `final/` that is no longer a clean HF
/// checkpoint). `key` is the setting that names `dir`.
fn refuse_inside_another(dir: &Path, key: &str, runs: bool) -> Result<()> {
    let abs = std::env::current_dir().unwrap_or_default().join(dir);
    for (i, at) in abs.ancestors().enumerate() {
        let has = |f: &str| at.join(f).is_file();
        let what = if has("adapter_config.json")
            || (has("config.json")
                && (has("model.safetensors") || has("model.safetensors.index.json")))
        {
            "a model or checkpoint folder"
        } else if runs
            && i > 0
            && has(crate::dirs::RunDir::METRICS)
            && has(crate::dirs::RunDir::CONFIG)
        {
            "another run's folder"
        } else {
            continue;
        };
        return Err(Error::Occupied {
            path: dir.to_path_buf(),
            msg: format!(
                "is {}{what} (`{}`): {} there would mix its files with it; choose `{key}` \
                 outside it",
                if i == 0 { "" } else { "inside " },
                at.display(),
                if runs { "a run" } else { "a cache" }
            ),
        });
    }
    Ok(())
}

/// Removes `dir` when it holds nothing but refdpo's lock files (a command that made it and then
/// stopped before writing anything).
pub fn remove_if_only_locks(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let only_locks = entries.filter_map(|e| e.ok()).all(|e| {
        let name = e.file_name();
        let name = name.to_string_lossy();
        name.starts_with(".refdpo-") && name.ends_with(".lock")
    });
    if only_locks {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Removes a file or a directory tree.
pub fn remove(path: &Path) -> Result<()> {
    let result = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    result.map_err(|e| Error::io("cannot remove", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_with_the_pid_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let held = DirLock::acquire(dir.path(), "train").unwrap();
        let err = DirLock::acquire(dir.path(), "train")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        // A different kind of writer uses its own lock.
        DirLock::acquire(dir.path(), "precompute").unwrap();
        drop(held);
        DirLock::acquire(dir.path(), "train").unwrap();
    }

    /// The holder is read off the kernel's lock table while the lock lives, and is gone with it.
    #[test]
    fn the_holder_of_a_lock_is_named_while_it_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(DirLock::holder(dir.path(), "train"), None);
        let held = DirLock::acquire(dir.path(), "train").unwrap();
        assert_eq!(
            DirLock::holder(dir.path(), "train"),
            Some(std::process::id())
        );
        assert_eq!(DirLock::holder(dir.path(), "precompute"), None);
        drop(held);
        assert_eq!(DirLock::holder(dir.path(), "train"), None);
    }

    #[test]
    fn run_outputs_are_refused_or_removed_and_other_files_kept() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        claim_run_dir(d, Existing::Refuse).unwrap();
        std::fs::write(d.join("config.toml"), "x").unwrap();
        claim_run_dir(d, Existing::Refuse).unwrap(); // a run that never stepped
        for f in ["metrics.jsonl", "notes.txt", ".refdpo-train.lock"] {
            std::fs::write(d.join(f), "x").unwrap();
        }
        for sub in [
            "checkpoint-32",
            "final",
            "checkpoint-64.old",
            "checkpoint-x",
        ] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        let err = claim_run_dir(d, Existing::Refuse).unwrap_err().to_string();
        for part in [
            "checkpoint-32",
            "metrics.jsonl",
            "final",
            "--resume",
            "--overwrite",
            "train.out",
        ] {
            assert!(err.contains(part), "{part}: {err}");
        }
        claim_run_dir(d, Existing::Resume).unwrap();
        assert!(d.join("metrics.jsonl").exists());
        claim_run_dir(d, Existing::Overwrite).unwrap();
        let left: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        let mut left = left;
        left.sort();
        assert_eq!(left, [".refdpo-train.lock", "checkpoint-x", "notes.txt"]);
    }

    #[test]
    fn a_folder_built_under_a_lock_is_published_whole_or_removed() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("merged");
        let b = Building::start(&out, "merge").unwrap();
        std::fs::write(b.path().join("model.safetensors"), b"mine").unwrap();
        // a second writer while it builds
        let err = Building::start(&out, "merge").unwrap_err().to_string();
        assert!(err.contains("is in use"), "{err}");
        // another writer's folder landed at `out` meanwhile: this one is removed, not left
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join("model.safetensors"), b"theirs").unwrap();
        let err = b.publish(&out).unwrap_err().to_string();
        assert!(err.contains("wrote it while this one ran"), "{err}");
        assert!(!fs::tmp_path(&out).exists());
        assert_eq!(
            std::fs::read(out.join("model.safetensors")).unwrap(),
            b"theirs"
        );
        // into a fresh place: published, its lock file gone
        let fresh = dir.path().join("fresh");
        let b = Building::start(&fresh, "merge").unwrap();
        std::fs::write(b.path().join("model.safetensors"), b"mine").unwrap();
        b.publish(&fresh).unwrap();
        let names: Vec<_> = std::fs::read_dir(&fresh)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["model.safetensors"]);
    }
}

#[cfg(test)]
mod inside_tests {
    use super::*;

    /// `train.out` in a run's `final/` (an HF checkpoint) or below another run: refused, naming
    /// the folder; beside them: allowed.
    #[test]
    fn a_run_is_not_written_into_a_model_or_another_run() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("runs/a");
        std::fs::create_dir_all(run.join("final")).unwrap();
        for f in ["config.toml", "metrics.jsonl"] {
            std::fs::write(run.join(f), "x").unwrap();
        }
        for f in ["config.json", "model.safetensors"] {
            std::fs::write(run.join("final").join(f), "x").unwrap();
        }
        for (dir, said) in [
            (run.join("final"), "is a model or checkpoint folder"),
            (run.join("final/sub"), "inside a model or checkpoint folder"),
            (run.join("b"), "inside another run's folder"),
        ] {
            let err = claim_run_dir(&dir, Existing::Overwrite)
                .unwrap_err()
                .to_string();
            assert!(err.contains(said), "{err}");
        }
        claim_run_dir(&tmp.path().join("runs/b"), Existing::Refuse).unwrap();
        claim_run_dir(&run, Existing::Resume).unwrap();
    }

    /// `precompute.out` in a model folder or in the dataset's folder (made or not yet):
    /// refused, naming the folder; beside them: allowed.
    #[test]
    fn a_cache_is_not_written_into_a_model_or_the_dataset() {
        let tmp = tempfile::tempdir().unwrap();
        let (model, data) = (tmp.path().join("model"), tmp.path().join("data"));
        std::fs::create_dir_all(&model).unwrap();
        std::fs::create_dir_all(data.join("data")).unwrap();
        for f in ["config.json", "model.safetensors"] {
            std::fs::write(model.join(f), "x").unwrap();
        }
        for (dir, said) in [
            (model.clone(), "is a model or checkpoint folder"),
            (data.clone(), "the dataset's folder"),
            (data.join("data"), "the dataset's folder"),
            (data.join("not/yet"), "the dataset's folder"),
        ] {
            let err = refuse_cache_inside(&dir, Some(&data))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(said) && err.contains("precompute.out"),
                "{err}"
            );
        }
        // a link to a model's subfolder is inside the model
        std::fs::create_dir(model.join("sub")).unwrap();
        #[cfg(unix)]
        {
            let link = tmp.path().join("link");
            std::os::unix::fs::symlink(model.join("sub"), &link).unwrap();
            let err = refuse_cache_inside(&link, None).unwrap_err().to_string();
            assert!(err.contains("model or checkpoint folder"), "{err}");
        }
        refuse_cache_inside(&tmp.path().join("cache"), Some(&data)).unwrap();
        refuse_cache_inside(&data, None).unwrap();
    }
}
