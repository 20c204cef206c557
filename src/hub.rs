//! Sources → files on disk: a hub id fetched with hf-hub (pinned revision, standard HF cache,
//! `HF_TOKEN`, `HF_ENDPOINT`, `HF_HUB_OFFLINE`) or a local directory in the same layout.

use crate::error::{Error, Result};
use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};
use std::path::{Path, PathBuf};

/// A directory laid out like the hub repository (a local directory or a cache snapshot).
#[derive(Debug, Clone)]
pub struct RepoDir {
    pub dir: PathBuf,
    /// `local` for a directory, else the revision asked for.
    pub revision: String,
    /// The commit a hub revision resolved to (the snapshot's name); `None` for a local directory.
    pub commit: Option<String>,
}

/// The commit of a cache snapshot directory (`…/snapshots/<commit>`).
fn snapshot_commit(dir: &Path) -> Option<String> {
    Some(dir.file_name()?.to_str()?.to_string())
}

fn offline() -> bool {
    matches!(
        std::env::var("HF_HUB_OFFLINE").as_deref(),
        Ok("1") | Ok("true") | Ok("TRUE") | Ok("yes")
    )
}

fn kind_name(kind: RepoType) -> &'static str {
    match kind {
        RepoType::Dataset => "dataset",
        RepoType::Model => "model",
        RepoType::Space => "space",
    }
}

/// Where a repo's snapshot lives in the HF cache, if its revision was fetched before.
fn cached_snapshot(repo: &Repo, revision: &str) -> Option<PathBuf> {
    let root = Cache::from_env().path().join(repo.folder_name());
    let commit = crate::error::fs::read_to_string(root.join("refs").join(revision))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| revision.to_string());
    let snap = root.join("snapshots").join(commit);
    snap.is_dir().then_some(snap)
}

/// The revision a resolved source records: `local` for a local directory, else the one asked for.
pub fn revision_label(id: &str, revision: &str) -> String {
    if Path::new(id).exists() {
        "local".into()
    } else {
        revision.into()
    }
}

/// Resolves `id` to a directory holding the files `wanted` selects (called with each repo path).
fn resolve(
    id: &str,
    revision: &str,
    kind: RepoType,
    wanted: &dyn Fn(&str) -> bool,
    required: &[&str],
) -> Result<RepoDir> {
    let local = Path::new(id);
    if local.is_dir() {
        return Ok(RepoDir {
            dir: local.to_path_buf(),
            revision: revision_label(id, revision),
            commit: None,
        });
    }
    let what = kind_name(kind);
    if local.exists() && !local.is_file() {
        return Err(Error::Hub(format!(
            "{what} `{id}` exists but is neither a directory nor a regular file (a FIFO, a device \
             or a socket): give a data file or a folder"
        )));
    }
    if id.starts_with('.') || id.starts_with('/') || id.split('/').count() > 2 {
        return Err(Error::Hub(format!(
            "{what} `{id}` is neither an existing directory nor a hub id (owner/name): check the path"
        )));
    }
    let repo = Repo::with_revision(id.to_string(), kind, revision.to_string());
    if offline() {
        return match cached_snapshot(&repo, revision) {
            Some(dir) if required.iter().all(|f| dir.join(f).exists()) => Ok(RepoDir {
                commit: snapshot_commit(&dir),
                dir,
                revision: revision.into(),
            }),
            _ => Err(Error::Hub(format!(
                "{what} `{id}` (revision `{revision}`) is not in the HF cache ({}) and HF_HUB_OFFLINE is set: \
                 run once with network access, or set the id to a local directory in the hub layout",
                Cache::from_env().path().display()
            ))),
        };
    }
    let mut builder = ApiBuilder::from_env().with_progress(false);
    if let Ok(token) = std::env::var("HF_TOKEN") {
        builder = builder.with_token(Some(token));
    }
    let api = builder
        .build()
        .map_err(|e| Error::Hub(format!("cannot set up the hub client: {e}")))?;
    let api_repo = api.repo(repo.clone());
    let unreachable = |e: &dyn std::fmt::Display| {
        Error::Hub(format!(
            "cannot fetch {what} `{id}` at revision `{revision}` from the hub: {e}. Check the network \
             and HF_ENDPOINT, set HF_TOKEN for gated or private repos, or use HF_HUB_OFFLINE=1 with a \
             filled cache / a local directory"
        ))
    };
    let info = api_repo.info().map_err(|e| unreachable(&e))?;
    let files: Vec<String> = info
        .siblings
        .into_iter()
        .map(|s| s.rfilename)
        .filter(|f| stays_inside(f) && wanted(f))
        .collect();
    for req in required {
        if !files.iter().any(|f| f == req) {
            return Err(Error::Hub(format!(
                "{what} `{id}` at `{revision}` has no `{req}`"
            )));
        }
    }
    let mut dir = None;
    for f in &files {
        let path = api_repo.get(f).map_err(|e| unreachable(&e))?;
        // The snapshot root is the downloaded path minus the repo-relative file name.
        dir.get_or_insert_with(|| {
            let depth = Path::new(f).components().count();
            path.ancestors()
                .nth(depth)
                .map(Path::to_path_buf)
                .unwrap_or_default()
        });
    }
    let dir = dir
        .ok_or_else(|| Error::Hub(format!("{what} `{id}` at `{revision}` has no usable files")))?;
    Ok(RepoDir {
        commit: snapshot_commit(&dir),
        dir,
        revision: revision_label(id, revision),
    })
}

/// Whether a repo file name, as the hub lists it, is a path inside the snapshot: relative, with
/// no `..`, so that a hostile listing cannot make the download write or read outside the cache.
fn stays_inside(name: &str) -> bool {
    use std::path::Component;
    !name.is_empty()
        && !name.contains(['\\', '\0'])
        && Path::new(name)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

/// A dataset: the repo files `wanted` selects (the splits' `data_files` patterns).
pub fn dataset(id: &str, revision: &str, wanted: &dyn Fn(&str) -> bool) -> Result<RepoDir> {
    resolve(id, revision, RepoType::Dataset, wanted, &[])
}

/// A model: config, tokenizer files, chat template and safetensors weights.
pub fn model(id: &str, revision: &str) -> Result<RepoDir> {
    let wanted = |f: &str| {
        matches!(
            f,
            "config.json"
                | "tokenizer.json"
                | "tokenizer_config.json"
                | "chat_template.jinja"
                | "generation_config.json"
                | "special_tokens_map.json"
                | "model.safetensors.index.json"
        ) || (f.ends_with(".safetensors") && !f.contains('/'))
            || (f.starts_with("additional_chat_templates/") && f.ends_with(".jinja"))
    };
    let dir = resolve(
        id,
        revision,
        RepoType::Model,
        &wanted,
        &["config.json", "tokenizer.json"],
    )?;
    for f in ["config.json", "tokenizer.json"] {
        if !dir.dir.join(f).exists() {
            return Err(Error::Model(format!(
                "`{}` has no `{f}`: a model directory needs config.json, tokenizer.json, \
                 tokenizer_config.json (with a chat template) and safetensors weights",
                dir.dir.display()
            )));
        }
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_directory_is_used_as_is() {
        let d = tempfile::tempdir().unwrap();
        let r = resolve(
            d.path().to_str().unwrap(),
            "main",
            RepoType::Dataset,
            &|_| true,
            &[],
        )
        .unwrap();
        assert_eq!(r.dir, d.path());
        assert_eq!(r.revision, "local");
    }

    #[test]
    fn only_names_inside_the_snapshot_are_fetched() {
        for ok in ["config.json", "data/train-00000.parquet", "a b/c.jsonl"] {
            assert!(stays_inside(ok), "{ok}");
        }
        for bad in [
            "",
            "../x",
            "data/../../x",
            "/etc/passwd",
            "./x",
            "a\\..\\b",
            "a\0b",
        ] {
            assert!(!stays_inside(bad), "{bad:?}");
        }
    }

    #[test]
    fn missing_path_is_named() {
        let err = dataset("./no/such/dir", "main", &|_| true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("./no/such/dir"), "{err}");
    }
}
