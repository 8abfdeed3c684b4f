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
