//! `sobre train` over several processes (MPI, docs/SCALE.md).
//!
//! The `#[ignore]`d tests need `mpirun` and a `sobre` built with `--features mpi`, named by
//! `SOBRE_MPI_BIN`: `scripts/test-mpi.sh` installs Open MPI, builds that binary and runs them
//! (`.ci/run` runs the script). The others run everywhere: how a build without MPI refuses to
//! be one rank of many.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{err_stderr, ok_stdout, root, sobre};
use serde_json::Value;

fn smoke() -> String {
    root().join("configs/smoke.toml").display().to_string()
}

fn mpi_bin() -> PathBuf {
    PathBuf::from(
        std::env::var_os("SOBRE_MPI_BIN")
            .expect("SOBRE_MPI_BIN: a sobre built with --features mpi (scripts/test-mpi.sh)"),
    )
}

/// Settings that make the smoke run cross every exchange: the balance loss's routing totals,
/// two mini-batches, two passes (rollout log-probs as old ones), the KL reference, evaluation.
const EXCHANGES: [&str; 5] = [
    "grpo.aux_loss_coef=0.01",
    "grpo.mini_batch_size=8",
    "grpo.num_iterations=2",
    "eval.eval_every=2",
    "run.save_every=2",
];

fn train_args(out: &Path, replicas: usize, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = ["train", "--config", &smoke(), "--out"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    a.push(out.display().to_string());
    a.push("-q".into());
    let dp = format!("run.data_parallel_size={replicas}");
    for s in EXCHANGES
        .iter()
        .copied()
        .chain([dp.as_str()])
        .chain(extra.iter().copied())
    {
        a.push("--set".into());
        a.push(s.into());
    }
    a
}

/// One process of `bin` with `replicas` replicas.
fn one_process(out: &Path, replicas: usize, extra: &[&str]) -> Output {
    Command::new(mpi_bin())
        .args(train_args(out, replicas, extra))
        .current_dir(root())
        .output()
        .expect("running sobre")
}

fn mpirun_cmd(ranks: usize, out: &Path, replicas: usize, extra: &[&str]) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["--allow-run-as-root", "--oversubscribe", "-np"])
        .arg(ranks.to_string())
        .arg(mpi_bin())
        .args(train_args(out, replicas, extra))
        .current_dir(root());
    c
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// Keys whose values are measurements of the machine, not of the run.
fn measured(key: &str) -> bool {
    [
        "time",
        "per_second",
        "peak_rss",
        "seconds",
        "cpu",
        "energy",
        "wh",
    ]
    .iter()
    .any(|m| key.contains(m))
}

/// The metrics lines of two runs agree in every key that is not a measurement, numbers within
/// `rel` (relative) of each other.
fn assert_same_metrics(a: &Path, b: &Path, rel: f64) {
    let (la, lb) = (
        lines(&a.join("metrics.jsonl")),
        lines(&b.join("metrics.jsonl")),
    );
    assert_eq!(la.len(), lb.len(), "metrics lines");
    for (x, y) in la.iter().zip(&lb) {
        let (Some(x), Some(y)) = (x.as_object(), y.as_object()) else {
            panic!("metrics lines are objects");
        };
        for (k, v) in x {
            if measured(k) {
                continue;
            }
            let w = y
                .get(k)
                .unwrap_or_else(|| panic!("{k} missing in {}", b.display()));
            match (v.as_f64(), w.as_f64()) {
                (Some(p), Some(q)) => assert!(
                    (p - q).abs() <= rel * p.abs().max(q.abs()).max(1e-12),
                    "{k} at {} step {}: {p} vs {q}",
                    x["stage"],
                    x["step"]
                ),
                _ => assert_eq!(v, w, "{k} at {} step {}", x["stage"], x["step"]),
            }
        }
    }
}

fn weights(run: &Path, step: &str) -> Vec<u8> {
    let f = run.join("checkpoints").join(step).join("model.safetensors");
    std::fs::read(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()))
}

#[test]
#[ignore = "needs mpirun and SOBRE_MPI_BIN: scripts/test-mpi.sh"]
fn two_ranks_of_one_replica_equal_one_process_of_two() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("one"), dir.path().join("two"));
    ok_stdout(&one_process(&a, 2, &[]));
    ok_stdout(&mpirun_cmd(2, &b, 1, &[]).output().expect("running mpirun"));
    // The same shards, summed in the same order: the same run, bit for bit.
    assert_same_metrics(&a, &b, 0.0);
    assert_eq!(weights(&a, "step-000004"), weights(&b, "step-000004"));
    let samples = |r: &Path| std::fs::read_to_string(r.join("samples.jsonl")).unwrap();
    assert_eq!(samples(&a), samples(&b));
    // Rank 0 alone wrote the run directory: one final_eval.json, one set of checkpoints.
    let names: Vec<String> = std::fs::read_dir(b.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
}

#[test]
#[ignore = "needs mpirun and SOBRE_MPI_BIN: scripts/test-mpi.sh"]
fn two_ranks_of_two_replicas_follow_one_process_of_four() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("one"), dir.path().join("two"));
    // SFT only: GRPO's sampling turns float noise into other tokens after the first step.
    let sft = ["run.steps=0", "sft.steps=3", "eval.at_end=false"];
    ok_stdout(&one_process(&a, 4, &sft));
    ok_stdout(&mpirun_cmd(2, &b, 2, &sft).output().expect("running mpirun"));
    // The ranks add their two shards before adding each other's: float noise only.
    assert_same_metrics(&a, &b, 1e-6);
}

#[test]
#[ignore = "needs mpirun and SOBRE_MPI_BIN: scripts/test-mpi.sh"]
fn a_killed_rank_leaves_the_last_checkpoint_resumable_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("whole"), dir.path().join("killed"));
    let long = ["run.steps=30", "eval.eval_every=0", "eval.at_end=false"];
    ok_stdout(&one_process(&a, 2, &long));
    let mut job = mpirun_cmd(2, &b, 1, &long)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("starting mpirun");
    let ckpt = b.join("checkpoints/step-000004");
    let t = std::time::Instant::now();
    while !ckpt.exists() {
        assert!(
            t.elapsed().as_secs() < 120,
            "no checkpoint of step 4 in 2 minutes"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Kill rank 1 (a child of mpirun) mid-run: mpirun ends the job.
    let children = Command::new("ps")
        .args(["--ppid", &job.id().to_string(), "-o", "pid="])
        .output()
        .expect("ps");
    let pids = String::from_utf8_lossy(&children.stdout).to_string();
    let rank1 = pids.split_whitespace().last().expect("mpirun's ranks");
    Command::new("kill")
        .args(["-9", rank1])
        .status()
        .expect("kill");
    let status = job.wait().expect("waiting for mpirun");
    assert!(!status.success(), "the job ends when a rank is killed");
    let mut resume = mpirun_cmd(2, &b, 1, &long);
    resume.arg("--resume");
    ok_stdout(&resume.output().expect("running mpirun"));
    assert_eq!(weights(&a, "step-000030"), weights(&b, "step-000030"));
}

#[test]
fn a_build_without_mpi_refuses_to_be_one_rank_of_many() {
    // As mpirun would start it: each rank would otherwise run the whole job alone.
    let out = Command::new(common::sobre_bin())
        .args(["train", "--config", &smoke(), "--out", "/nonexistent/never"])
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .current_dir(root())
        .output()
        .expect("running sobre");
    let err = err_stderr(&out);
    assert!(
        err.contains("one of 2 ranks, but this sobre was built without the `mpi` feature"),
        "{err}"
    );
    // `run.launcher = "local"` runs the one process anyway; "mpi" asks for the feature.
    let err = err_stderr(&sobre(&[
        "train",
        "--config",
        &smoke(),
        "--set",
        "run.launcher=\"mpi\"",
    ]));
    assert!(
        err.contains("needs a sobre built with the `mpi` feature"),
        "{err}"
    );
    let err = err_stderr(&sobre(&[
        "train",
        "--config",
        &smoke(),
        "--set",
        "run.launcher=\"slurm\"",
    ]));
    assert!(
        err.contains("`run.launcher`: must be \"auto\", \"local\" or \"mpi\", got \"slurm\""),
        "{err}"
    );
}

#[test]
#[ignore = "needs mpirun and SOBRE_MPI_BIN: scripts/test-mpi.sh"]
fn a_staged_run_on_two_ranks_equals_one_process_of_two() {
    // R1's four stages (SFT, GRPO, rejection sampling, SFT) on the smoke config.
    let text = common::staged(common::R1_STAGES);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("staged.toml");
    std::fs::write(&config, text).unwrap();
    let args = |out: &Path, replicas: usize| -> Vec<String> {
        let dp = format!("run.data_parallel_size={replicas}");
        ["train", "--config", &config.display().to_string(), "--out"]
            .iter()
            .map(|s| s.to_string())
            .chain([out.display().to_string(), "-q".into(), "--set".into(), dp])
            .collect()
    };
    let (a, b) = (dir.path().join("one"), dir.path().join("two"));
    let one = Command::new(mpi_bin())
        .args(args(&a, 2))
        .output()
        .expect("sobre");
    ok_stdout(&one);
    let two = Command::new("mpirun")
        .args(["--allow-run-as-root", "--oversubscribe", "-np", "2"])
        .arg(mpi_bin())
        .args(args(&b, 1))
        .output()
        .expect("mpirun");
    ok_stdout(&two);
    assert_same_metrics(&a, &b, 0.0);
    let sft = |r: &Path| std::fs::read_to_string(r.join("stages/rs/sft.jsonl")).unwrap();
    assert_eq!(
        sft(&a),
        sft(&b),
        "rejection sampling kept the same completions"
    );
    assert_eq!(weights(&a, "sft_again"), weights(&b, "sft_again"));
}
