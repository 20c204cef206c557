use super::*;

#[test]
fn local_directory_is_used_as_is() {
    let d = tempfile::tempdir().unwrap();
    let select = Selection {
        first: &|_, _| true,
        then: &|_| Vec::new(),
    };
    let r = resolve(
        d.path().to_str().unwrap(),
        "main",
        RepoType::Dataset,
        &select,
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
fn a_blob_named_by_a_sha256_is_checked_against_its_content() {
    let d = tempfile::tempdir().unwrap();
    let sha = crate::error::fs::sha256(&{
        let p = d.path().join("x");
        std::fs::write(&p, b"weights").unwrap();
        p
    })
    .unwrap();
    let blob = d.path().join(&sha);
    std::fs::write(&blob, b"weights").unwrap();
    assert!(content_matches_name(&blob).unwrap());
    std::fs::write(&blob, b"weightsX").unwrap();
    assert!(!content_matches_name(&blob).unwrap());
    // a git object's id (40 hex digits) or any other name: not checked
    let other = d.path().join("a".repeat(40));
    std::fs::write(&other, b"anything").unwrap();
    assert!(content_matches_name(&other).unwrap());
}

#[test]
fn a_listed_blob_already_in_the_cache_is_linked_not_fetched() {
    // the shape of the hub's `?blobs=true` listing (hf-hub's own `detailed_info` test)
    let listing: Listing = serde_json::from_value(serde_json::json!({
        "sha": "8b3861f6931c4026b0cd22b38dbc09e7668983ac",
        "siblings": [
            {"blobId": "6d34772f5ca361021038b404fb913ec8dc0b1a5a", "rfilename": "config.json", "size": 5},
            {"blobId": "cd1c6d8bde5006076655711a49feae66f07d707e", "rfilename": "sub/model.safetensors", "size": 7,
             "lfs": {"pointerSize": 127, "size": 7,
                     "sha256": "f9343d7d7ec5c3d8bcced056c438fc9f1d3819e9ca3d42418a40857050e10e20"}},
            {"blobId": "8ab39654695136173fee29cba0193f679dfbd652", "rfilename": "tokenizer.json", "size": 9},
            {"rfilename": "mirror.json"}
        ]
    }))
    .unwrap();
    let d = tempfile::tempdir().unwrap();
    let root = d.path();
    let snap = root.join("snapshots").join(&listing.sha);
    std::fs::create_dir_all(root.join("blobs")).unwrap();
    let blob =
        |name: &str, body: &[u8]| std::fs::write(root.join("blobs").join(name), body).unwrap();
    blob("6d34772f5ca361021038b404fb913ec8dc0b1a5a", b"{...}");
    blob(
        "f9343d7d7ec5c3d8bcced056c438fc9f1d3819e9ca3d42418a40857050e10e20",
        b"weights",
    );
    // a blob of another size than listed (a download cut short) is not taken
    blob("8ab39654695136173fee29cba0193f679dfbd652", b"tok");
    for s in &listing.siblings {
        link_cached_blob(root, &snap, s);
    }
    assert_eq!(std::fs::read(snap.join("config.json")).unwrap(), b"{...}");
    assert_eq!(
        std::fs::read(snap.join("sub/model.safetensors")).unwrap(),
        b"weights"
    );
    let link = std::fs::read_link(snap.join("sub/model.safetensors")).unwrap();
    assert_eq!(
        link,
        Path::new(
            "../../../blobs/f9343d7d7ec5c3d8bcced056c438fc9f1d3819e9ca3d42418a40857050e10e20"
        )
    );
    assert!(!snap.join("tokenizer.json").exists());
    assert!(!snap.join("mirror.json").exists());
}

#[test]
fn only_a_commit_id_names_a_snapshot() {
    let c = "8b3861f6931c4026b0cd22b38dbc09e7668983ac";
    assert_eq!(listed_commit(c, "main").as_deref(), Some(c));
    assert_eq!(listed_commit("", c).as_deref(), Some(c));
    for sha in ["../../../../ESC2", "", "main", &c[..39], &format!("{c}0")] {
        assert_eq!(listed_commit(sha, "main"), None, "{sha}");
    }
}

#[test]
fn missing_path_is_named() {
    let err = dataset("./no/such/dir", "main", &|_| true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("./no/such/dir"), "{err}");
}
