//! Allocator settings for the process (docs/PERF.md item 8).
//!
//! An eager tensor program frees and reallocates blocks of megabytes on every op. glibc's
//! defaults hand such memory back to the kernel (`munmap` of large blocks, trimming of the
//! heap's top, deletion of a thread arena's heap once it is empty) and fault it in again, page
//! by page, on the next op; with two or more threads every unmap also costs a TLB shootdown on
//! the other cores. On the W1 benchmark with two replicas that was ~14% of the profile and
//! 1.1 million page faults in 10 steps; with these settings 0.2 million, which is the first
//! touch of the peak working set, and peak RSS is unchanged.

/// Three glibc `mallopt` settings:
/// - `M_MMAP_THRESHOLD` 32 MiB (glibc's ceiling on 64-bit): blocks up to 32 MiB come from the
///   heap instead of their own `mmap`. Set explicitly, it also turns off the dynamic threshold,
///   which starts at 128 KiB and learns the block sizes only by first paying for them.
/// - `M_TRIM_THRESHOLD` 1 GiB: the main heap's top goes back to the kernel only when more than
///   that is free.
/// - `M_TOP_PAD` 64 MiB: the replicas' threads allocate from their own arenas, whose 64 MiB heaps
///   glibc unmaps as soon as one is empty — at the end of every forward/backward — unless the
///   arena keeps this much slack. (It is also the extra each heap grows by, which costs address
///   space, not memory: untouched pages are not resident.)
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn tune() {
    // SAFETY: `mallopt` changes allocator parameters only; it is called first thing in `main`,
    // before any other thread exists. A rejected value leaves glibc's default, which is only
    // slower, so the return values are not errors worth stopping for.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

/// Other platforms keep their allocator's defaults.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn tune() {}
