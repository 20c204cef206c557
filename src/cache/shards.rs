//! A split written by n stage-one processes (`precompute.shard = "i/n"`):
//! `<split>.shard-<i>-of-<n>.parquet` and `.arrow` beside each other, read as one split in row
//! order. A missing shard, or shards of different counts, are refused by name.

use super::fingerprint::Fingerprint;
use super::ipc::MappedCache;
use crate::config::Shard;
use crate::dirs::CacheDir;
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// The file stem of a split's shard (`train_prefs.shard-0-of-4`), or the split itself when whole.
pub fn stem(split: &str, shard: Shard) -> String {
    CacheDir::stem(split, shard)
}

fn parse(name: &str, split: &str, ext: &str) -> Option<Shard> {
    CacheDir::shard_of(name, split, ext)
}

/// The files of `split` with extension `ext` (`parquet` or `arrow`) in `dir`: the whole split's
/// file if there is one, else all n shards in order; `None` when there is neither.
pub fn files(dir: &Path, split: &str, ext: &str) -> Result<Option<Vec<PathBuf>>> {
    let whole = match ext {
        "parquet" => CacheDir::new(dir).parquet(split),
        _ => CacheDir::new(dir).arrow(split),
    };
    let mut found: Vec<(Shard, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| {
            let name = p.file_name()?.to_str()?.to_string();
            Some((parse(&name, split, ext)?, p))
        })
        .collect();
    if whole.exists() {
        // two versions of one split: which one a reader took would be a guess (the Python
        // reader refuses them too)
        if let Some((_, shard)) = found.first() {
            return Err(Error::StaleCache {
                path: whole,
                msg: format!(
                    "is beside shards of the same split (`{}`, …): remove the whole file or the \
                     shards, whichever is not the cache meant",
                    shard.display()
                ),
            });
        }
        return Ok(Some(vec![whole]));
    }
    if found.is_empty() {
        return Ok(None);
    }
    found.sort_by_key(|(s, _)| s.index);
    let count = found[0].0.count;
    if let Some((_, p)) = found.iter().find(|(s, _)| s.count != count) {
        return Err(Error::StaleCache {
            path: p.clone(),
            msg: format!(
                "a shard of another sharding: the other `{split}` shards are of {count}; remove \
                 it, or re-run the shards of one `precompute.shard` count"
            ),
        });
    }
    for index in 0..count {
        if found.get(index).map(|(s, _)| s.index) != Some(index) {
            let stem = stem(split, Shard { index, count });
            let missing = match ext {
                "parquet" => CacheDir::new(dir).parquet(&stem),
                _ => CacheDir::new(dir).arrow(&stem),
            };
            return Err(Error::StaleCache {
                path: missing,
                msg: format!(
                    "shard {index} of {count} of `{split}` is missing: run `refdpo precompute \
                     --shard {index}/{count}` with the same config"
                ),
            });
        }
    }
    Ok(Some(found.into_iter().map(|(_, p)| p).collect()))
}

/// What a file of `split` must carry: `expected` (the whole split's fingerprint), with the
/// shard it holds when it is a shard.
pub fn expected_for(path: &Path, split: &str, expected: &Fingerprint) -> Fingerprint {
    let shard = path.file_name().and_then(|n| n.to_str()).and_then(|n| {
        let ext = path.extension()?.to_str()?;
        parse(n, split, ext)
    });
    Fingerprint {
        shard,
        ..expected.clone()
    }
}

/// The Parquet files of `split` (as [`files`] lists them) read without a config, as `stats
/// --cache` reads them: each carries `split` and the shard its name says, and all carry one
/// cache's fingerprint besides (a file copied over another is refused, naming it).
pub fn check_parquet(paths: &[PathBuf], split: &str) -> Result<()> {
    let Some(first) = paths.first() else {
        return Ok(());
    };
    let base = Fingerprint {
        shard: None,
        split: split.to_string(),
        ..super::parquet::read_fingerprint(first)?
    };
    let mut spans = Vec::with_capacity(paths.len());
    for p in paths {
        let fp = super::parquet::read_fingerprint(p)?;
        fp.check_compatible(&expected_for(p, split, &base), p)?;
        spans.push(fp.shard_pairs);
    }
    check_tiling(paths, &spans, split)
}

/// The pairs of a split a shard's files hold, as indices among all its kept pairs: `start..end`
/// of `total` (`"start..end of n"` on disk, in the fingerprint's `shard_pairs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardPairs {
    pub start: usize,
    pub end: usize,
    pub total: usize,
}

impl std::fmt::Display for ShardPairs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}..{} of {}", self.start, self.end, self.total)
    }
}

impl std::str::FromStr for ShardPairs {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let parse = || {
            let (range, total) = s.split_once(" of ")?;
            let (start, end) = range.split_once("..")?;
            Some(Self {
                start: start.parse().ok()?,
                end: end.parse().ok()?,
                total: total.parse().ok()?,
            })
        };
        parse().ok_or_else(|| format!("`{s}` is not \"start..end of n\""))
    }
}

impl serde::Serialize for ShardPairs {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for ShardPairs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// A split's shards, in order, hold its pairs once each: their `shard_pairs` tile `0..n`. Shards
/// scored under different `precompute.chunk_pairs` would read as a split with pairs missing or
/// repeated. (Shards that all predate the span carry none and are not checked; one of them among
/// shards that carry it is refused.)
pub fn check_tiling(paths: &[PathBuf], spans: &[Option<ShardPairs>], split: &str) -> Result<()> {
    if paths.len() < 2 || spans.iter().all(Option::is_none) {
        return Ok(());
    }
    let mut total = None;
    let mut end = 0;
    for (p, span) in paths.iter().zip(spans) {
        // shards that record their pairs beside ones made before they did: the old ones could
        // hold any range, so the split cannot be read whole
        let Some(ShardPairs {
            start,
            end: to,
            total: n,
        }) = *span
        else {
            return Err(Error::StaleCache {
                path: p.clone(),
                msg: format!(
                    "was made before shards recorded the pairs they hold, unlike the other \
                     shards of `{split}`: the split cannot be checked whole. Re-run this shard's \
                     `refdpo precompute` with the others' config"
                ),
            });
        };
        let total = *total.get_or_insert(n);
        if start != end || n != total || to < start {
            return Err(Error::StaleCache {
                path: p.clone(),
                msg: format!(
                    "holds pairs {start}..{to} of {n} of `{split}`, where the shards before it \
                     end at pair {end} of {total}: the shards were scored under different \
                     `precompute.chunk_pairs`, so the split would read with pairs missing or \
                     repeated. Re-run every shard's `refdpo precompute` with one config"
                ),
            });
        }
        end = to;
    }
    match total {
        Some(total) if end != total => Err(Error::StaleCache {
            path: paths[paths.len() - 1].clone(),
            msg: format!(
                "the shards of `{split}` end at pair {end} of {total}: re-run every shard's \
                 `refdpo precompute` with one config"
            ),
        }),
        _ => Ok(()),
    }
}

/// The Arrow cache of `split` in `dir`, whole or from all its shards (each memory-mapped and
/// checked against `expected`); `None` when there is none.
pub fn open(dir: &Path, split: &str, expected: &Fingerprint) -> Result<Option<MappedCache>> {
    let Some(paths) = files(dir, split, "arrow")? else {
        return Ok(None);
    };
    let mut parts = Vec::with_capacity(paths.len());
    for p in &paths {
        let cache = MappedCache::open(p)?;
        cache
            .fingerprint
            .check_compatible(&expected_for(p, split, expected), p)?;
        parts.push(cache);
    }
    let spans: Vec<_> = parts.iter().map(|c| c.fingerprint.shard_pairs).collect();
    check_tiling(&paths, &spans, split)?;
    Ok(Some(MappedCache::concat(parts)))
}

/// The splits a cache directory holds (by its `.parquet` and `.arrow` files, shards as their
/// split), sorted: named in the error for a split it lacks.
pub fn splits_in(dir: &Path) -> Vec<String> {
    let mut there: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            let stem = name
                .strip_suffix(".parquet")
                .or_else(|| name.strip_suffix(".arrow"))?;
            Some(stem.split(".shard-").next()?.to_string())
        })
        .collect();
    there.sort();
    there.dedup();
    there
}

/// ` (this cache holds a, b)` for a directory that holds splits, else nothing.
pub fn held_splits_note(dir: &Path) -> String {
    match splits_in(dir) {
        s if s.is_empty() => String::new(),
        s => format!(" (this cache holds {})", s.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_gaps_are_named() {
        let s = Shard { index: 2, count: 4 };
        assert_eq!(stem("train_prefs", s), "train_prefs.shard-2-of-4");
        assert_eq!(stem("train_prefs", Shard::default()), "train_prefs");
        assert_eq!(
            parse("train_prefs.shard-2-of-4.arrow", "train_prefs", "arrow"),
            Some(s)
        );
        assert_eq!(
            parse("train_prefs.shard-2-of-4.arrow", "test_prefs", "arrow"),
            None
        );
        assert_eq!(
            parse("train_prefs.shard-4-of-4.arrow", "train_prefs", "arrow"),
            None
        );
        let dir = tempfile::tempdir().unwrap();
        assert!(files(dir.path(), "t", "arrow").unwrap().is_none());
        for i in [0, 2] {
            std::fs::write(dir.path().join(format!("t.shard-{i}-of-3.arrow")), b"").unwrap();
        }
        let err = files(dir.path(), "t", "arrow").unwrap_err().to_string();
        assert!(
            err.contains("t.shard-1-of-3.arrow") && err.contains("--shard 1/3"),
            "{err}"
        );
        std::fs::write(dir.path().join("t.shard-1-of-3.arrow"), b"").unwrap();
        assert_eq!(files(dir.path(), "t", "arrow").unwrap().unwrap().len(), 3);
        std::fs::write(dir.path().join("t.shard-0-of-2.arrow"), b"").unwrap();
        let err = files(dir.path(), "t", "arrow").unwrap_err().to_string();
        assert!(err.contains("another sharding"), "{err}");
        // a whole split beside shards of it: neither is taken
        std::fs::remove_file(dir.path().join("t.shard-0-of-2.arrow")).unwrap();
        std::fs::write(dir.path().join("t.arrow"), b"").unwrap();
        let err = files(dir.path(), "t", "arrow").unwrap_err().to_string();
        assert!(err.contains("beside shards of the same split"), "{err}");
    }

    #[test]
    fn shards_split_rows_contiguously_and_completely() {
        for n in [0, 1, 7, 100] {
            let mut next = 0;
            for index in 0..3 {
                let r = Shard { index, count: 3 }.range(n);
                assert_eq!(r.start, next);
                next = r.end;
            }
            assert_eq!(next, n);
        }
    }

    /// Shard files' paths and spans ("" for none).
    fn shards(spans: &[&str]) -> (Vec<PathBuf>, Vec<Option<ShardPairs>>) {
        let paths = (0..spans.len())
            .map(|i| PathBuf::from(format!("t.shard-{i}-of-{}.arrow", spans.len())))
            .collect();
        let spans = spans
            .iter()
            .map(|s| (!s.is_empty()).then(|| s.parse().unwrap()))
            .collect();
        (paths, spans)
    }

    /// Shards tile their split, or are refused naming the first that does not: a gap, an
    /// overlap, another total, a short end, one without a span among shards with one. Shards
    /// that all predate the span are read as before.
    #[test]
    fn shards_must_tile_the_split() {
        let span: ShardPairs = "9..18 of 27".parse().unwrap();
        assert_eq!(span.to_string(), "9..18 of 27");
        assert!("9..18".parse::<ShardPairs>().is_err());
        for ok in [
            &["0..9 of 27", "9..18 of 27", "18..27 of 27"][..],
            &["0..27 of 27", "27..27 of 27"],
            &["", ""],
        ] {
            let (p, f) = shards(ok);
            check_tiling(&p, &f, "t").unwrap();
        }
        for (bad, named, says) in [
            (&["0..9 of 27", "12..27 of 27"][..], 1, "end at pair 9"),
            (&["0..12 of 27", "9..27 of 27"], 1, "end at pair 12"),
            (&["0..9 of 27", "9..30 of 30"], 1, "of 30"),
            (&["0..9 of 27", "9..20 of 27"], 1, "end at pair 20 of 27"),
            (&["0..9 of 27", ""], 1, "made before shards recorded"),
            (&["", "9..27 of 27"], 0, "made before shards recorded"),
        ] {
            let (p, f) = shards(bad);
            let err = check_tiling(&p, &f, "t").unwrap_err().to_string();
            assert!(
                err.contains(&p[named].display().to_string()) && err.contains(says),
                "{bad:?}: {err}"
            );
        }
    }
}
