//! Bundles the fixture repository (`tests/fixtures/repo`) into the binary as
//! the first-run demo repository: writes `$OUT_DIR/demo_repo.rs`, one
//! `(relative path, include_str!(...))` entry per file, so the bundle can
//! never drift from the fixtures.

use std::path::{Path, PathBuf};

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).expect("read the fixture repository").flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        if path.is_dir() {
            walk(&path, out);
        } else {
            out.push(path);
        }
    }
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let repo = manifest.join("../../tests/fixtures/repo").canonicalize().expect("tests/fixtures/repo exists");
    println!("cargo:rerun-if-changed={}", repo.display());
    let mut files = Vec::new();
    walk(&repo, &mut files);
    let mut code = String::from("&[\n");
    for f in &files {
        let rel = f.strip_prefix(&repo).expect("under the repository").to_string_lossy().into_owned();
        println!("cargo:rerun-if-changed={}", f.display());
        code.push_str(&format!("    ({rel:?}, include_str!({:?})),\n", f.display().to_string()));
    }
    code.push_str("]\n");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("demo_repo.rs");
    std::fs::write(out, code).expect("write demo_repo.rs");
}
