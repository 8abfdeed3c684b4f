//! Shared helpers for the end-to-end tests: build the `sobre` binary once, run it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_path_buf()
}

/// Path to a `sobre` binary built from the current sources, in the same profile as this test.
/// A binary of another package is not built by `cargo test` for this one, so the first call
/// runs a nested `cargo build` (cargo releases its build lock before running tests, so it does
/// not deadlock). It builds the whole workspace with all targets: that resolves features exactly
/// as `cargo test --workspace` did (dev-dependencies included), so every library is already up
/// to date and only the binary is linked. `cargo build -p sobre-cli` alone would resolve
/// features differently (proptest turns on more of `rand`) and recompile burn and half the tree.
pub fn sobre_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("test binary path");
        // target/<profile>/deps/<test-binary>
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>/deps layout");
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "--workspace", "--all-targets"])
            .current_dir(root());
        if release {
            cmd.arg("--release");
        }
        let status = cmd
            .status()
            .expect("running cargo build for the sobre binary");
        assert!(
            status.success(),
            "cargo build --workspace --all-targets failed"
        );
        profile_dir.join(format!("sobre{}", std::env::consts::EXE_SUFFIX))
    })
}

/// Run `sobre` with `args` in `dir` and return its output.
pub fn sobre_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(sobre_bin())
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running sobre")
}

/// Run `sobre` with `args` from the workspace root.
pub fn sobre(args: &[&str]) -> Output {
    sobre_in(&root(), args)
}

/// Stdout as text, asserting the command succeeded (stderr shown if not).
pub fn ok_stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "sobre failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Stderr as text, asserting the command failed.
pub fn err_stderr(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "expected failure, got success:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// configs/smoke.toml without its step counts, plus `stages` (`[[stage]]` tables).
pub fn staged(stages: &str) -> String {
    let smoke = std::fs::read_to_string(root().join("configs/smoke.toml")).unwrap();
    let mut out: String = smoke
        .lines()
        .filter(|l| !l.trim_start().starts_with("steps ="))
        .map(|l| format!("{l}\n"))
        .collect();
    out.push_str(stages);
    out
}

/// R1's four stages in miniature: SFT, GRPO, rejection sampling, SFT again.
pub const R1_STAGES: &str = concat!(
    "[[stage]]\nname = \"cold_start\"\nkind = \"sft\"\n[stage.sft]\nsteps = 2\n",
    "[[stage]]\nname = \"rl\"\nkind = \"grpo\"\n[stage.run]\nsteps = 2\n",
    "[[stage]]\nname = \"rs\"\nkind = \"rejection_sampling\"\nn = 2\nthreshold = 0.0\nprompts = 4\n",
    "[[stage]]\nname = \"sft_again\"\nkind = \"sft\"\n[stage.sft]\nsteps = 1\n",
);
