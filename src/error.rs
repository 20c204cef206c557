//! The library's error type: one `thiserror` enum grouped by kind, messages carrying the values.

use std::path::PathBuf;

/// Everything that can go wrong inside refdpo's library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value or key is wrong; the message names the key and the fix.
    #[error("config: {0}")]
    Config(String),

    /// A file could not be read or written (the cause chain carries the OS's reason).
    #[error("{action} `{path}`")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// An output file could not be written (the cause says why: a full disk, a size limit…).
    #[error("cannot write `{path}`")]
    Write {
        path: PathBuf,
        #[source]
        source: Box<Error>,
    },

    /// Another refdpo process holds the directory.
    #[error("`{path}` is in use: {msg}")]
    Locked { path: PathBuf, msg: String },

    /// A JSON file that does not parse (or not into what it should hold).
    #[error("`{path}` is not valid JSON: {source}")]
    BadJson {
        path: PathBuf,
        source: serde_json::Error,
    },

    /// An input changed while it was read (the message says what to do).
    #[error("`{path}` {msg}")]
    Changed { path: PathBuf, msg: String },

    /// A directory holds outputs of another run or cache.
    #[error("`{path}` {msg}")]
    Occupied { path: PathBuf, msg: String },

    /// The run was interrupted (Ctrl-C, SIGTERM); the message says what was saved.
    #[error("interrupted: {0}")]
    Interrupted(String),

    /// A hub repository or file could not be resolved.
    #[error("hub: {0}")]
    Hub(String),

    /// An input file has the wrong layout or schema.
    #[error("schema of `{path}`: {msg}")]
    Schema { path: PathBuf, msg: String },

    /// No cache file where one was expected.
    #[error("no cache at `{path}`: {msg}")]
    MissingCache { path: PathBuf, msg: String },

    /// The cache does not belong to this configuration.
    #[error("stale cache `{path}`: {msg}")]
    StaleCache { path: PathBuf, msg: String },

    /// A cache file is truncated, corrupted or fails its checksum.
    #[error("corrupted cache `{path}`: {msg}")]
    CorruptCache { path: PathBuf, msg: String },

    /// Chat template or tokenizer failure.
    #[error("tokenize: {0}")]
    Tokenize(String),

    /// The model's files or tensors are not what we expect.
    #[error("model: {0}")]
    Model(String),

    /// A chart could not be drawn or written.
    #[error("plot `{path}`: {msg}")]
    Plot { path: PathBuf, msg: String },

    /// Training diverged or was misconfigured at run time.
    #[error("train: {0}")]
    Train(String),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error(transparent)]
    Arrow(#[from] arrow::error::ArrowError),

    #[error(transparent)]
    Parquet(#[from] parquet::errors::ParquetError),

    #[error(transparent)]
    Polars(#[from] polars::error::PolarsError),

    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

/// Shorthand used throughout the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error that names the file and what was being done to it.
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            action,
            path: path.into(),
            source,
        }
    }

    /// Names the output file a writer error happened on (an I/O error names it already).
    pub fn writing(self, path: &std::path::Path) -> Self {
        match self {
            e @ (Error::Io { .. } | Error::Write { .. } | Error::Plot { .. }) => e,
            // A writer's own I/O error: name the file, keep the OS's cause (full disk…).
            Error::Arrow(arrow::error::ArrowError::IoError(_, e))
            | Error::Candle(candle_core::Error::Io(e))
            | Error::Candle(candle_core::Error::SafeTensor(
                safetensors::SafeTensorError::IoError(e),
            )) => Error::io("cannot write", path, e),
            e => Error::Write {
                path: path.to_path_buf(),
                source: Box::new(e),
            },
        }
    }

    pub fn schema(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Schema {
            path: path.into(),
            msg: msg.into(),
        }
    }

    /// The message without its kind (`model: `, `train: `…), for a caller whose own message
    /// says what is at fault (a checkpoint's optimizer file is no model).
    pub fn detail(&self) -> String {
        match self {
            Error::Config(m) | Error::Tokenize(m) | Error::Model(m) | Error::Train(m) => m.clone(),
            other => other.to_string(),
        }
    }

    /// Whether this is the system refusing to let this process write a file (a read-only file
    /// system, a folder of another user), rather than anything about the file.
    pub fn is_not_writable(&self) -> bool {
        matches!(self, Error::Io { source, .. }
            if matches!(source.raw_os_error(), Some(libc::EROFS | libc::EACCES | libc::EPERM)))
    }

    /// A parquet reader's error on `path`: the system's (too many open files, a read that
    /// failed), found in the error's causes or its text, as that I/O error; anything else as a
    /// file that is not readable parquet.
    pub fn parquet(path: &std::path::Path, e: impl std::error::Error + 'static) -> Self {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(c) = cause {
            if let Some(io) = c.downcast_ref::<std::io::Error>() {
                let io = match io.raw_os_error() {
                    Some(code) => std::io::Error::from_raw_os_error(code),
                    None => std::io::Error::new(io.kind(), io.to_string()),
                };
                return Error::io("cannot read", path, io);
            }
            cause = c.source();
        }
        // parquet-rs passes some of the system's errors on as text only ("External: Too many
        // open files (os error 24)"): the code in that text is the system's
        let text = e.to_string();
        let code = text
            .rsplit_once("(os error ")
            .and_then(|(_, rest)| rest.split_once(')'))
            .and_then(|(code, _)| code.parse::<i32>().ok());
        match code {
            Some(code) => Error::io("cannot read", path, std::io::Error::from_raw_os_error(code)),
            None => Error::schema(path, format!("not a readable parquet file: {text}")),
        }
    }
}

thread_local! {
    /// Set while [`contain_panic`] runs a reader: its panic is reported as an error, not printed.
    static CONTAINED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `read`, a third-party decoder given a damaged or hostile file that may panic instead of
/// failing (parquet-rs does on some corrupted footers): a panic becomes an error naming `path`
/// and `what` was read. The process's panic hook (wrapped once, every other panic still goes to
/// the previous hook) stays quiet for a contained panic, so the user sees one `error:` line.
pub fn contain_panic<T>(
    path: &std::path::Path,
    what: &str,
    read: impl FnOnce() -> Result<T>,
) -> Result<T> {
    catch_quietly(read).unwrap_or_else(|why| {
        Err(Error::schema(
            path,
            format!("{what} failed on damaged bytes ({why}): the file is corrupted or not what its name says"),
        ))
    })
}

/// Runs `f`, which calls third-party code that may panic on hostile input (a tokenizer's regex
/// engine past its backtracking limit): a panic becomes `Err` with its message, and the panic
/// hook stays quiet for it (see [`contain_panic`]).
pub fn catch_quietly<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !CONTAINED.with(std::cell::Cell::get) {
                previous(info)
            }
        }));
    });
    let was = CONTAINED.with(|c| c.replace(true));
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    CONTAINED.with(|c| c.set(was));
    out.map_err(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_default()
    })
}

/// What to do about an error whose cause chain (`text`) holds a device's out-of-memory code,
/// which names no setting: a line to print after it.
pub fn hint(text: &str) -> Option<&'static str> {
    const DEVICE_OUT_OF_MEMORY: [&str; 3] = [
        "CUDA_ERROR_OUT_OF_MEMORY",
        "CUBLAS_STATUS_ALLOC_FAILED",
        "cudaErrorMemoryAllocation",
    ];
    DEVICE_OUT_OF_MEMORY
        .iter()
        .any(|code| text.contains(code))
        .then_some(
            "hint: the GPU ran out of memory. Lower what a step holds at once \
             (`precompute.batch_size`, `train.batch_size` with a larger `train.grad_accum`, \
             `tokenize.max_length`), keep `train.gradient_checkpointing = true`, or store less \
             per parameter (`train.state_dtype = \"bf16\"`, `train.optim = \"adamw_8bit\"`, \
             `train.lora.r`); `--profile` gives each phase's peak",
        )
}

/// `text` for a terminal: each line cut to its first `max` characters, saying how many were left
/// out. An error may quote its input (a TOML line, a `--set` value), which can be megabytes.
pub fn clip_lines(text: &str, max: usize) -> String {
    text.split('\n')
        .map(|line| match line.char_indices().nth(max) {
            Some((cut, _)) => format!(
                "{}… ({} more characters)",
                &line[..cut],
                line[cut..].chars().count()
            ),
            None => line.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `eprintln!` that never panics: a line stderr cannot take (a full disk, a closed pipe) is
/// dropped, as there is nowhere else to say it, and the command goes on. `eprintln!` panicked
/// there, so every command exited 101 before doing any work.
macro_rules! note {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}
pub(crate) use note;

/// Small helpers for file I/O that keep the path in the error.
pub mod fs {
    use super::{Error, Result};
    use std::fs::File;
    use std::io::{Read, Write};
    use std::path::Path;

    /// `path` opened for reading, refused unless it is a regular file (after symlinks): a named
    /// pipe would block the read, and a device such as `/dev/zero` would never end.
    pub fn open(path: impl AsRef<Path>) -> Result<File> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|e| Error::io("cannot open", path, e))?;
        if !meta.is_file() {
            let what = if meta.is_dir() {
                "a directory"
            } else {
                "a pipe, socket or device"
            };
            let e = std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("it is {what}, not a regular file"),
            );
            return Err(Error::io("cannot open", path, e));
        }
        File::open(path).map_err(|e| Error::io("cannot open", path, e))
    }

    /// A whole file (a regular one: see [`open`]).
    pub fn read(path: impl AsRef<Path>) -> Result<Vec<u8>> {
        let path = path.as_ref();
        let mut bytes = Vec::new();
        open(path)?
            .read_to_end(&mut bytes)
            .map_err(|e| Error::io("cannot read", path, e))?;
        Ok(bytes)
    }

    /// A whole text file (a regular one: see [`open`]).
    pub fn read_to_string(path: impl AsRef<Path>) -> Result<String> {
        let path = path.as_ref();
        let mut text = String::new();
        open(path)?
            .read_to_string(&mut text)
            .map_err(|e| Error::io("cannot read", path, e))?;
        Ok(text)
    }

    /// A JSON file read into `T`; a parse error names the file.
    pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
        serde_json::from_str(&read_to_string(path)?).map_err(|source| Error::BadJson {
            path: path.to_path_buf(),
            source,
        })
    }

    /// SHA-256 of a file's bytes (hex), streamed.
    pub fn sha256(path: &Path) -> Result<String> {
        sha256_of(open(path)?, path)
    }

    /// The SHA-256 of what `file` (opened from `path`) holds from where it stands.
    pub fn sha256_of(mut file: File, path: &Path) -> Result<String> {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        std::io::copy(&mut file, &mut h).map_err(|e| Error::io("cannot read", path, e))?;
        Ok(format!("{:x}", h.finalize()))
    }

    pub fn create_dir_all(path: &Path) -> Result<()> {
        std::fs::create_dir_all(path).map_err(|e| Error::io("cannot create directory", path, e))
    }

    /// Writes `bytes` to `path` atomically: a temporary sibling, fsync, then rename.
    pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
        write_file_atomic(path, |mut file, tmp| {
            file.write_all(bytes)
                .map_err(|e| Error::io("cannot write", tmp, e))?;
            Ok(file)
        })
    }

    /// Writes `path` through `write` (given the open temporary file and its path, returning the
    /// file when done), fsyncs and renames it into place. On any error the temporary file is
    /// removed, an existing `path` is left as it was, and the error names `path`.
    pub fn write_file_atomic(
        path: &Path,
        write: impl FnOnce(File, &Path) -> Result<File>,
    ) -> Result<()> {
        commit(path, |tmp| {
            let file = File::create(tmp).map_err(|e| Error::io("cannot create", tmp, e))?;
            let file = write(file, tmp)?;
            file.sync_all()
                .map_err(|e| Error::io("cannot sync", tmp, e))
        })
    }

    /// Like [`write_file_atomic`] for writers that take a path: `write` fills the temporary path.
    pub fn write_path_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
        commit(path, |tmp| {
            write(tmp)?;
            File::open(tmp)
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::io("cannot sync", tmp, e))
        })
    }

    fn commit(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
        let tmp = tmp_path(path);
        // Held until the rename is done: a second process writing the same path is refused
        // instead of writing into the same temporary (the one that renamed it could publish
        // the other's bytes, or a mix of both).
        let _held = hold(&tmp, path)?;
        let result = write(&tmp)
            .map_err(|e| e.writing(path))
            .and_then(|()| rename(&tmp, path));
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// An exclusive lock on the temporary `tmp` (created empty if missing) that `path` is written
    /// under. One left by a process that is gone is taken over (the OS released its lock); one
    /// held by a live process is an error naming `path`. The lock is on the file's inode, so a
    /// file that was renamed into place between opening and locking is let go and `tmp` opened
    /// again. Writers truncate the held file in place; safetensors replaces it with its own
    /// temporary, so weights are written only inside a locked directory (a cache, a run, a
    /// merge's output).
    fn hold(tmp: &Path, path: &Path) -> Result<File> {
        use fs4::FileExt;
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        for _ in 0..8 {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                .open(tmp)
                .map_err(|e| Error::io("cannot create", tmp, e))?;
            match FileExt::try_lock(&file) {
                Ok(()) => {}
                Err(fs4::TryLockError::WouldBlock) => {
                    return Err(Error::Locked {
                        path: path.to_path_buf(),
                        msg: format!(
                            "another refdpo process is writing it (through {}); wait for it to \
                             end, or write elsewhere",
                            tmp.display()
                        ),
                    })
                }
                Err(fs4::TryLockError::Error(e)) => return Err(Error::io("cannot lock", tmp, e)),
            }
            let same = |m: std::fs::Metadata| file.metadata().is_ok_and(|f| f.ino() == m.ino());
            if std::fs::symlink_metadata(tmp).is_ok_and(same) {
                return Ok(file);
            }
        }
        Err(Error::Locked {
            path: path.to_path_buf(),
            msg: format!("{} keeps being replaced by another process", tmp.display()),
        })
    }

    pub fn rename(from: &Path, to: &Path) -> Result<()> {
        std::fs::rename(from, to).map_err(|e| Error::io("cannot rename into place", to, e))
    }

    /// Gives `path` the mode a file created here gets, 0666 less the umask. safetensors' writer
    /// makes its files 0600, so trained weights were unreadable to a teammate or to a serving
    /// job under another user. The umask is read from `/proc/self/status` (Linux), as setting it
    /// to read it would race other threads; where it cannot be read the mode is left as it is.
    pub fn as_created(path: &Path) -> Result<()> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let umask = std::fs::read_to_string("/proc/self/status")
                .ok()
                .and_then(|s| {
                    let line = s.lines().find(|l| l.starts_with("Umask:"))?;
                    u32::from_str_radix(line["Umask:".len()..].trim(), 8).ok()
                });
            if let Some(umask) = umask {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666 & !umask))
                    .map_err(|e| Error::io("cannot set the permissions of", path, e))?;
            }
        }
        Ok(())
    }

    /// The temporary name a file is written under before it is renamed into place.
    pub fn tmp_path(path: &Path) -> std::path::PathBuf {
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(".tmp");
        path.with_file_name(name)
    }
}

#[cfg(test)]
mod tests {
    /// A device's out-of-memory code, as cudarc and cuBLAS print it inside candle's error, gets
    /// the line of settings to lower; other errors none.
    #[test]
    fn a_device_out_of_memory_gets_a_hint() {
        let cuda = "train: candle: DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")";
        assert!(super::hint(cuda).is_some_and(|h| h.contains("`train.batch_size`")));
        assert!(super::hint("cublas: CUBLAS_STATUS_ALLOC_FAILED").is_some());
        assert_eq!(super::hint("cannot read `x.parquet`: No such file"), None);
    }

    /// The system's error inside a parquet reader's (as an I/O cause, or only as text) is that
    /// I/O error on the file; anything else is a file that is not readable parquet.
    #[test]
    fn a_parquet_readers_system_error_is_an_io_error() {
        use parquet::errors::ParquetError;
        let path = std::path::Path::new("d.parquet");
        let io = std::io::Error::from_raw_os_error(libc::EMFILE);
        for e in [
            ParquetError::External(Box::new(io)),
            ParquetError::General("External: Too many open files (os error 24)".into()),
        ] {
            match super::Error::parquet(path, e) {
                super::Error::Io { source, .. } => {
                    assert_eq!(source.raw_os_error(), Some(libc::EMFILE))
                }
                e => panic!("{e}"),
            }
        }
        let e = super::Error::parquet(path, ParquetError::General("bad magic".into()));
        assert!(
            e.to_string().contains("not a readable parquet file: "),
            "{e}"
        );
    }

    #[test]
    fn a_file_being_written_by_another_process_is_refused() {
        use fs4::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("judge.jsonl");
        let tmp = super::fs::tmp_path(&out);
        // another writer: its own open file description holds the temporary
        let other = std::fs::File::create(&tmp).unwrap();
        FileExt::try_lock(&other).unwrap();
        let err = super::fs::write_atomic(&out, b"mine")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("is in use") && err.contains("judge.jsonl.tmp"),
            "{err}"
        );
        assert!(!out.exists());
        // gone (a killed process: the OS released its lock): its leftover is taken over
        std::fs::write(&tmp, b"a killed writer's longer leftover").unwrap();
        drop(other);
        super::fs::write_atomic(&out, b"mine").unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"mine");
        assert!(!tmp.exists());
        // never through a link at the temporary's name
        let target = dir.path().join("target");
        std::fs::write(&target, b"keep").unwrap();
        std::os::unix::fs::symlink(&target, &tmp).unwrap();
        assert!(super::fs::write_atomic(&out, b"other").is_err());
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
    }

    #[test]
    fn long_lines_are_clipped_by_characters() {
        let line = "é".repeat(10);
        assert_eq!(super::clip_lines(&line, 20), line);
        assert_eq!(
            super::clip_lines(&format!("a\n{line}"), 4),
            "a\néééé… (6 more characters)"
        );
    }
}
