//! Tests that read `../shared/realdata` are marked ignored where it is absent, so the summary shows
//! them as ignored rather than passed. Under `CI=true` they are not: they run and fail, naming it.
//! The same holds for the hub test and `REFDPO_OLAH` (the olah server it starts), and for the
//! Python checks (the Triton kernels, TensorBoard's reader) and `REFDPO_PYTHON` (`tests/python/install.sh`).
//!
//! Under `--features cuda` it also compiles the fused kernels (`src/model/fused/kernels.cu`) to
//! PTX with nvcc (`$NVCC`, else `$CUDA_HOME/bin/nvcc`, else `nvcc` on the PATH), for compute
//! capability `$CUDA_COMPUTE_CAP`, else the first GPU's from `nvidia-smi`, else 7.5 (the driver
//! compiles PTX for newer GPUs).
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
    println!("cargo::rustc-check-cfg=cfg(python_absent)");
    println!("cargo::rerun-if-env-changed=REFDPO_PYTHON");
    let python = std::env::var_os("REFDPO_PYTHON").map(std::path::PathBuf::from);
    if !python.is_some_and(|p| p.is_file()) && !ci {
        println!("cargo::rustc-cfg=python_absent");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        compile_kernels(&root);
        embed_cubins(&root);
    }
}

/// The Triton kernels' committed cubins (`src/model/fused/triton/kernels/`, compiled from
/// Triton by `compile.py`) as a table of names and bytes for `include!`.
fn embed_cubins(root: &str) {
    let dir = std::path::Path::new(root).join("src/model/fused/triton/kernels");
    println!("cargo::rerun-if-changed={}", dir.display());
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            e.expect("a directory entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter_map(|n| n.strip_suffix(".cubin").map(str::to_owned))
        .collect();
    names.sort();
    let mut table = String::from("pub static CUBINS: &[(&str, &[u8])] = &[\n");
    for n in &names {
        let path = dir.join(format!("{n}.cubin"));
        println!("cargo::rerun-if-changed={}", path.display());
        table += &format!(
            "    ({n:?}, include_bytes!({:?})),\n",
            path.display().to_string()
        );
    }
    table += "];\n";
    let out = std::path::Path::new(&std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"))
        .join("triton_cubins.rs");
    std::fs::write(&out, table).unwrap_or_else(|e| panic!("{}: {e}", out.display()));
}

fn compile_kernels(root: &str) {
    let src = std::path::Path::new(root).join("src/model/fused/kernels.cu");
    let out = std::path::Path::new(&std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"))
        .join("fused.ptx");
    println!("cargo::rerun-if-changed={}", src.display());
    for var in ["NVCC", "CUDA_HOME", "CUDA_COMPUTE_CAP"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    let nvcc = std::env::var_os("NVCC")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("CUDA_HOME").map(|h| std::path::Path::new(&h).join("bin/nvcc"))
        })
        .unwrap_or_else(|| "nvcc".into());
    let cap = std::env::var("CUDA_COMPUTE_CAP")
        .ok()
        .or_else(detected_compute_cap)
        .unwrap_or_else(|| "75".into());
    let status = std::process::Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17", &format!("-arch=compute_{cap}")])
        .arg(&src)
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {} to compile the fused kernels: {e}. Install the CUDA toolkit or set NVCC", nvcc.display()));
    assert!(status.success(), "nvcc failed on {}", src.display());
}

/// The first GPU's compute capability from `nvidia-smi` (as candle's kernels detect it), e.g. "90".
fn detected_compute_cap() -> Option<String> {
    let out = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=compute_cap", "--format=csv,noheader"])
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let cap = text.lines().next()?.trim().replace('.', "");
    (out.status.success() && !cap.is_empty()).then_some(cap)
}
