//! Sources → files on disk: a hub id fetched with hf-hub (pinned revision, standard HF cache,
//! `HF_TOKEN`, `HF_ENDPOINT`, `HF_HUB_OFFLINE`) or a local directory in the same layout.

use crate::error::{Error, Result};
use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};
use std::path::{Path, PathBuf};
use watchdog::{Alive, Watchdog};

mod watchdog;

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

/// `HF_HUB_OFFLINE` or `TRANSFORMERS_OFFLINE` set to a true value, as huggingface_hub reads
/// them (`1`, `ON`, `YES`, `TRUE`, in any case).
fn offline() -> bool {
    let on = |k: &str| {
        std::env::var(k).is_ok_and(|v| {
            matches!(
                v.trim().to_ascii_uppercase().as_str(),
                "1" | "ON" | "YES" | "TRUE"
            )
        })
    };
    on("HF_HUB_OFFLINE") || on("TRANSFORMERS_OFFLINE")
}

/// A non-empty environment variable, a leading `~/` expanded as Python's `expanduser` does.
fn env_path(key: &str) -> Option<PathBuf> {
    let v = std::env::var(key).ok().filter(|v| !v.is_empty())?;
    match (v.strip_prefix("~/"), std::env::var("HOME")) {
        (Some(rest), Ok(home)) => Some(Path::new(&home).join(rest)),
        _ => Some(v.into()),
    }
}

/// The HF hub cache as huggingface_hub finds it: `HF_HUB_CACHE` (or the older
/// `HUGGINGFACE_HUB_CACHE`), else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`.
fn cache() -> Cache {
    if let Some(p) = env_path("HF_HUB_CACHE").or_else(|| env_path("HUGGINGFACE_HUB_CACHE")) {
        return Cache::new(p);
    }
    match env_path("HF_HOME") {
        Some(home) => Cache::new(home.join("hub")),
        None => Cache::default(),
    }
}

/// The token as huggingface_hub finds it: a non-empty `HF_TOKEN`, else the file at
/// `HF_TOKEN_PATH` or `$HF_HOME/token` (an empty `HF_TOKEN`, as CI gives an unset secret, is
/// no token, not an empty one).
fn token() -> Option<String> {
    if let Ok(t) = std::env::var("HF_TOKEN") {
        if !t.trim().is_empty() {
            return Some(t.trim().to_string());
        }
    }
    let home = env_path("HF_HOME").or_else(|| {
        std::env::var("HOME")
            .ok()
            .map(|h| Path::new(&h).join(".cache/huggingface"))
    });
    let path = env_path("HF_TOKEN_PATH").or_else(|| home.map(|h| h.join("token")))?;
    let t = std::fs::read_to_string(path).ok()?;
    (!t.trim().is_empty()).then(|| t.trim().to_string())
}

fn kind_name(kind: RepoType) -> &'static str {
    match kind {
        RepoType::Dataset => "dataset",
        RepoType::Model => "model",
        RepoType::Space => "space",
    }
}

/// Where a repo's snapshot lives in the HF cache, if its revision was fetched before.
/// The file that says a fetch of `commit` is under way or was cut short, kept in the cache's
/// `.locks/` folder (where huggingface_hub keeps its locks and its cache scan never looks).
fn fetching_marker(cache: &Cache, repo: &Repo, commit: &str) -> PathBuf {
    cache
        .path()
        .join(".locks")
        .join(repo.folder_name())
        .join(format!("refdpo-fetching-{commit}"))
}

fn cached_snapshot(repo: &Repo, revision: &str) -> Option<PathBuf> {
    let root = cache().path().join(repo.folder_name());
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

/// Which repo files to fetch: `first` from the repo's listing, then `then` from those fetched
/// (a sharded model's index names its shards).
struct Selection<'a> {
    first: &'a dyn Fn(&str, &[String]) -> bool,
    then: &'a dyn Fn(&Path) -> Vec<String>,
}

/// Files of a cached snapshot that huggingface_hub's listing of its commit
/// (`trees/<commit>.json`) has and the snapshot lacks: a download cut short, a link removed.
fn missing_from_snapshot(root: &Path, snap: &Path, wanted: &dyn Fn(&str) -> bool) -> Vec<String> {
    let Some(commit) = snap.file_name() else {
        return Vec::new();
    };
    let tree = root.join("trees").join(commit).with_extension("json");
    let Ok(v) = crate::error::fs::read_json::<serde_json::Value>(&tree) else {
        return Vec::new();
    };
    if v["format_version"] != 1 {
        return Vec::new();
    }
    v["files"]
        .as_object()
        .into_iter()
        .flat_map(|m| m.keys())
        .filter(|f| stays_inside(f) && wanted(f) && !snap.join(f).exists())
        .cloned()
        .collect()
}

/// Resolves `id` to a directory holding the files `select` picks.
fn resolve(
    id: &str,
    revision: &str,
    kind: RepoType,
    select: &Selection,
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
    let cache = cache();
    let root = cache.path().join(repo.folder_name());
    if offline() {
        return match cached_snapshot(&repo, revision) {
            Some(dir) if required.iter().all(|f| dir.join(f).exists()) => {
                // a generation config or a named extra template is no part of the cache's
                // numbers: a snapshot a filtered download left without them still serves
                let needed = |f: &str| {
                    (select.first)(f, &[])
                        && f != "generation_config.json"
                        && !f.starts_with("additional_chat_templates/")
                };
                let commit = snapshot_commit(&dir).unwrap_or_default();
                if fetching_marker(&cache, &repo, &commit).exists() {
                    return Err(Error::Hub(format!(
                        "{what} `{id}` (revision `{revision}`) is incomplete in the HF cache: a \
                         download into `{}` was cut short (or runs now), and HF_HUB_OFFLINE is \
                         set: run once with network access to complete it",
                        dir.display()
                    )));
                }
                let missing = missing_from_snapshot(&root, &dir, &needed);
                if let Some(f) = missing.first() {
                    return Err(Error::Hub(format!(
                        "{what} `{id}` (revision `{revision}`) is incomplete in the HF cache: \
                         `{}` lacks `{f}`{} (a download cut short?), and HF_HUB_OFFLINE is set: \
                         run once with network access to complete it",
                        dir.display(),
                        match missing.len() {
                            1 => String::new(),
                            n => format!(" and {} more", n - 1),
                        }
                    )));
                }
                Ok(RepoDir {
                    commit: snapshot_commit(&dir),
                    dir,
                    revision: revision.into(),
                })
            }
            _ => Err(Error::Hub(format!(
                "{what} `{id}` (revision `{revision}`) is not in the HF cache ({}) and HF_HUB_OFFLINE is set: \
                 run once with network access, or set the id to a local directory in the hub layout",
                cache.path().display()
            ))),
        };
    }
    // a download cut by the network resumes where it stopped, up to 5 times with a backoff, as
    // huggingface_hub's `http_get` does
    let mut builder = ApiBuilder::from_cache(cache.clone())
        .with_progress(false)
        .with_retries(5)
        .with_token(token());
    // huggingface_hub strips a trailing slash (`…/` would make every path `//api/…`)
    let mut endpoint = "https://huggingface.co".to_string();
    if let Ok(e) = std::env::var("HF_ENDPOINT") {
        let e = e.trim().trim_end_matches('/');
        if !e.is_empty() {
            endpoint = e.to_string();
            builder = builder.with_endpoint(endpoint.clone());
        }
    }
    let watchdog = Watchdog::start(endpoint);
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
    watchdog.fetching(format!("the listing of {what} `{id}` at `{revision}`"));
    // with each file's blob id, as huggingface_hub's `files_metadata` asks: a file a moved
    // branch still holds unchanged is linked to the blob already in the cache, not fetched again
    let info: Listing = api_repo
        .info_request()
        .query("blobs", "true")
        .call()
        .map_err(|e| unreachable(&e))?
        .into_json()
        .map_err(|e| unreachable(&e))?;
    // Every file is read at the commit the revision names now, as huggingface_hub does: a branch
    // that moved is fetched anew, never the older snapshot the cache's ref still points at.
    let Some(commit) = listed_commit(&info.sha, revision) else {
        return Err(Error::Hub(format!(
            "the hub's listing of {what} `{id}` at `{revision}` names commit {:?}, not a commit \
             id (40 hex digits): check HF_ENDPOINT's server",
            info.sha
        )));
    };
    let listed: Vec<String> = info
        .siblings
        .iter()
        .map(|s| s.rfilename.clone())
        .filter(|f| stays_inside(f))
        .collect();
    let files: Vec<String> = listed
        .iter()
        .filter(|f| (select.first)(f, &listed))
        .cloned()
        .collect();
    for req in required {
        if !files.iter().any(|f| f == req) {
            return Err(Error::Hub(format!(
                "{what} `{id}` at `{revision}` has no `{req}`"
            )));
        }
    }
    if files.is_empty() {
        return Err(Error::Hub(format!(
            "{what} `{id}` at `{revision}` has no usable files"
        )));
    }
    let pinned = api.repo(Repo::with_revision(id.to_string(), kind, commit.clone()));
    // Said to offline runs until every file is in: hf-hub writes a commit's ref with its first
    // file, so a fetch cut short would otherwise leave a snapshot that looks whole.
    let fetching = fetching_marker(&cache, &repo, &commit);
    if let Some(parent) = fetching.parent() {
        crate::error::fs::create_dir_all(parent)?;
    }
    crate::error::fs::write_atomic(&fetching, b"")?;
    let dir = root.join("snapshots").join(&commit);
    let fetch = |f: &str| -> Result<()> {
        if let Some(sibling) = info.siblings.iter().find(|s| s.rfilename == f) {
            link_cached_blob(&root, &dir, sibling);
        }
        let mut tries = 0;
        while !dir.join(f).exists() {
            watchdog.fetching(format!("`{f}` of {what} `{id}`"));
            tries += 1;
            match pinned.download_with_progress(f, Alive(&watchdog)) {
                // another process downloads the same file (hf-hub waits 5 s for its lock):
                // wait for it, as huggingface_hub does, the watchdog fed meanwhile
                Err(ApiError::LockAcquisition(_)) if tries < 720 => {
                    if tries == 1 {
                        crate::error::note!(
                            "waiting for another process that downloads `{f}` of {what} `{id}`"
                        );
                    }
                }
                Err(e) => return Err(unreachable(&e)),
                // a file whose name in the cache is its SHA-256 (a large one, stored by LFS) is
                // checked: a damaged `.part` resumed would otherwise be kept for good
                Ok(path) if !content_matches_name(&path)? => {
                    let blob = std::fs::canonicalize(&path).unwrap_or_default();
                    let _ = std::fs::remove_file(&path);
                    let _ = std::fs::remove_file(&blob);
                    if tries >= 2 {
                        return Err(Error::Hub(format!(
                            "`{f}` of {what} `{id}` was downloaded twice and is not the file the \
                             hub names (its SHA-256 differs): removed from the cache; check the \
                             network or HF_ENDPOINT's server"
                        )));
                    }
                }
                Ok(_) => {}
            }
        }
        Ok(())
    };
    files.iter().try_for_each(|f| fetch(f))?;
    for f in (select.then)(&dir) {
        if !listed.contains(&f) {
            return Err(Error::Hub(format!(
                "{what} `{id}` at `{revision}` names `{f}`, which the repository does not hold"
            )));
        }
        fetch(&f)?;
    }
    let _ = std::fs::remove_file(&fetching);
    // The revision's ref points at the commit only once every file is in (as huggingface_hub
    // writes it), so an interrupted fetch never leaves a ref to a partial snapshot.
    if commit != revision {
        let r = root.join("refs").join(revision);
        if let Some(parent) = r.parent() {
            crate::error::fs::create_dir_all(parent)?;
        }
        crate::error::fs::write_atomic(&r, commit.as_bytes())?;
    }
    Ok(RepoDir {
        commit: Some(commit),
        dir,
        revision: revision_label(id, revision),
    })
}

/// The commit a listing resolves `revision` to (the revision itself where the listing names
/// none and it is one): a commit id, 40 hex digits, as huggingface_hub accepts, since it names
/// the snapshot's folder; never a path a hostile listing makes up.
fn listed_commit(sha: &str, revision: &str) -> Option<String> {
    let is_commit = |s: &str| s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit());
    match sha {
        "" if is_commit(revision) => Some(revision.to_string()),
        sha if is_commit(sha) => Some(sha.to_string()),
        _ => None,
    }
}

/// A repo's listing at a revision, each file with its blob's name in the cache where the hub
/// gives it (`?blobs=true`; a mirror may not).
#[derive(serde::Deserialize)]
struct Listing {
    #[serde(default)]
    sha: String,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(serde::Deserialize)]
struct Sibling {
    rfilename: String,
    #[serde(rename = "blobId")]
    blob_id: Option<String>,
    size: Option<u64>,
    lfs: Option<Lfs>,
}

#[derive(serde::Deserialize)]
struct Lfs {
    sha256: String,
    size: u64,
}

impl Sibling {
    /// The name of the file's blob in the cache (the ETag hf-hub and huggingface_hub name it
    /// by: the SHA-256 of an LFS file, else the git object's id) and its size, where listed.
    fn blob(&self) -> Option<(&str, u64)> {
        match (&self.lfs, &self.blob_id, self.size) {
            (Some(lfs), _, _) => Some((&lfs.sha256, lfs.size)),
            (None, Some(id), Some(size)) => Some((id, size)),
            _ => None,
        }
    }
}

/// Links `snap/<file>` to the blob the cache already holds for it (a moved branch whose file did
/// not change, or the same file in another repo revision), as huggingface_hub does instead of a
/// second download. Only a blob of the listed name and size is taken; anything else is left to
/// the download.
fn link_cached_blob(root: &Path, snap: &Path, sibling: &Sibling) {
    let f = &sibling.rfilename;
    let Some((name, size)) = sibling.blob() else {
        return;
    };
    let hex =
        |n: &str| (n.len() == 40 || n.len() == 64) && n.bytes().all(|b| b.is_ascii_hexdigit());
    let dst = snap.join(f);
    if !hex(name) || !stays_inside(f) || dst.exists() {
        return;
    }
    let blob = root.join("blobs").join(name);
    if !std::fs::metadata(&blob).is_ok_and(|m| m.is_file() && m.len() == size) {
        return;
    }
    // from the link's folder up to the repo's cache folder: snapshots/<commit>/<f's folders>
    let up = "../".repeat(1 + Path::new(f).components().count());
    let Some(parent) = dst.parent() else {
        return;
    };
    if std::fs::create_dir_all(parent).is_ok() {
        #[cfg(unix)]
        let _ = std::os::unix::fs::symlink(format!("{up}blobs/{name}"), &dst);
    }
}

/// Whether a downloaded file whose cache blob is named by a SHA-256 (hf-hub names a blob by the
/// hub's ETag, which is the content's SHA-256 for an LFS file) has that content; a blob of
/// another name (a git object's id) is not checked.
fn content_matches_name(path: &Path) -> Result<bool> {
    let Ok(blob) = std::fs::canonicalize(path) else {
        return Ok(true);
    };
    let name = blob
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    if name.len() != 64 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(true);
    }
    Ok(crate::error::fs::sha256(&blob)? == name.to_ascii_lowercase())
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
    let select = Selection {
        first: &|f, _| wanted(f),
        then: &|_| Vec::new(),
    };
    resolve(id, revision, RepoType::Dataset, &select, &[])
}

/// A model: config, tokenizer files, chat template and the safetensors weights the loader reads:
/// `model.safetensors`, else the index and the shards it names (never a
/// `consolidated.safetensors` or other copy beside them).
pub fn model(id: &str, revision: &str) -> Result<RepoDir> {
    let first = |f: &str, listed: &[String]| {
        let single = listed.is_empty() || listed.iter().any(|l| l == "model.safetensors");
        matches!(
            f,
            "config.json"
                | "tokenizer.json"
                | "tokenizer_config.json"
                | "chat_template.jinja"
                | "generation_config.json"
                | "special_tokens_map.json"
        ) || (f == "model.safetensors")
            || (f == "model.safetensors.index.json" && !single)
            || (f.starts_with("additional_chat_templates/") && f.ends_with(".jinja"))
    };
    let shards = |dir: &Path| -> Vec<String> {
        if dir.join("model.safetensors").exists() {
            return Vec::new();
        }
        // the shards the index names (the loader checks the index itself, later)
        let index = dir.join("model.safetensors.index.json");
        let Ok(v) = crate::error::fs::read_json::<serde_json::Value>(&index) else {
            return Vec::new();
        };
        let mut names: Vec<String> = v["weight_map"]
            .as_object()
            .into_iter()
            .flat_map(|m| m.values())
            .filter_map(|x| x.as_str())
            .filter(|n| stays_inside(n) && !n.contains('/'))
            .map(String::from)
            .collect();
        names.sort();
        names.dedup();
        names
    };
    let select = Selection {
        first: &first,
        then: &shards,
    };
    let dir = resolve(
        id,
        revision,
        RepoType::Model,
        &select,
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
mod tests;
