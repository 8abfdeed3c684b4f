//! Checksums of a few SFT + GRPO steps, pinned: refactoring the trainer (its phases, the
//! pipeline's stages) must not change a single bit of the weights or a single metric.
//!
//! The pinned values were measured with the code before the GRPO step was cut into phases
//! (77e306b), on x86-64 with AVX-512F and on x86-64 with AVX2 + FMA but no AVX-512: the kernels
//! sobre's dependencies pick at run time differ between CPU classes (gemm's AVX-512
//! micro-kernels sum in another order), so each class has its own. On another CPU the test
//! checks that two identical runs agree bit for bit instead (and prints its checksums).

use std::path::Path;

use sobre_train::Config;
use sobre_train::pipeline::{Pipeline, RunOptions};

/// FNV-1a, 64 bits: a checksum that needs no dependency.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The metric lines without what depends on the clock or the machine's memory.
fn metrics_without_timings(dir: &Path) -> String {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let mut out = String::new();
    for line in text.lines() {
        let mut v: serde_json::Map<String, serde_json::Value> = serde_json::from_str(line).unwrap();
        v.retain(|k, _| !(k.starts_with("time") || k.contains("per_second") || k.contains("rss")));
        out.push_str(&serde_json::Value::Object(v).to_string());
        out.push('\n');
    }
    out
}

/// (weights, optimizer state, metrics) checksums of the smoke config with `sets`.
fn checksums(sets: &[&str]) -> (u64, u64, u64) {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/smoke.toml");
    let text = std::fs::read_to_string(p).unwrap();
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let (cfg, src) = Config::parse(&text, "configs/smoke.toml", &sets).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let opts = RunOptions {
        out_dir: Some(dir.path().to_path_buf()),
        quiet: true,
        ..RunOptions::default()
    };
    let summary = Pipeline::new(cfg, src, opts).unwrap().run().unwrap();
    let last = summary
        .run_dir
        .join(format!("checkpoints/step-{:06}", summary.grpo_steps));
    let w = fnv1a(&std::fs::read(last.join("model.safetensors")).unwrap());
    let o = fnv1a(&std::fs::read(last.join("optimizer.safetensors")).unwrap());
    let m = fnv1a(metrics_without_timings(&summary.run_dir).as_bytes());
    (w, o, m)
}

/// The CPU kinds the checksums were measured on (the float results of the kernels depend on
/// the SIMD width the CPU backend picks): `Some(true)` with AVX-512, `Some(false)` with AVX2 + FMA
/// but no AVX-512, `None` elsewhere.
fn cpu_class() -> Option<bool> {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma");
        avx2.then(|| std::arch::is_x86_feature_detected!("avx512f"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

/// Checks the checksums of a smoke run with `sets` against those measured before the refactor
/// on an AVX-512 machine (`avx512`) and on an AVX2 one (`avx2`); on other CPUs, that two runs
/// agree.
fn check(sets: &[&str], avx512: (u64, u64, u64), avx2: (u64, u64, u64)) {
    let got = checksums(sets);
    eprintln!(
        "checksums of {sets:?}: ({:#018x}, {:#018x}, {:#018x})",
        got.0, got.1, got.2
    );
    match cpu_class() {
        Some(wide) => {
            let pinned = if wide { avx512 } else { avx2 };
            assert_eq!(
                got, pinned,
                "checksums of {sets:?} changed: got {:#018x?}",
                got
            );
        }
        None => assert_eq!(
            got,
            checksums(sets),
            "two identical runs of {sets:?} differ"
        ),
    }
}

#[test]
fn smoke_steps_keep_their_checksums() {
    // KL to the reference, two mini-batches, μ = 2 (old log-probs from the rollout), two
    // replicas, the aux-loss-free bias and DAPO's dynamic sampling: every phase has work.
    check(
        &[
            "grpo.mini_batch_size=8",
            "grpo.num_iterations=2",
            "run.data_parallel_size=2",
            "model.aux_loss_free_bias=true",
            "grpo.filter_zero_std_groups=true",
            "grpo.max_resample_rounds=1",
        ],
        (0xadc7ab9aafd69725, 0x62b3aa1eb3b71a06, 0x3dbc91f985f0d371),
        (0xc2aa264b61bf8f68, 0xa030ee419a335bda, 0x1fcbeb12380f94ed),
    );
}

#[test]
fn smoke_steps_with_balance_loss_keep_their_checksums() {
    // The routing totals' exchange between replicas and the dr_grpo loss.
    check(
        &[
            "grpo.loss=\"dr_grpo\"",
            "grpo.aux_loss_coef=0.01",
            "run.data_parallel_size=2",
            "grpo.beta=0.0",
        ],
        (0x83a8634875e0dfa0, 0xdb7a293f894512b4, 0xe02f6e974e30e726),
        (0x83a8634875e0dfa0, 0xdb7a293f894512b4, 0xceabfbade1ea0355),
    );
}
