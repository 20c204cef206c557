use super::*;

#[test]
fn rows_are_deterministic_and_varied() {
    let (a, b) = (rows(7, 50), rows(7, 50));
    assert!(a
        .iter()
        .zip(&b)
        .all(|(x, y)| x.chosen == y.chosen && x.prompt == y.prompt));
    let mean = |f: &dyn Fn(&Row) -> usize| a.iter().map(f).sum::<usize>() as f64 / a.len() as f64;
    assert!(mean(&|r| r.chosen.split(' ').count()) > mean(&|r| r.rejected.split(' ').count()));
}

#[test]
fn every_demo_word_is_in_the_vocabulary() {
    let vocab = vocabulary();
    for r in rows(3, 40) {
        for w in r
            .prompt
            .split(' ')
            .chain(r.chosen.split(' '))
            .chain(r.rejected.split(' '))
        {
            assert!(w.trim().is_empty() || vocab.iter().any(|v| v == w), "{w}");
        }
    }
}

#[test]
fn two_commands_generating_at_once_both_get_the_assets() {
    // each once failed, naming the temporary folder the other had removed
    let tmp = tempfile::tempdir().unwrap();
    let cfg = DemoConfig {
        generate: true,
        dir: tmp.path().join("demo"),
        train_rows: 40,
        test_rows: 8,
        ..Default::default()
    };
    std::thread::scope(|s| {
        let a = s.spawn(|| ensure(&cfg));
        let b = s.spawn(|| ensure(&cfg));
        a.join().unwrap().unwrap();
        b.join().unwrap().unwrap();
    });
    assert!(cfg.dir.join("demo.json").exists());
    assert!(cfg.dir.join("model/model.safetensors").exists());
    assert!(!cfg.dir.join(".refdpo-demo.lock").exists());
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert_eq!(left.len(), 1, "only demo/ is left: {left:?}");
}

#[test]
fn only_an_earlier_demo_folder_is_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = DemoConfig {
        generate: true,
        dir: tmp.path().join("mine"),
        train_rows: 40,
        test_rows: 8,
        ..Default::default()
    };
    // a folder of the user's own (a model, `.`): refused, left as it was
    std::fs::create_dir_all(&cfg.dir).unwrap();
    std::fs::write(cfg.dir.join("precious.txt"), b"keep").unwrap();
    let err = ensure(&cfg).unwrap_err().to_string();
    assert!(
        err.contains("precious.txt") && err.contains("demo.dir"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(cfg.dir.join("precious.txt")).unwrap(),
        b"keep"
    );
    // the demo's own entry names without its stamp: refused too
    std::fs::remove_file(cfg.dir.join("precious.txt")).unwrap();
    std::fs::create_dir(cfg.dir.join("model")).unwrap();
    let err = ensure(&cfg).unwrap_err().to_string();
    assert!(err.contains("demo.json"), "{err}");
    // an empty folder, then an earlier demo of another seed: made, then replaced
    std::fs::remove_dir(cfg.dir.join("model")).unwrap();
    ensure(&cfg).unwrap();
    cfg.seed += 1;
    ensure(&cfg).unwrap();
    // a file of the user's inside an earlier demo's folder: refused, kept
    std::fs::write(cfg.dir.join("model/notes.txt"), b"mine").unwrap();
    cfg.seed += 1;
    let err = ensure(&cfg).unwrap_err().to_string();
    assert!(err.contains("notes.txt"), "{err}");
    assert_eq!(
        std::fs::read(cfg.dir.join("model/notes.txt")).unwrap(),
        b"mine"
    );
    std::fs::remove_file(cfg.dir.join("model/notes.txt")).unwrap();
    // a file manager's litter, beside the demo and inside it: replaced with it
    std::fs::write(cfg.dir.join(".DS_Store"), b"finder").unwrap();
    std::fs::write(cfg.dir.join("model/Thumbs.db"), b"explorer").unwrap();
    ensure(&cfg).unwrap();
    let stamp = std::fs::read_to_string(cfg.dir.join("demo.json")).unwrap();
    assert!(
        stamp.contains(&format!("\"seed\": {}", cfg.seed))
            || stamp.contains(&format!("\"seed\":{}", cfg.seed)),
        "{stamp}"
    );
}
