//! What a split's cache directory holds against what this run would write: nothing, an up-to-date
//! cache, one to score again (torn, failing its checksum, or made from data that changed since),
//! or another configuration's cache (refused unless `--overwrite`).

use super::Prepared;
use crate::cache::{self, Fingerprint, MappedCache};
use crate::dirs::CacheDir;
use crate::error::Error;
use crate::error::Result;
use crate::outputs::{self, Existing};
use std::path::{Path, PathBuf};

/// A split's files (or unfinished chunks) made from other inputs: refused, naming the first
/// fingerprint field that differs, or removed with `--overwrite`.
pub(super) fn claim_split(out: &Path, split: &Prepared, existing: Existing) -> Result<()> {
    let (pq, arrow) = (
        cache::parquet_path(out, &split.stem),
        cache::arrow_path(out, &split.stem),
    );
    let partial = partial_dir(out, &split.stem);
    let partial_fp = CacheDir::partial_fingerprint(&partial);
    let found = [
        (pq.clone(), cache::parquet::read_fingerprint(&pq).ok()),
        (
            arrow.clone(),
            MappedCache::open(&arrow).ok().map(|m| m.fingerprint),
        ),
        (
            partial.clone(),
            crate::error::fs::read_to_string(&partial_fp)
                .ok()
                .and_then(|t| Fingerprint::from_json(&t, &partial_fp).ok()),
        ),
    ];
    let other = found.iter().find_map(|(path, fp)| {
        // new contents of the same data, or the same inputs scored by other numerics, are this
        // cache's to replace, not another's
        let fp = fp.as_ref()?;
        let mut skip = cache::fingerprint::READ_BY_STAGE_ONE.to_vec();
        // (another `chunk_pairs` gives a shard other pairs of the same inputs: scored again)
        skip.extend(["scoring", "shard_pairs"]);
        // a cache made before these hashes were recorded is scored again, not another's
        if fp.model_config_sha256.is_empty() {
            skip.push("model_config_sha256");
        }
        if fp.tokenizer_config_sha256.is_empty() {
            skip.push("tokenizer_config_sha256");
        }
        let diff = fp.first_difference(&split.fingerprint, &skip)?;
        Some((path, diff))
    });
    let Some((path, (field, theirs, ours))) = other else {
        return Ok(());
    };
    if existing != Existing::Overwrite {
        return Err(Error::Occupied {
            path: path.clone(),
            msg: format!(
                "holds a cache made from other inputs (fingerprint field `{field}` is {theirs} \
                 there but {ours} for this config): write this one elsewhere with `--set \
                 precompute.out=DIR`, or replace it with `--overwrite`"
            ),
        });
    }
    [pq, arrow, partial]
        .iter()
        .filter(|p| p.exists())
        .try_for_each(|p| outputs::remove(p))
}

pub(super) fn partial_dir(out: &Path, split: &str) -> PathBuf {
    CacheDir::new(out).partial(split)
}

/// The folder of a split's finished chunks, for these inputs: kept if it was made for them
/// (an interrupted run's), else emptied. Made for every split to score before the first is
/// scored, so that a run stopped between splits leaves the next one visibly unfinished (train
/// refuses it) rather than absent (a cache without that split).
pub(super) fn open_partial(partial: &Path, fp: &Fingerprint) -> Result<()> {
    let fp_path = CacheDir::partial_fingerprint(partial);
    if partial.exists() {
        let same = crate::error::fs::read_to_string(&fp_path).is_ok_and(|t| t == fp.to_json());
        if !same {
            std::fs::remove_dir_all(partial)
                .map_err(|e| Error::io("cannot remove stale", partial, e))?;
        }
    }
    crate::error::fs::create_dir_all(partial)?;
    crate::error::fs::write_atomic(&fp_path, fp.to_json().as_bytes())
}

/// What a split's cache files hold, against the fingerprint this config expects.
pub(super) enum CacheState {
    /// Neither file.
    Nothing,
    /// Both files verify and carry the expected fingerprint.
    UpToDate,
    /// A file is missing, torn or fails its checksum (why): it is scored again.
    Broken(String),
}

pub(super) fn cache_state(pq: &Path, arrow: &Path, fingerprint: &Fingerprint) -> CacheState {
    match (pq.exists(), arrow.exists()) {
        (false, false) => return CacheState::Nothing,
        (true, false) | (false, true) => {
            let missing = if pq.exists() { arrow } else { pq };
            return CacheState::Broken(format!(
                "`{}` is missing (an earlier run stopped before writing it)",
                missing.display()
            ));
        }
        (true, true) => {}
    }
    let check = || -> Result<Option<Fingerprint>> {
        let in_parquet = cache::parquet::read_fingerprint(pq)?;
        cache::parquet::verify(pq)?;
        let in_arrow = MappedCache::open(arrow)?.fingerprint;
        Ok([in_parquet, in_arrow]
            .into_iter()
            .find(|f| f != fingerprint))
    };
    match check() {
        Ok(None) => CacheState::UpToDate,
        Ok(Some(other)) => CacheState::Broken(match other.first_difference(fingerprint, &[]) {
            Some((field, _, _)) if field == "data_sha256" => {
                let changed: Vec<&str> = fingerprint
                    .data_sha256
                    .iter()
                    .filter(|(f, sha)| other.data_sha256.get(*f) != Some(*sha))
                    .map(|(f, _)| f.as_str())
                    .collect();
                format!(
                    "the data changed since it was scored ({})",
                    changed.join(", ")
                )
            }
            Some((field, theirs, _))
                if (field.ends_with("config_sha256") && theirs == "\"\"")
                    || (field == "shard_pairs" && other.shard_pairs.is_none()) =>
            {
                format!("it was made before refdpo recorded `{field}`")
            }
            Some((field, _, _)) if field == "shard_pairs" => {
                let span = |f: &Fingerprint| f.shard_pairs.map_or(String::new(), |p| p.to_string());
                format!(
                    "it holds pairs {} of the split, where this shard holds {} (another \
                     `precompute.chunk_pairs`)",
                    span(&other),
                    span(fingerprint)
                )
            }
            Some((field, _, _)) if field == "scoring" => format!(
                "it was scored by other numerics (stage one's version {} there, {} in this build)",
                other.scoring, fingerprint.scoring
            ),
            _ => format!("`{}` was made from other inputs", pq.display()),
        }),
        Err(e) => CacheState::Broken(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::fingerprint::sample;
    use crate::cache::CacheRow;

    fn rows() -> Vec<CacheRow> {
        vec![CacheRow {
            prompt_id: "p".into(),
            row: 0,
            prompt_ids: vec![1, 2],
            chosen_ids: vec![3],
            rejected_ids: vec![4],
            ref_chosen_logps: -1.0,
            ref_rejected_logps: -2.0,
            score_chosen: None,
            score_rejected: None,
            chosen_truncated: false,
            rejected_truncated: false,
        }]
    }

    fn prepared(fingerprint: Fingerprint) -> Prepared {
        Prepared {
            name: "train_prefs".into(),
            stem: "train_prefs".into(),
            rows_read: 1,
            pairs: 0..1,
            first_row: 0,
            tokens: 4,
            dropped: Default::default(),
            skipped: Vec::new(),
            fingerprint,
            prepare_seconds: 0.0,
            stamps: Default::default(),
            kept: None,
        }
    }

    #[test]
    fn states_of_a_split_and_who_may_replace_it() {
        let dir = tempfile::tempdir().unwrap();
        let c = CacheDir::new(dir.path());
        let (pq, arrow) = (c.parquet("train_prefs"), c.arrow("train_prefs"));
        let mut fp = sample();
        fp.data_sha256.insert("data/a.parquet".into(), "aa".into());
        assert!(matches!(cache_state(&pq, &arrow, &fp), CacheState::Nothing));
        cache::parquet::write(&pq, &rows(), &fp).unwrap();
        match cache_state(&pq, &arrow, &fp) {
            CacheState::Broken(why) => assert!(why.contains("train_prefs.arrow"), "{why}"),
            _ => panic!("one file missing is broken"),
        }
        cache::ipc::write(&arrow, &rows(), &fp).unwrap();
        assert!(matches!(
            cache_state(&pq, &arrow, &fp),
            CacheState::UpToDate
        ));
        // the same data edited: scored again, naming the file
        let mut edited = fp.clone();
        edited
            .data_sha256
            .insert("data/a.parquet".into(), "bb".into());
        match cache_state(&pq, &arrow, &edited) {
            CacheState::Broken(why) => assert!(
                why.contains("data changed") && why.contains("data/a.parquet"),
                "{why}"
            ),
            _ => panic!("edited data is not up to date"),
        }
        // ... and this config's to replace, while another configuration's cache is refused
        claim_split(dir.path(), &prepared(edited), Existing::Refuse).unwrap();
        // the same inputs scored by older numerics (a cache from before `scoring` was recorded
        // reads as 0): scored again, and this config's to replace
        let newer = Fingerprint {
            scoring: fp.scoring + 1,
            ..fp.clone()
        };
        match cache_state(&pq, &arrow, &newer) {
            CacheState::Broken(why) => assert!(why.contains("scored by other numerics"), "{why}"),
            _ => panic!("a cache of other numerics is not up to date"),
        }
        claim_split(dir.path(), &prepared(newer), Existing::Refuse).unwrap();
        let mut json: serde_json::Value = serde_json::from_str(&fp.to_json()).unwrap();
        json.as_object_mut().unwrap().remove("scoring");
        let old = Fingerprint::from_json(&json.to_string(), Path::new("f")).unwrap();
        assert_eq!(old.scoring, 0);
        // a cache from before the config hashes were recorded reads them as "": scored again,
        // saying why, and this config's to replace
        let mut json: serde_json::Value = serde_json::from_str(&fp.to_json()).unwrap();
        for k in ["model_config_sha256", "tokenizer_config_sha256"] {
            json.as_object_mut().unwrap().remove(k);
        }
        let before = Fingerprint::from_json(&json.to_string(), Path::new("f")).unwrap();
        assert_eq!(before.model_config_sha256, "");
        std::fs::remove_file(&pq).unwrap();
        std::fs::remove_file(&arrow).unwrap();
        cache::parquet::write(&pq, &rows(), &before).unwrap();
        cache::ipc::write(&arrow, &rows(), &before).unwrap();
        match cache_state(&pq, &arrow, &fp) {
            CacheState::Broken(why) => assert!(why.contains("before refdpo recorded"), "{why}"),
            _ => panic!("a cache without the config hashes is not up to date"),
        }
        claim_split(dir.path(), &prepared(fp.clone()), Existing::Refuse).unwrap();
        std::fs::remove_file(&pq).unwrap();
        std::fs::remove_file(&arrow).unwrap();
        cache::parquet::write(&pq, &rows(), &fp).unwrap();
        cache::ipc::write(&arrow, &rows(), &fp).unwrap();
        let other = Fingerprint {
            max_length: 512,
            ..fp.clone()
        };
        let err = claim_split(dir.path(), &prepared(other.clone()), Existing::Refuse)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`max_length`") && err.contains("--overwrite"),
            "{err}"
        );
        assert!(pq.exists(), "a refusal touches nothing");
        claim_split(dir.path(), &prepared(other), Existing::Overwrite).unwrap();
        assert!(!pq.exists() && !arrow.exists(), "--overwrite removes it");
        // a flipped byte: scored again
        cache::parquet::write(&pq, &rows(), &fp).unwrap();
        cache::ipc::write(&arrow, &rows(), &fp).unwrap();
        let mut bytes = std::fs::read(&arrow).unwrap();
        bytes[40] ^= 1;
        std::fs::write(&arrow, bytes).unwrap();
        assert!(matches!(
            cache_state(&pq, &arrow, &fp),
            CacheState::Broken(_)
        ));
    }
}
