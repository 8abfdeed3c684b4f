//! Matrix products on host slices, straight into `gemm` (the crate burn-flex also calls).
//!
//! Two users: the host inference engine (`infer.rs`), which has no tensors at all, and the
//! fused CPU kernels (`fused.rs`), whose matmuls would otherwise go through burn-flex's, which
//! zero-fills every output and then copies it once more to re-align it (cubecl's `Bytes`
//! asks for 16-byte alignment of a `Vec<u8>`), and materialises transposed operands. `gemm`
//! takes any strides, so a transposed operand here is a [`View`] with its strides swapped.

/// A row-major matrix view: `rows × cols` elements of `data`, element `(i, j)` at
/// `i · row_stride + j · col_stride`.
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> View<'a> {
    /// A contiguous `[rows, cols]` matrix.
    pub fn dense(data: &'a [f32], rows: usize, cols: usize) -> Self {
        View {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose, `[cols, rows]`, of the same elements (no copy).
    pub fn t(self) -> Self {
        View {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// Whether every element lies inside `data`.
    fn fits(&self, len: usize) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride < len
    }
}

/// `c = a · b`, or `c += a · b` with `accumulate`, where `c` is `[a.rows, b.cols]` with rows
/// `c_row_stride` apart.
///
/// # Panics
/// If the shapes disagree or a view or `c` reaches outside its slice (a bug in the caller, not
/// input).
pub(crate) fn gemm(c: &mut [f32], c_row_stride: usize, a: View, b: View, accumulate: bool) {
    let (m, n) = (a.rows, b.cols);
    let out = View {
        data: c,
        rows: m,
        cols: n,
        row_stride: c_row_stride,
        col_stride: 1,
    };
    assert!(out.fits(c.len()), "output outside its slice");
    // SAFETY: `out` lies inside `c`, which is borrowed mutably, so it aliases neither input.
    unsafe { gemm_raw(c.as_mut_ptr(), c_row_stride, a, b, accumulate) }
}

/// Width of a weight panel ([`panel_product`]).
pub(crate) const PANEL: usize = 16;

/// `c[.., ..16] = a · panel` (or `+=` with `accumulate`), where `panel: [k, 16]` is row-major
/// and contiguous, `a: [m, k]` dense, `c` rows `c_row_stride` apart: the host engine's weight
/// products, one column panel at a time (`infer.rs`'s `Weight`).
///
/// A decode step multiplies a few rows by every panel once, where `gemm`'s fixed costs per
/// call (dispatch, packing `a`, its microkernel choice for `m` below its 16-row block) are a
/// large share; on x86-64 with AVX2 and FMA this runs a register-blocked kernel of its own
/// instead (6 rows × 16 columns of accumulators, twelve of the sixteen vector registers, the
/// panel row broadcast against each `a` element; 6 rather than 4 rows measured 1.1–1.5× faster
/// here, as each pair of panel loads then feeds twelve multiply-adds instead of eight): each
/// output element is one chain of fused multiply-adds over `k` in order, added
/// to `c` at the end. `gemm` is the reference path and the fallback elsewhere; its kernels
/// order the sum differently, so the two agree to float rounding (tested).
///
/// # Panics
/// If the shapes disagree or an operand reaches outside its slice.
pub(crate) fn panel_product(
    c: &mut [f32],
    c_row_stride: usize,
    a: View,
    panel: &[f32],
    accumulate: bool,
) {
    let (m, k) = (a.rows, a.cols);
    assert_eq!(panel.len(), k * PANEL, "panel is not [k, {PANEL}]");
    let b = View::dense(panel, k, PANEL);
    #[cfg(target_arch = "x86_64")]
    if a.col_stride == 1
        && k > 0
        && std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
    {
        let out = View {
            data: c,
            rows: m,
            cols: PANEL,
            row_stride: c_row_stride,
            col_stride: 1,
        };
        assert!(
            out.fits(c.len()) && a.fits(a.data.len()),
            "operand outside its slice"
        );
        // SAFETY: the CPU has AVX2 and FMA (checked above); the asserts keep every access of
        // the kernel inside `c`, `a` and `panel`; `c` is borrowed mutably, so it aliases neither.
        unsafe {
            panel_avx2::rows(
                c.as_mut_ptr(),
                c_row_stride,
                a.data.as_ptr(),
                a.row_stride,
                m,
                panel.as_ptr(),
                k,
                accumulate,
            )
        };
        return;
    }
    gemm(c, c_row_stride, a, b, accumulate);
}

/// The `PANEL`-wide product kernel for AVX2 + FMA ([`panel_product`]).
#[cfg(target_arch = "x86_64")]
mod panel_avx2 {
    use super::PANEL;
    use std::arch::x86_64::*;

    /// `c[i, ..16] (+)= Σ_k a[i, k] · p[k, ..16]` for `i < m`.
    ///
    /// # Safety
    /// AVX2 and FMA must be available; `c` valid for `m` rows of 16 floats `ldc` apart (read
    /// too with `accumulate`), `a` for `m` rows of `k` floats `lda` apart, `p` for `k · 16`
    /// floats; `c` overlapping neither.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn rows(
        c: *mut f32,
        ldc: usize,
        a: *const f32,
        lda: usize,
        m: usize,
        p: *const f32,
        k: usize,
        accumulate: bool,
    ) {
        let mut i = 0;
        while i < m {
            let r = block_rows(m - i);
            // SAFETY: rows `i .. i + r` lie inside the `m` rows of the contract.
            unsafe {
                let (c, a) = (c.add(i * ldc), a.add(i * lda));
                match r {
                    6 => block::<6>(c, ldc, a, lda, p, k, accumulate),
                    5 => block::<5>(c, ldc, a, lda, p, k, accumulate),
                    4 => block::<4>(c, ldc, a, lda, p, k, accumulate),
                    3 => block::<3>(c, ldc, a, lda, p, k, accumulate),
                    2 => block::<2>(c, ldc, a, lda, p, k, accumulate),
                    _ => block::<1>(c, ldc, a, lda, p, k, accumulate),
                }
            }
            i += r;
        }
    }

    /// Rows of the next block when `left` rows remain: blocks of 6 until 7–10 rows are left,
    /// which go as two blocks of 4 or 5. A block of one to three rows has two to six
    /// accumulator chains, fewer than the eight that keep both FMA pipes busy through a
    /// multiply-add's latency, so it costs about as much per `k` as a block of four: 8 rows run
    /// as 4 + 4 rather than 6 + 2, 7 as 4 + 3 rather than 6 + 1. A decode step's experts see
    /// a handful of rows each. Measured on 16 panels of `k` = 256 (best of 200 interleaved
    /// runs, 2026-12-02): 8 rows 0.84× the time of 6 + 2, 7 rows 0.83× of 6 + 1, 13 rows
    /// 0.90× of 6 + 6 + 1, 32 rows 0.95× of 6·5 + 2; 5 + 5 ties 6 + 4. The blocks do not change
    /// any element's sum (one chain over `k` per element), so neither do the results.
    pub(super) fn block_rows(left: usize) -> usize {
        match left {
            0..=6 => left,
            7 | 8 => 4,
            9 | 10 => 5,
            _ => 6,
        }
    }

    /// `R` rows of [`rows`], their accumulators held in registers across `k`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn block<const R: usize>(
        c: *mut f32,
        ldc: usize,
        a: *const f32,
        lda: usize,
        p: *const f32,
        k: usize,
        accumulate: bool,
    ) {
        const { assert!(PANEL == 16) };
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for kk in 0..k {
            // SAFETY: `kk < k`, inside `p`'s `k` rows of 16 and `a`'s `k` columns.
            let (p0, p1) = unsafe {
                (
                    _mm256_loadu_ps(p.add(kk * 16)),
                    _mm256_loadu_ps(p.add(kk * 16 + 8)),
                )
            };
            for (r, acc) in acc.iter_mut().enumerate() {
                let x = _mm256_set1_ps(unsafe { *a.add(r * lda + kk) });
                acc[0] = _mm256_fmadd_ps(x, p0, acc[0]);
                acc[1] = _mm256_fmadd_ps(x, p1, acc[1]);
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            // SAFETY: row `r < R` of `c`, 16 floats.
            unsafe {
                let cr = c.add(r * ldc);
                let (mut lo, mut hi) = (acc[0], acc[1]);
                if accumulate {
                    lo = _mm256_add_ps(_mm256_loadu_ps(cr), lo);
                    hi = _mm256_add_ps(_mm256_loadu_ps(cr.add(8)), hi);
                }
                _mm256_storeu_ps(cr, lo);
                _mm256_storeu_ps(cr.add(8), hi);
            }
        }
    }
}

/// `a · b` as a new contiguous `[a.rows, b.cols]` buffer, written once by gemm: no zero-fill.
pub(crate) fn product(a: View, b: View) -> Vec<f32> {
    let (m, n) = (a.rows, b.cols);
    let mut c: Vec<f32> = Vec::with_capacity(m * n);
    // SAFETY: `c` has room for the `m × n` contiguous output and is not yet shared; gemm
    // writes every one of those elements without reading them (`accumulate` false, and k = 0
    // fills with zeros), after which they are initialised and the length can cover them.
    unsafe {
        gemm_raw(c.as_mut_ptr(), n, a, b, false);
        c.set_len(m * n);
    }
    c
}

/// Seconds of each of `reps` square `[n, n] × [n, n]` f32 products straight through `gemm`
/// (after one warm-up), split by rows over `threads` threads with one single-threaded `gemm`
/// call each, as the replicas run the fused kernels: the ceiling `sobre bench step`'s GFLOP/s
/// are read against.
pub fn square_gemm_seconds(n: usize, reps: usize, threads: usize) -> Vec<f64> {
    let a: Vec<f32> = (0..n * n)
        .map(|i| ((i % 2001) as f32) * 1e-3 - 1.0)
        .collect();
    let b: Vec<f32> = (0..n * n)
        .map(|i| ((i % 1999) as f32) * 1e-3 - 1.0)
        .collect();
    let mut c = vec![0f32; n * n];
    let rows = n.div_ceil(threads.max(1)).max(1);
    let mut times = vec![];
    for _ in 0..reps + 1 {
        let t = std::time::Instant::now();
        std::thread::scope(|s| {
            for (i, out) in c.chunks_mut(rows * n).enumerate() {
                let (a, b) = (&a, &b);
                s.spawn(move || {
                    let m = out.len() / n;
                    let a = View::dense(&a[i * rows * n..(i * rows + m) * n], m, n);
                    gemm(out, n, a, View::dense(b, n, n), false);
                });
            }
        });
        times.push(t.elapsed().as_secs_f64());
    }
    times.split_off(1)
}

/// # Safety
/// `c` must be valid for writes (and, with `accumulate`, reads) of the `[a.rows, b.cols]`
/// matrix with rows `c_row_stride` apart, and must not overlap `a` or `b`.
unsafe fn gemm_raw(c: *mut f32, c_row_stride: usize, a: View, b: View, accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "inner dimensions differ");
    assert!(a.fits(a.data.len()) && b.fits(b.data.len()));
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for row in 0..m {
                // SAFETY: row `row` of the output, inside it by the caller's contract.
                unsafe { std::ptr::write_bytes(c.add(row * c_row_stride), 0, n) };
            }
        }
        return;
    }
    // SAFETY: the asserts above keep every element gemm reads inside `a` and `b`; the
    // caller's contract covers `c`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            c_row_stride as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Deterministic test values in `[-1, 1]`, different for each `salt`.
    pub(crate) fn values(n: usize, salt: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 + salt * 104_729) % 2001) as f32 * 1e-3 - 1.0)
            .collect()
    }

    /// The panel kernel's row blocks cover every row once, in blocks of one to six rows, and
    /// only a matrix of fewer than three rows gets a block of fewer than three.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn row_blocks_cover_every_row_without_small_tails() {
        let blocks = |m: usize| {
            let mut v: Vec<usize> = vec![];
            while v.iter().sum::<usize>() < m {
                v.push(panel_avx2::block_rows(m - v.iter().sum::<usize>()));
            }
            v
        };
        for m in 1..=200 {
            let b = blocks(m);
            assert_eq!(b.iter().sum::<usize>(), m, "m = {m}: {b:?}");
            assert!(b.iter().all(|r| (1..=6).contains(r)), "m = {m}: {b:?}");
            if m >= 3 {
                assert!(b.iter().all(|&r| r >= 3), "m = {m}: {b:?}");
            }
        }
        assert_eq!(blocks(8), [4, 4]);
        assert_eq!(blocks(13), [6, 4, 3]);
        assert_eq!(blocks(32), [6, 6, 6, 6, 4, 4]);
    }

    /// The panel kernel against gemm (the reference path) on every row remainder of its 6-row
    /// blocks, inner sizes from 1 to a weight's 256, a strided input and output, with and
    /// without accumulation. Relative 1e-6 of the row's magnitude: the same products, summed in
    /// another order (measured 4e-7).
    #[test]
    fn panel_product_agrees_with_gemm() {
        let mut worst = 0.0f32;
        for m in [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 16, 32, 64] {
            for k in [1, 7, 128, 256] {
                for accumulate in [false, true] {
                    let (lda, ldc) = (k + 3, PANEL + 5);
                    let a = values(m * lda, m + k);
                    let panel = values(k * PANEL, 2 * k + 1);
                    let a = View {
                        data: &a,
                        rows: m,
                        cols: k,
                        row_stride: lda,
                        col_stride: 1,
                    };
                    let start = values(m * ldc, 3);
                    let (mut want, mut got) = (start.clone(), start.clone());
                    gemm(&mut want, ldc, a, View::dense(&panel, k, PANEL), accumulate);
                    panel_product(&mut got, ldc, a, &panel, accumulate);
                    for (i, (w, g)) in want.chunks(ldc).zip(got.chunks(ldc)).enumerate() {
                        let scale = w.iter().fold(1.0f32, |s, x| s.max(x.abs()));
                        for j in 0..ldc {
                            if j >= PANEL {
                                assert_eq!(
                                    g[j],
                                    start[i * ldc + j],
                                    "column {j} outside the panel written"
                                );
                            }
                            worst = worst.max((w[j] - g[j]).abs() / scale);
                        }
                    }
                }
            }
        }
        assert!(worst <= 1e-6, "panel kernel vs gemm: {worst:e}");
    }
}
