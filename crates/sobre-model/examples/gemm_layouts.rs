//! GFLOP/s of `gemm` (the crate burn-flex and sobre call) for the products a decode step and a
//! prefill make, with the weight laid out three ways, and the weights cycled through 16 MB so
//! that they come from L3 or memory as in decoding (docs/PERF.md item 11):
//!
//! - `row-major`: `W: [in, out]`, what burn holds;
//! - `transposed`: `Wᵀ: [out, in]`;
//! - `panels16`: 16-column panels, each its own row-major `[in, 16]` block, one gemm call per
//!   panel (the host engine's `Weight`, `src/infer.rs`).
//!
//! `cargo run --release -p sobre-model --example gemm_layouts` (one thread; prints one line per
//! row count and layout, plus the row-major layout with one hot weight as the ceiling).

use std::time::Instant;

const IN: usize = 256;
const OUT: usize = 256;
const PANEL: usize = 16;
/// 64 weights of 256 KB: more than the L2 of the machines measured.
const WEIGHTS: usize = 64;

/// One way to compute `y = x · W_j` for weight `j`.
type Layout<'a> = &'a dyn Fn(&mut [f32], usize);

/// `y[m, OUT] = x[m, IN] · W` with `W` element `(i, o)` at `w[i · w_rs + o · w_cs]`.
fn product(y: &mut [f32], x: &[f32], m: usize, w: &[f32], w_rs: usize, w_cs: usize, n: usize) {
    assert!(y.len() >= (m - 1) * OUT + n && x.len() >= m * IN);
    assert!(w.len() > (IN - 1) * w_rs + (n - 1) * w_cs);
    // SAFETY: the asserts keep every access inside the three slices; `y` is borrowed mutably.
    unsafe {
        gemm::gemm(
            m,
            n,
            IN,
            y.as_mut_ptr(),
            1,
            OUT as isize,
            false,
            x.as_ptr(),
            1,
            IN as isize,
            w.as_ptr(),
            w_cs as isize,
            w_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

fn main() {
    let value = |i: usize, j: usize| ((i * 7919 + j * 104_729) % 1000) as f32 * 1e-3 - 0.5;
    let row_major: Vec<Vec<f32>> = (0..WEIGHTS)
        .map(|j| (0..IN * OUT).map(|i| value(i, j)).collect())
        .collect();
    let transposed: Vec<Vec<f32>> = row_major
        .iter()
        .map(|w| (0..IN * OUT).map(|t| w[(t % IN) * OUT + t / IN]).collect())
        .collect();
    let panels: Vec<Vec<f32>> = row_major
        .iter()
        .map(|w| {
            let mut p = Vec::with_capacity(IN * OUT);
            for start in (0..OUT).step_by(PANEL) {
                for i in 0..IN {
                    p.extend_from_slice(&w[i * OUT + start..i * OUT + start + PANEL]);
                }
            }
            p
        })
        .collect();
    for m in [8usize, 32, 128, 550, 2200] {
        let x: Vec<f32> = (0..m * IN).map(|i| value(i, 1)).collect();
        let mut y = vec![0.0f32; m * OUT];
        let flops = 2.0 * (m * IN * OUT) as f64;
        let reps = ((4e9 / flops) as usize / WEIGHTS).max(2);
        let time = |y: &mut Vec<f32>, f: Layout| {
            f(y, 0);
            let t = Instant::now();
            for _ in 0..reps {
                for j in 0..WEIGHTS {
                    f(y, j);
                }
            }
            flops * (reps * WEIGHTS) as f64 / t.elapsed().as_secs_f64() / 1e9
        };
        let layouts: [(&str, Layout); 4] = [
            ("row-major", &|y, j| {
                product(y, &x, m, &row_major[j], OUT, 1, OUT)
            }),
            ("transposed", &|y, j| {
                product(y, &x, m, &transposed[j], 1, IN, OUT)
            }),
            ("panels16", &|y, j| {
                for (p, start) in (0..OUT).step_by(PANEL).enumerate() {
                    let panel = &panels[j][p * IN * PANEL..(p + 1) * IN * PANEL];
                    product(&mut y[start..], &x, m, panel, PANEL, 1, PANEL);
                }
            }),
            ("row-major, one hot weight", &|y, _| {
                product(y, &x, m, &row_major[0], OUT, 1, OUT)
            }),
        ];
        for (name, f) in layouts {
            println!("{m:5} rows  {name:26} {:6.1} GFLOP/s", time(&mut y, f));
        }
    }
}
