//! A data file's identity without its bytes: device, inode, size and modification time. Stage one
//! hashes a split's files for the cache's fingerprint and reads them again to score them; a file
//! replaced or rewritten between the two would leave a cache holding one file's pairs under
//! another's hash, which a later run would take as up to date. The stamps taken before hashing
//! are compared once the split is scored.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    modified: Option<SystemTime>,
}

impl FileStamp {
    /// The file's stamp, through links as it is read.
    pub fn of(path: &Path) -> Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).map_err(|e| Error::io("cannot read", path, e))?;
        Ok(Self {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            modified: m.modified().ok(),
        })
    }
}

/// The stamps of `files`.
pub fn stamps(files: &[PathBuf]) -> Result<Vec<(PathBuf, FileStamp)>> {
    files
        .iter()
        .map(|f| Ok((f.clone(), FileStamp::of(f)?)))
        .collect()
}

/// An error naming the first file whose stamp changed since `stamps` were taken (or that is gone).
pub fn unchanged(stamps: &[(PathBuf, FileStamp)]) -> Result<()> {
    for (path, then) in stamps {
        if FileStamp::of(path).ok().as_ref() != Some(then) {
            return Err(Error::Changed {
                path: path.clone(),
                msg: "changed while stage one read it (it was replaced, rewritten or removed \
                      since it was hashed): the cache would record the hash of other bytes than \
                      it scored. Run precompute again once the dataset stays as it is."
                    .into(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replaced_rewritten_or_removed_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("train.jsonl");
        std::fs::write(&f, "{}\n").unwrap();
        let taken = stamps(std::slice::from_ref(&f)).unwrap();
        unchanged(&taken).unwrap();
        // replaced by another file of the same size (a rename onto it)
        let other = dir.path().join("other.jsonl");
        std::fs::write(&other, "[]\n").unwrap();
        std::fs::rename(&other, &f).unwrap();
        let err = unchanged(&taken).unwrap_err().to_string();
        assert!(
            err.contains("train.jsonl") && err.contains("changed while"),
            "{err}"
        );
        // rewritten in place: longer
        let taken = stamps(std::slice::from_ref(&f)).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&f)
            .and_then(|mut h| std::io::Write::write_all(&mut h, b"{}\n"))
            .unwrap();
        assert!(unchanged(&taken).is_err());
        let taken = stamps(std::slice::from_ref(&f)).unwrap();
        std::fs::remove_file(&f).unwrap();
        assert!(unchanged(&taken).is_err());
    }
}
