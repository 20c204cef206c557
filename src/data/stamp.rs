//! A data file's identity without its bytes: device, inode, size and modification time. Stage one
//! hashes a split's files for the cache's fingerprint and reads them again to score them; a file
//! replaced or rewritten between the two would leave a cache holding one file's pairs under
//! another's hash, which a later run would take as up to date.
//!
//! The files are pinned ([`pin`]) before they are hashed: while the guard lives, every opening of
//! one of them ([`open`]: the hashing and every reading pass) checks that the file it opened is
//! the one stamped, so a file swapped for another, even one put back before the end, is never
//! read as the first. The stamps are compared again once the split is scored
//! ([`Pinned::unchanged`]), for a file rewritten in place.

use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
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
        let m = std::fs::metadata(path).map_err(|e| Error::io("cannot read", path, e))?;
        Ok(Self::from_metadata(&m))
    }

    /// The stamp of a file opened from `path`.
    fn of_file(file: &File, path: &Path) -> Result<Self> {
        let m = file
            .metadata()
            .map_err(|e| Error::io("cannot read", path, e))?;
        Ok(Self::from_metadata(&m))
    }

    fn from_metadata(m: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        Self {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            modified: m.modified().ok(),
        }
    }
}

/// The pinned files' stamps, each with how many guards pin it (both splits may read one file).
static PINS: RwLock<BTreeMap<PathBuf, (FileStamp, usize)>> = RwLock::new(BTreeMap::new());

fn changed(path: &Path) -> Error {
    Error::Changed {
        path: path.to_path_buf(),
        msg: "changed while stage one read it (it was replaced, rewritten or removed since it \
              was hashed): the cache would record the hash of other bytes than it scored. Run \
              precompute again once the dataset stays as it is."
            .into(),
    }
}

/// `files`, stamped and pinned until the guard drops (see the module's doc). A file pinned
/// already under another stamp has changed since: an error naming it.
pub fn pin(files: &[PathBuf]) -> Result<Pinned> {
    let stamps = files
        .iter()
        .map(|f| Ok((f.clone(), FileStamp::of(f)?)))
        .collect::<Result<Vec<_>>>()?;
    let mut pins = PINS.write().unwrap_or_else(|e| e.into_inner());
    for (path, stamp) in &stamps {
        if pins.get(path).is_some_and(|(pinned, _)| pinned != stamp) {
            return Err(changed(path));
        }
    }
    for (path, stamp) in &stamps {
        pins.entry(path.clone()).or_insert((stamp.clone(), 0)).1 += 1;
    }
    Ok(Pinned { stamps })
}

/// Files pinned by [`pin`], unpinned when this drops.
#[derive(Debug, Default)]
pub struct Pinned {
    stamps: Vec<(PathBuf, FileStamp)>,
}

impl Pinned {
    /// An error naming the first file whose stamp changed since it was pinned (or that is gone).
    pub fn unchanged(&self) -> Result<()> {
        for (path, then) in &self.stamps {
            if FileStamp::of(path).ok().as_ref() != Some(then) {
                return Err(changed(path));
            }
        }
        Ok(())
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let mut pins = PINS.write().unwrap_or_else(|e| e.into_inner());
        for (path, _) in &self.stamps {
            if let Some((_, n)) = pins.get_mut(path) {
                *n -= 1;
                if *n == 0 {
                    pins.remove(path);
                }
            }
        }
    }
}

/// Opens a data file for reading ([`crate::error::fs::open`]); a pinned one must be the very
/// file stamped, or it is an error naming it.
pub fn open(path: &Path) -> Result<File> {
    let file = crate::error::fs::open(path)?;
    let pinned = PINS
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(path)
        .map(|(stamp, _)| stamp.clone());
    match pinned {
        Some(stamp) if FileStamp::of_file(&file, path)? != stamp => Err(changed(path)),
        _ => Ok(file),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replaced_rewritten_or_removed_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("train.jsonl");
        std::fs::write(&f, "{}\n").unwrap();
        let taken = pin(std::slice::from_ref(&f)).unwrap();
        taken.unchanged().unwrap();
        // replaced by another file of the same size (a rename onto it)
        let other = dir.path().join("other.jsonl");
        std::fs::write(&other, "[]\n").unwrap();
        std::fs::rename(&other, &f).unwrap();
        let err = taken.unchanged().unwrap_err().to_string();
        assert!(
            err.contains("train.jsonl") && err.contains("changed while"),
            "{err}"
        );
        drop(taken);
        // rewritten in place: longer
        let taken = pin(std::slice::from_ref(&f)).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&f)
            .and_then(|mut h| std::io::Write::write_all(&mut h, b"{}\n"))
            .unwrap();
        assert!(taken.unchanged().is_err());
        drop(taken);
        let taken = pin(std::slice::from_ref(&f)).unwrap();
        std::fs::remove_file(&f).unwrap();
        assert!(taken.unchanged().is_err());
    }

    /// A pinned file swapped for another is refused by every opening while it is away, and read
    /// again once the very file stamped is back; unpinned, any file opens.
    #[test]
    fn a_pinned_file_opens_only_as_the_file_stamped() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("train.jsonl");
        std::fs::write(&f, "{\"a\": 1}\n").unwrap();
        let pinned = pin(std::slice::from_ref(&f)).unwrap();
        open(&f).unwrap();
        // both splits pin the file (`test_size`): one guard dropped keeps the other's pin
        let again = pin(std::slice::from_ref(&f)).unwrap();
        drop(again);
        let aside = dir.path().join("aside.jsonl");
        std::fs::rename(&f, &aside).unwrap();
        std::fs::write(&f, "{\"b\": 2}\n").unwrap();
        let err = open(&f).unwrap_err().to_string();
        assert!(err.contains("changed while"), "{err}");
        // pinning it again under the new stamp is refused too
        assert!(pin(std::slice::from_ref(&f)).is_err());
        std::fs::rename(&aside, &f).unwrap();
        open(&f).unwrap();
        pinned.unchanged().unwrap();
        drop(pinned);
        std::fs::write(&f, "{\"c\": 3}\n").unwrap();
        open(&f).unwrap();
    }
}
