//! Where each split's rows come from: one local file (the train split), `dataset.data_files`
//! (split → file or glob in the dataset directory), or `data/<split>-*.parquet`; and the seeded
//! held-out test split of `dataset.test_size`.

use super::layout::Mapping;
use super::records::{self, Format};
use super::{PreferenceRow, Skipped};
use crate::config::DatasetConfig;
use crate::error::{Error, Result};
use crate::hub;
use std::path::{Path, PathBuf};

/// The seed of the held-out split: fixed, so the same rows are held out on every run.
const HOLDOUT_SEED: u64 = 0x7e57_5e1e;

/// A resolved `[dataset]`: the directory its files live in and how splits map to files.
#[derive(Debug, Clone)]
pub struct DataSource {
    cfg: DatasetConfig,
    /// The dataset directory (a local one, a hub snapshot, or the single file's folder).
    pub dir: PathBuf,
    /// `dataset.id` when it names one file: the train split.
    single_file: Option<PathBuf>,
    /// Rows larger than this are skipped unread ([`super::max_row_bytes`]).
    pub max_row_bytes: usize,
    /// The hub commit the dataset resolved to; `None` for local data.
    pub commit: Option<String>,
}

impl DataSource {
    /// The folder the dataset is, where `dataset.id` names a folder (or a hub snapshot), not a
    /// single file.
    pub fn data_folder(&self) -> Option<&Path> {
        self.single_file.is_none().then_some(self.dir.as_path())
    }

    /// Resolves `dataset.id`: a local file or directory as is, a hub id by downloading the files
    /// `splits` need (the `data_files` patterns, else `data/<split>-*.parquet`).
    pub fn resolve(cfg: &DatasetConfig, splits: &[&str]) -> Result<Self> {
        let id = Path::new(&cfg.id);
        if id.is_file() {
            Format::of(id)?;
            let dir = id.parent().map(Path::to_path_buf).unwrap_or_default();
            return Ok(Self {
                cfg: cfg.clone(),
                dir,
                single_file: Some(id.to_path_buf()),
                max_row_bytes: usize::MAX,
                commit: None,
            });
        }
        // a data file's name is never a hub id: say it is missing, not that the hub is
        let data_file = matches!(
            id.extension().and_then(|e| e.to_str()),
            Some("parquet" | "jsonl" | "ndjson" | "json" | "csv")
        );
        if data_file && !id.exists() {
            let cwd = std::env::current_dir().unwrap_or_default();
            return Err(Error::Config(format!(
                "`dataset.id`: no file `{}` (relative paths are read from `{}`): check the path; \
                 `dataset.id` takes a .parquet, .jsonl or .json file, a folder, or a hub id",
                cfg.id,
                cwd.display()
            )));
        }
        let patterns: Vec<String> = splits.iter().map(|s| pattern(cfg, s)).collect();
        let wanted = |f: &str| patterns.iter().any(|p| glob_match(p, f));
        let repo = hub::dataset(&cfg.id, &cfg.revision, &wanted)?;
        Ok(Self {
            cfg: cfg.clone(),
            dir: repo.dir,
            single_file: None,
            max_row_bytes: usize::MAX,
            commit: repo.commit,
        })
    }

    /// Whether the source has `split` at all: a test split exists only through `data_files`,
    /// `test_size`, or (without `data_files`, for a directory) `data/<split>-*.parquet`.
    pub fn has_split(&self, split: &str) -> bool {
        if split != self.cfg.test_split || self.cfg.test_size > 0.0 {
            return true;
        }
        if self.cfg.data_files.contains_key(split) {
            return true;
        }
        self.single_file.is_none() && self.cfg.data_files.is_empty()
    }

    /// With `test_size`: how many files of the source's own test split the hold-out replaces
    /// (0 without `test_size`, or for a source with no test split).
    pub fn replaced_test_files(&self) -> usize {
        let test = &self.cfg.test_split;
        let single = self.single_file.is_some() && !self.cfg.data_files.contains_key(test);
        if self.cfg.test_size <= 0.0 || single {
            return 0;
        }
        let mut files = Vec::new();
        let _ = list_matching(&self.dir, &pattern(&self.cfg, test), &mut files);
        files.len()
    }

    /// The files holding `split` (for the held-out test split: the train split's files).
    pub fn files(&self, split: &str) -> Result<Vec<PathBuf>> {
        let split = self.source_split(split);
        if let (Some(f), false) = (&self.single_file, self.cfg.data_files.contains_key(split)) {
            if split == self.cfg.train_split {
                return Ok(vec![f.clone()]);
            }
        }
        let pattern = pattern(&self.cfg, split);
        let mut files = Vec::new();
        list_matching(&self.dir, &pattern, &mut files)?;
        files.sort();
        if files.is_empty() {
            return Err(Error::schema(
                &self.dir,
                format!(
                    "no files match `{pattern}` for split `{split}`: check `dataset.data_files` \
                     (split → file or glob) or `dataset.train_split` / `dataset.test_split`"
                ),
            ));
        }
        // A test split whose patterns also match a train file would score training rows.
        if split == self.cfg.test_split && split != self.cfg.train_split {
            let train = self.files(&self.cfg.train_split)?;
            if let Some(f) = files.iter().find(|f| train.contains(f)) {
                return Err(Error::schema(
                    f,
                    format!(
                        "is matched for both split `{}` and split `{split}`: the evaluation would \
                         score training rows. Make `dataset.data_files`' patterns disjoint.",
                        self.cfg.train_split
                    ),
                ));
            }
        }
        Ok(files)
    }

    /// SHA-256 of each file of `split`, by its path relative to the dataset directory: what the
    /// cache fingerprint records of the data.
    pub fn hash_files(&self, split: &str) -> Result<std::collections::BTreeMap<String, String>> {
        self.files(split)?
            .iter()
            .map(|f| {
                let rel = f.strip_prefix(&self.dir).unwrap_or(f);
                let rel = rel.to_string_lossy().replace('\\', "/");
                Ok((rel, crate::error::fs::sha256_of(super::stamp::open(f)?, f)?))
            })
            .collect()
    }

    /// With `test_size`, both splits read the train split's rows.
    fn source_split<'a>(&'a self, split: &'a str) -> &'a str {
        if self.cfg.test_size > 0.0 && split == self.cfg.test_split {
            &self.cfg.train_split
        } else {
            split
        }
    }
}

/// A split's rows, the ones that could not be rows, and where they came from.
#[derive(Debug, Clone)]
pub struct ReadSplit {
    pub rows: Vec<PreferenceRow>,
    pub skipped: Vec<Skipped>,
    /// Rows read (kept + skipped), after `limit` and the held-out split.
    pub rows_read: usize,
    pub files: Vec<PathBuf>,
}

/// Reads the first `limit` rows (0 = all; `dataset.limit` for a run) of `split`, mapped through
/// the config's columns, message keys and roles; with `test_size`, then keeps the split's side
/// of the seeded hold-out. Everything in memory: for `show` and small splits; stage one streams
/// with [`for_each_row`].
pub fn read_split(src: &DataSource, split: &str, limit: usize) -> Result<ReadSplit> {
    let (mut rows, mut skipped) = (Vec::new(), Vec::new());
    let files = src.files(split)?;
    let rows_read = for_each_row(src, split, limit, &mut |r| {
        match r {
            Ok(row) => rows.push(row),
            Err(s) => skipped.push(s),
        }
        Ok(true)
    })?;
    Ok(ReadSplit {
        rows,
        skipped,
        rows_read,
        files,
    })
}

/// Streams the rows of `split` as [`read_split`] reads them — each a row or a counted skip, in
/// source order — without holding them; `each` returns false to stop early. Returns the rows
/// read (kept + skipped). With `test_size` the source is read twice: once to count its rows
/// for the seeded hold-out, then for the rows.
pub fn for_each_row(
    src: &DataSource,
    split: &str,
    limit: usize,
    each: &mut dyn FnMut(std::result::Result<PreferenceRow, Skipped>) -> Result<bool>,
) -> Result<usize> {
    let cfg = &src.cfg;
    let files = src.files(split)?;
    let held_out = if cfg.test_size > 0.0 {
        let n = count_records(&files, limit, src.max_row_bytes)?;
        if cfg.test_size >= 1.0 && cfg.test_size >= n as f64 {
            return Err(Error::Config(format!(
                "`dataset.test_size` = {} rows holds out all {n} rows of split `{}`: none is left \
                 to train on. Hold out fewer rows, or a fraction below 1.",
                cfg.test_size, cfg.train_split
            )));
        }
        let test = held_out(n, cfg.test_size);
        if split == cfg.test_split && test.is_empty() {
            return Err(Error::Config(format!(
                "`dataset.test_size` = {} holds out no row of {n} rows",
                cfg.test_size
            )));
        }
        Some((test, split == cfg.test_split))
    } else {
        None
    };
    let keep = |i: u64| match &held_out {
        Some((test, want_test)) => test.binary_search(&i).is_ok() == *want_test,
        None => true,
    };
    let mapping = Mapping::new(cfg);
    let (mut n, mut read) = (0u64, 0usize);
    let mut stop = false;
    for file in &files {
        // the columns are the file's when a row of its first ones has them: a mapping that
        // misses in each of the first rows is refused, naming what they hold; one bad row
        // among good ones is a counted skip
        let (mut columns_found, mut lacking) = (false, 0usize);
        let mut pending_columns_error = None;
        let mut failure = None;
        records::for_each(file, src.max_row_bytes, &|c| mapping.reads(c), &mut |rec| {
            let row = n;
            n += 1;
            let result = match &rec.fields {
                Ok(fields) => {
                    if !columns_found {
                        match mapping.check_columns(fields, file) {
                            Ok(()) => columns_found = true,
                            Err(e) => {
                                lacking += 1;
                                if lacking >= COLUMN_PROBE_ROWS {
                                    failure = Some(e);
                                    return false;
                                }
                                pending_columns_error = Some(e);
                            }
                        }
                    }
                    mapping.row(row, rec.line, fields)
                }
                Err(reason) => Err(*reason),
            };
            if keep(row) {
                read += 1;
                let item = result.map_err(|reason| Skipped {
                    row,
                    line: rec.line,
                    reason: reason.as_str(),
                    detail: None,
                });
                match each(item) {
                    Ok(true) => {}
                    Ok(false) => {
                        stop = true;
                        return false;
                    }
                    Err(e) => {
                        failure = Some(e);
                        return false;
                    }
                }
            }
            limit == 0 || (n as usize) < limit
        })?;
        if let Some(e) = failure {
            return Err(e);
        }
        // a file shorter than the probe whose every row lacks the columns
        if let Some(e) = pending_columns_error.filter(|_| !columns_found) {
            return Err(e);
        }
        if stop || (limit > 0 && n as usize >= limit) {
            break;
        }
    }
    Ok(read)
}

/// How many of a file's first rows may lack the mapped columns before the mapping is refused.
const COLUMN_PROBE_ROWS: usize = 100;

/// Records in `files`, up to `limit` (0 = all).
fn count_records(files: &[PathBuf], limit: usize, max_bytes: usize) -> Result<usize> {
    let mut n = 0usize;
    for file in files {
        records::for_each(file, max_bytes, &|_| false, &mut |_| {
            n += 1;
            limit == 0 || n < limit
        })?;
        if limit > 0 && n >= limit {
            break;
        }
    }
    Ok(n)
}

/// The held-out rows of `n`, sorted: `size` rows (>= 1) or that fraction, rounded up as
/// `datasets`' `train_test_split` does, at least one row left to train; chosen by a fixed-seed
/// hash of each row index, so a row's side never depends on the others.
pub fn held_out(n: usize, size: f64) -> Vec<u64> {
    let count = if size >= 1.0 {
        size as usize
    } else {
        (size * n as f64).ceil() as usize
    };
    let count = count.min(n.saturating_sub(1));
    let mut order: Vec<u64> = (0..n as u64).collect();
    order.sort_by_key(|&i| xxhash_rust::xxh3::xxh3_64_with_seed(&i.to_le_bytes(), HOLDOUT_SEED));
    let mut test: Vec<u64> = order.into_iter().take(count).collect();
    test.sort_unstable();
    test
}

/// `data_files[split]`, else the hub layout's `data/<split>-*.parquet`.
fn pattern(cfg: &DatasetConfig, split: &str) -> String {
    cfg.data_files
        .get(split)
        .cloned()
        .unwrap_or_else(|| format!("data/{split}-*.parquet"))
}

/// Files under `root` whose path relative to it matches `pattern`, found as `datasets`
/// (fsspec's glob) finds them: from the pattern's literal folders (`data/` of
/// `data/train-*.parquet`, entered even where it is a link), through real folders only below
/// them: a link back up walked the tree without end, and a `latest -> data` alias read every
/// file twice. A link to a file is read. A pattern without `**` goes no deeper than its folders.
fn list_matching(root: &Path, pattern: &str, out: &mut Vec<PathBuf>) -> Result<()> {
    let parts: Vec<&str> = pattern.trim_start_matches("./").split('/').collect();
    let literal = parts[..parts.len() - 1]
        .iter()
        .take_while(|c| !c.is_empty() && !c.contains(['*', '?']) && !matches!(**c, "." | ".."))
        .fold(root.to_path_buf(), |dir, c| dir.join(c));
    let max_depth = (!pattern.contains("**")).then(|| pattern.matches('/').count());
    walk(root, &literal, pattern, max_depth, out)
}

fn walk(
    root: &Path,
    dir: &Path,
    pattern: &str,
    max_depth: Option<usize>,
    out: &mut Vec<PathBuf>,
) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if dir == root => return Err(Error::io("cannot list", dir, e)),
        Err(_) => return Ok(()),
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let rel = path.strip_prefix(root).unwrap_or(&path);
        let depth = rel.components().count();
        let rel = rel.to_string_lossy().replace('\\', "/");
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            if !rel.starts_with('.') && max_depth.is_none_or(|d| depth <= d) {
                walk(root, &path, pattern, max_depth, out)?;
            }
        } else if !(kind.is_symlink() && path.is_dir()) && glob_match(pattern, &rel) {
            out.push(path);
        }
    }
    Ok(())
}

/// `*` (any run of characters but `/`), `**` (any run, `/` included) and `?` (one character but
/// `/`); everything else literally. Matched a pattern element at a time over every prefix of the
/// path at once: O(pattern × path), where backtracking took exponential time in the `**`s.
pub fn glob_match(pattern: &str, path: &str) -> bool {
    let p: Vec<char> = pattern.trim_start_matches("./").chars().collect();
    let s: Vec<char> = path.chars().collect();
    // at[j]: the pattern so far matches s[..j]
    let mut at = vec![false; s.len() + 1];
    at[0] = true;
    let mut i = 0;
    while i < p.len() {
        let mut next = vec![false; s.len() + 1];
        match p[i] {
            '*' if p.get(i + 1) == Some(&'*') => {
                let mut on = false;
                for j in 0..=s.len() {
                    on |= at[j];
                    next[j] = on;
                }
                i += 1;
            }
            '*' => {
                let mut on = false;
                for j in 0..=s.len() {
                    if j > 0 && s[j - 1] == '/' {
                        on = false;
                    }
                    on |= at[j];
                    next[j] = on;
                }
            }
            c => {
                for j in 0..s.len() {
                    next[j + 1] = at[j] && if c == '?' { s[j] != '/' } else { s[j] == c };
                }
            }
        }
        at = next;
        i += 1;
    }
    at[s.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match(
            "data/train-*.parquet",
            "data/train-00000-of-00001.parquet"
        ));
        assert!(!glob_match("data/train-*.parquet", "data/test-0.parquet"));
        assert!(!glob_match("*.jsonl", "sub/a.jsonl"));
        assert!(glob_match("**/*.jsonl", "sub/deeper/a.jsonl"));
        assert!(glob_match("./pairs.jsonl", "pairs.jsonl"));
        assert!(
            glob_match("part-?.json", "part-1.json") && !glob_match("part-?.json", "part-12.json")
        );
        assert!(glob_match("**a**", "xa/y") && !glob_match("*a*", "xa/y"));
        assert!(glob_match("data/**.parquet", "data/a/b.parquet"));
        assert!(!glob_match("**/*.jsonl", "a.jsonl"), "`**/` needs a folder");
        assert!(glob_match("***", "a/b"), "`**` then `*`");
        // Eight `**`s against a 68-character name: backtracking took minutes.
        let name = format!("{}.parquet", "a".repeat(60));
        let started = std::time::Instant::now();
        assert!(!glob_match(
            &format!("{}**b.parquet", "**a".repeat(8)),
            &name
        ));
        assert!(glob_match(&format!("{}**.parquet", "**a".repeat(8)), &name));
        assert!(started.elapsed().as_secs_f64() < 0.5);
    }

    /// Links to folders below a pattern's own folders are not followed, as `datasets` resolves
    /// patterns: a link back up walked the tree without end, an alias read each file twice. A
    /// link to a file is read.
    #[cfg(unix)]
    #[test]
    fn links_to_folders_are_not_walked() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::create_dir_all(root.join("data")).unwrap();
        std::fs::create_dir_all(root.join("extra")).unwrap();
        std::fs::write(root.join("data/train-0.parquet"), b"").unwrap();
        std::fs::write(root.join("other.parquet"), b"").unwrap();
        std::os::unix::fs::symlink("..", root.join("extra/up")).unwrap();
        std::os::unix::fs::symlink(".", root.join("extra/self")).unwrap();
        std::os::unix::fs::symlink("data", root.join("latest")).unwrap();
        std::os::unix::fs::symlink("../other.parquet", root.join("data/linked.parquet")).unwrap();
        let matching = |pattern: &str| {
            let mut out = Vec::new();
            list_matching(root, pattern, &mut out).unwrap();
            out.sort();
            out
        };
        assert_eq!(
            matching("**/*.parquet"),
            [
                root.join("data/linked.parquet"),
                root.join("data/train-0.parquet")
            ]
        );
        // a pattern's own folders are entered even where they are links, as fsspec's glob
        // starts from them: a `data` folder linked from elsewhere is read
        assert_eq!(
            matching("latest/train-*.parquet"),
            [root.join("latest/train-0.parquet")]
        );
        assert_eq!(matching("data/*.parquet").len(), 2);
    }

    #[test]
    fn held_out_rows_are_seeded_sized_and_stable() {
        let a = held_out(100, 0.1);
        assert_eq!(a.len(), 10);
        assert_eq!(a, held_out(100, 0.1), "the same rows on every call");
        assert_eq!(held_out(100, 7.0).len(), 7);
        assert_eq!(held_out(3, 0.5).len(), 2);
        assert_eq!(held_out(1, 0.5).len(), 0, "one row stays to train");
        // A row's side does not depend on the row count: growing the data keeps earlier picks
        // mostly in place (not a reshuffle).
        let big = held_out(1000, 5.0);
        assert!(big.iter().all(|&i| i < 1000));
    }

    #[test]
    fn a_file_in_both_splits_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("data")).unwrap();
        for f in ["data/train-0.parquet", "data/test-0.parquet"] {
            std::fs::write(tmp.path().join(f), b"").unwrap();
        }
        let mut cfg = DatasetConfig {
            id: tmp.path().display().to_string(),
            ..DatasetConfig::default()
        };
        cfg.data_files
            .insert("test_prefs".into(), "data/test-*.parquet".into());
        cfg.data_files
            .insert("train_prefs".into(), "data/train-*.parquet".into());
        let src = DataSource::resolve(&cfg, &["train_prefs", "test_prefs"]).unwrap();
        assert_eq!(src.files("test_prefs").unwrap().len(), 1);
        cfg.data_files
            .insert("train_prefs".into(), "**/*.parquet".into());
        let src = DataSource::resolve(&cfg, &["train_prefs", "test_prefs"]).unwrap();
        let err = src.files("test_prefs").unwrap_err().to_string();
        assert!(
            err.contains("test-0.parquet") && err.contains("both"),
            "{err}"
        );
    }
}
