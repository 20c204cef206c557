//! Stage one through a real Hugging Face Hub protocol server: olah (a self-hosted hub mirror,
//! PyPI), two instances chained by tests/hub/serve.sh over local git repositories, reached
//! through `HF_ENDPOINT` by the same hf-hub client users run against huggingface.co. Dataset and
//! model download, revision pinning (a branch and a commit), `HF_TOKEN` set, a missing repo and
//! a missing revision, a second run from the HF cache with `HF_HUB_OFFLINE=1` and the server
//! gone, and a server that is down: a clear error, then a rerun completes.
//!
//! Needs `REFDPO_OLAH` (the `olah-cli` path: `export REFDPO_OLAH=$(bash tests/hub/install.sh)`);
//! `.ci/run` installs it. Without it the test is ignored, except under `CI=true`.

use super::common::{copy_dir, demo_config, ok, repo};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The two olah processes; stopped on drop.
struct Hub {
    pids: Vec<u32>,
    args: Vec<String>,
    endpoint: String,
}

impl Hub {
    fn start(olah: &str, mirrors: &Path, work: &Path) -> Self {
        let port = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        };
        let (origin, front) = (port(), port());
        let args = vec![
            olah.to_string(),
            mirrors.display().to_string(),
            work.display().to_string(),
            origin.to_string(),
            front.to_string(),
        ];
        let mut hub = Self {
            pids: Vec::new(),
            args,
            endpoint: format!("http://127.0.0.1:{front}"),
        };
        hub.restart();
        hub
    }

    fn restart(&mut self) {
        let out = Command::new("bash")
            .arg(repo().join("tests/hub/serve.sh"))
            .args(&self.args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "serve.sh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.pids = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(|p| p.parse().unwrap())
            .collect();
    }

    fn stop(&mut self) {
        for pid in self.pids.drain(..) {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.stop();
    }
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=refdpo",
            "-c",
            "user.email=refdpo@localhost",
        ])
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_DATE", "2026-01-01T00:00:00Z")
        .env("GIT_COMMITTER_DATE", "2026-01-01T00:00:00Z")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A git repository at `dst` holding the files of `src` on `main`; returns its commit.
fn mirror(src: &Path, dst: &Path) -> String {
    copy_dir(src, dst);
    git(dst, &["init", "-q", "-b", "main"]);
    git(dst, &["add", "-A"]);
    git(dst, &["commit", "-qm", "initial"]);
    git(dst, &["rev-parse", "HEAD"])
}

/// `refdpo precompute` against the hub, with the overrides `sets`.
fn precompute(cfg: &Path, cwd: &Path, env: &[(&str, String)], sets: &[String]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_refdpo"));
    cmd.args(["precompute", "--quiet", "--config", cfg.to_str().unwrap()])
        .current_dir(cwd);
    for s in sets {
        cmd.args(["--set", s]);
    }
    for var in [
        "HF_HUB_OFFLINE",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ] {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn succeeded(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn failed_with(out: &Output, needle: &str, what: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{what} succeeded");
    assert!(err.contains(needle), "{what}: {err}");
}

#[test]
#[cfg_attr(
    hub_server_absent,
    ignore = "needs olah: export REFDPO_OLAH=$(bash tests/hub/install.sh)"
)]
fn stage_one_through_a_hub_server() {
    let olah = std::env::var("REFDPO_OLAH").expect(
        "REFDPO_OLAH is not set: the hub test needs olah (export REFDPO_OLAH=$(bash tests/hub/install.sh))",
    );
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    // the demo's model and dataset, as two hub repositories; the model with a `dev` branch
    let demo = demo_config(t, "");
    ok(&["show", "--config", demo.to_str().unwrap()], t);
    let mirrors = t.join("mirrors");
    let model_repo = mirrors.join("models/demo-org/tiny-llama");
    let main_sha = mirror(&t.join("demo/model"), &model_repo);
    let data_sha = mirror(
        &t.join("demo/dataset"),
        &mirrors.join("datasets/demo-org/prefs"),
    );
    git(&model_repo, &["checkout", "-q", "-b", "dev"]);
    std::fs::write(
        model_repo.join("generation_config.json"),
        r#"{"eos_token_id": 2}"#,
    )
    .unwrap();
    git(&model_repo, &["add", "-A"]);
    git(&model_repo, &["commit", "-qm", "generation config"]);
    let dev_sha = git(&model_repo, &["rev-parse", "HEAD"]);
    git(&model_repo, &["checkout", "-q", "main"]);
    let mut hub = Hub::start(&olah, &mirrors, &t.join("hub"));

    let cfg = t.join("hub.toml");
    std::fs::write(
        &cfg,
        "[dataset]\nid = \"demo-org/prefs\"\n[model]\nid = \"demo-org/tiny-llama\"\ndtype = \"f32\"\n\
         [tokenize]\nmax_length = 96\n[precompute]\nbatch_size = 32\n",
    )
    .unwrap();
    let hf_home = t.join("hf");
    let env = vec![
        ("HF_ENDPOINT", hub.endpoint.clone()),
        ("HF_HOME", hf_home.display().to_string()),
        ("HF_TOKEN", "hf_refdpo_test_token".to_string()),
    ];
    let out = |name: &str| format!("precompute.out={}", t.join(name).display());

    // dataset and model from the hub; the cache holds the demo's kept pairs
    let first = precompute(&cfg, t, &env, &[out("c1")]);
    succeeded(&first, "download");
    let report = super::common::read_json(&t.join("c1/report.json"));
    assert_eq!(report["train_prefs"]["rows_kept"], 156, "{report}");
    // the fingerprint records the commits `main` resolved to, and the data files' hashes
    let fp = refdpo::cache::parquet::read_fingerprint(&t.join("c1/train_prefs.parquet")).unwrap();
    assert_eq!(
        (fp.dataset_commit.as_str(), fp.model_commit.as_str()),
        (data_sha.as_str(), main_sha.as_str())
    );
    assert_eq!(
        fp.data_sha256.keys().collect::<Vec<_>>(),
        ["data/train_prefs-00000-of-00001.parquet"]
    );

    // revision pinning: the main commit, and the dev branch (its own snapshot)
    let by_commit = format!("model.revision={main_sha}");
    succeeded(
        &precompute(&cfg, t, &env, &[out("c2"), by_commit]),
        "commit",
    );
    succeeded(
        &precompute(&cfg, t, &env, &[out("c3"), "model.revision=dev".into()]),
        "branch",
    );
    let fp = refdpo::cache::parquet::read_fingerprint(&t.join("c3/train_prefs.parquet")).unwrap();
    assert_eq!(
        (fp.model_revision.as_str(), fp.model_commit.as_str()),
        ("dev", dev_sha.as_str())
    );
    let model_cache = hf_home.join("hub/models--demo-org--tiny-llama");
    assert_eq!(
        std::fs::read_to_string(model_cache.join("refs/dev"))
            .unwrap()
            .trim(),
        dev_sha
    );
    assert!(model_cache
        .join("snapshots")
        .join(&dev_sha)
        .join("generation_config.json")
        .exists());
    assert!(!model_cache
        .join("snapshots")
        .join(&main_sha)
        .join("generation_config.json")
        .exists());

    // a missing repo and a missing revision are errors that name them
    failed_with(
        &precompute(&cfg, t, &env, &[out("c4"), "model.id=demo-org/nope".into()]),
        "`demo-org/nope`",
        "missing repo",
    );
    failed_with(
        &precompute(
            &cfg,
            t,
            &env,
            &[out("c4"), "model.revision=nobranch".into()],
        ),
        "`nobranch`",
        "missing revision",
    );

    // the server goes away: online, a clear error; offline, the HF cache serves the run
    hub.stop();
    failed_with(
        &precompute(&cfg, t, &env, &[out("c5")]),
        "HF_ENDPOINT",
        "server down",
    );
    let mut offline = env.clone();
    // any of huggingface_hub's true values
    offline.push(("HF_HUB_OFFLINE", "True".into()));
    succeeded(&precompute(&cfg, t, &offline, &[out("c5")]), "offline");
    // back up: the interrupted online run completes
    hub.restart();
    let again = precompute(&cfg, t, &env, &[out("c6")]);
    succeeded(&again, "after a restart");
    let ids = |dir: &str| -> PathBuf { t.join(dir).join("train_prefs.arrow") };
    assert_eq!(
        std::fs::read(ids("c1")).unwrap(),
        std::fs::read(ids("c6")).unwrap(),
        "the same cache, byte for byte"
    );

    // A hub that keeps the connection open and sends nothing: an error naming it after
    // HF_HUB_DOWNLOAD_TIMEOUT seconds, not a hang.
    let signal = |sig: &str| {
        for pid in &hub.pids {
            let _ = Command::new("kill").args([sig, &pid.to_string()]).status();
        }
    };
    signal("-STOP");
    let mut stalled = env.clone();
    stalled.push(("HF_HUB_DOWNLOAD_TIMEOUT", "2".into()));
    let t0 = std::time::Instant::now();
    let out_stalled = precompute(&cfg, t, &stalled, &[out("c9")]);
    signal("-CONT");
    failed_with(
        &out_stalled,
        "stopped answering: nothing came for 2 s",
        "stalled hub",
    );
    assert!(t0.elapsed().as_secs() < 30, "{:?}", t0.elapsed());

    // A branch that moves is read at its new commit online (not the snapshot the cache's ref
    // names), through an endpoint written with a trailing slash.
    git(&model_repo, &["checkout", "-q", "dev"]);
    std::fs::write(
        model_repo.join("generation_config.json"),
        r#"{"eos_token_id": 1}"#,
    )
    .unwrap();
    git(&model_repo, &["commit", "-qam", "another eos"]);
    let moved_sha = git(&model_repo, &["rev-parse", "HEAD"]);
    git(&model_repo, &["checkout", "-q", "main"]);
    hub.stop();
    hub.restart();
    let mut slash = env.clone();
    slash[0].1 = format!("{}/", hub.endpoint);
    succeeded(
        &precompute(&cfg, t, &slash, &[out("c7"), "model.revision=dev".into()]),
        "moved branch",
    );
    let fp = refdpo::cache::parquet::read_fingerprint(&t.join("c7/train_prefs.parquet")).unwrap();
    assert_eq!(fp.model_commit, moved_sha);
    let dev_ref = std::fs::read_to_string(model_cache.join("refs/dev")).unwrap();
    assert_eq!(dev_ref.trim(), moved_sha);

    // A snapshot without a generation config its listing names (huggingface_hub's download
    // with a file filter) still serves stage one offline: no number of the cache comes from it.
    std::fs::create_dir_all(model_cache.join("trees")).unwrap();
    std::fs::write(
        model_cache.join("trees").join(format!("{moved_sha}.json")),
        r#"{"format_version": 1, "files": {"generation_config.json": {"size": 1, "blob_id": "x"}}}"#,
    )
    .unwrap();
    std::fs::remove_file(
        model_cache
            .join("snapshots")
            .join(&moved_sha)
            .join("generation_config.json"),
    )
    .unwrap();
    succeeded(
        &precompute(
            &cfg,
            t,
            &offline,
            &[out("c10"), "model.revision=dev".into()],
        ),
        "offline without a generation config",
    );

    // A fetch cut short (its marker left in `.locks/`, where hf-hub wrote the commit's ref with
    // the first file) is refused offline, even pinned to the commit; an online run completes it.
    let marker = hf_home
        .join("hub/.locks/models--demo-org--tiny-llama")
        .join(format!("refdpo-fetching-{main_sha}"));
    std::fs::create_dir_all(marker.parent().unwrap()).unwrap();
    std::fs::write(&marker, "").unwrap();
    let pinned = format!("model.revision={main_sha}");
    failed_with(
        &precompute(&cfg, t, &offline, &[out("c11"), pinned.clone()]),
        "was cut short",
        "offline after a fetch cut short",
    );
    succeeded(
        &precompute(&cfg, t, &env, &[out("c11"), pinned.clone()]),
        "online, completing the fetch",
    );
    assert!(!marker.exists());
    succeeded(
        &precompute(&cfg, t, &offline, &[out("c12"), pinned]),
        "offline after the fetch completed",
    );

    // A snapshot that lacks a file huggingface_hub's listing of its commit names (a link
    // removed, a download cut short) is refused offline, naming the file.
    let data_cache = hf_home.join("hub/datasets--demo-org--prefs");
    let shard = "data/train_prefs-00000-of-00001.parquet";
    std::fs::create_dir_all(data_cache.join("trees")).unwrap();
    std::fs::write(
        data_cache.join("trees").join(format!("{data_sha}.json")),
        format!(
            r#"{{"format_version": 1, "files": {{"{shard}": {{"size": 1, "blob_id": "x"}}}}}}"#
        ),
    )
    .unwrap();
    std::fs::remove_file(data_cache.join("snapshots").join(&data_sha).join(shard)).unwrap();
    failed_with(
        &precompute(&cfg, t, &offline, &[out("c8")]),
        &format!("lacks `{shard}`"),
        "incomplete snapshot",
    );
}
