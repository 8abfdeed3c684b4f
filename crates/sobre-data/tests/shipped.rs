//! The shipped datasets regenerate byte for byte: each file's SHA-256 equals the one in
//! `datasets/README.md`, both for the committed file and for a fresh generation.
//!
//! `SOBRE_WRITE_DATASETS=1 cargo test -p sobre-data --test shipped` rewrites the files and
//! prints the README table rows.

use std::path::PathBuf;

use sobre_data::shipped::{sha256_hex, shipped_files};

fn datasets_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../datasets")
}

/// The checksum the README gives for `path`: the first 64-hex-digit word on its table row.
fn readme_sha(readme: &str, path: &str) -> Option<String> {
    let row = readme
        .lines()
        .find(|l| l.starts_with('|') && l.contains(&format!("`{path}`")))?;
    row.split(|c: char| !c.is_ascii_hexdigit())
        .find(|w| w.len() == 64)
        .map(str::to_string)
}

#[test]
fn shipped_datasets_regenerate_with_their_checksums() {
    let dir = datasets_dir();
    if std::env::var_os("SOBRE_WRITE_DATASETS").is_some() {
        for f in shipped_files() {
            let text = f.generate().unwrap();
            let path = dir.join(f.path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &text).unwrap();
            println!(
                "| `{}` | {} | `{}` |",
                f.path,
                f.n,
                sha256_hex(text.as_bytes())
            );
        }
    }
    let readme = std::fs::read_to_string(dir.join("README.md")).expect("datasets/README.md");
    for f in shipped_files() {
        let want = readme_sha(&readme, f.path)
            .unwrap_or_else(|| panic!("README has no checksum row for {}", f.path));
        assert!(
            readme.contains(f.command),
            "README lacks the command for {}",
            f.path
        );
        let regenerated = f.generate().unwrap();
        assert_eq!(
            sha256_hex(regenerated.as_bytes()),
            want,
            "regenerated {}",
            f.path
        );
        let on_disk = std::fs::read(dir.join(f.path)).unwrap();
        assert_eq!(sha256_hex(&on_disk), want, "committed {}", f.path);
        assert_eq!(regenerated.lines().count(), f.n);
    }
}
