//! Repository checks that run under `cargo test`: every Rust file says what it is for,
//! and the paths the docs point at exist.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            if path
                .file_name()
                .is_some_and(|n| n != "target" && !n.to_string_lossy().starts_with('.'))
            {
                rust_files(&path, out);
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_rust_file_starts_with_a_doc_comment() {
    let mut files = vec![];
    rust_files(&root().join("crates"), &mut files);
    assert!(files.len() > 20, "found only {} files", files.len());
    let missing: Vec<_> = files
        .iter()
        .filter(|f| !std::fs::read_to_string(f).unwrap().trim_start().starts_with("//!"))
        .collect();
    assert!(missing.is_empty(), "files without a `//!` comment: {missing:?}");
}

#[test]
fn paths_in_architecture_md_exist() {
    let doc = std::fs::read_to_string(root().join("ARCHITECTURE.md")).unwrap();
    let mut checked = 0;
    for (i, part) in doc.split('`').enumerate() {
        // Inside backticks, anything that looks like a repository path must exist.
        if i % 2 == 1 && (part.starts_with("crates/") || part.starts_with(".ci/")) && !part.contains(' ') {
            let path = part.split("::").next().unwrap().trim_end_matches('/');
            assert!(
                root().join(path).exists(),
                "ARCHITECTURE.md mentions `{part}`, which does not exist"
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 10,
        "ARCHITECTURE.md should map the code (found {checked} paths)"
    );
}
