//! Tests that read `../shared/realdata` are marked ignored where it is absent, so the summary shows
//! them as ignored rather than passed. Under `CI=true` they are not: they run and fail, naming it.
//! The same holds for the hub test and `REFDPO_OLAH` (the olah server it starts).
//!
//! The watched path is absolute: clones that share a target directory share this script's last
//! run, and a relative path would let a clone with the data inherit "absent" from one without.

fn main() {
    let root = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let realdata = std::path::Path::new(&root).join("../shared/realdata");
    println!("cargo::rustc-check-cfg=cfg(realdata_absent)");
    println!("cargo::rerun-if-changed={}", realdata.display());
    println!("cargo::rerun-if-env-changed=CI");
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    if !realdata.is_dir() && !ci {
        println!("cargo::rustc-cfg=realdata_absent");
    }
    println!("cargo::rustc-check-cfg=cfg(hub_server_absent)");
    println!("cargo::rerun-if-env-changed=REFDPO_OLAH");
    let olah = std::env::var_os("REFDPO_OLAH").map(std::path::PathBuf::from);
    if !olah.is_some_and(|p| p.is_file()) && !ci {
        println!("cargo::rustc-cfg=hub_server_absent");
    }
}
