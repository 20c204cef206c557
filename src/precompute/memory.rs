//! The allocator settings stage one wants on the CPU: set by `precompute` itself, before its
//! first chunk of logits, never by other commands.

/// Stage one on the CPU: freed buffers stay with the process for the next chunk. By default
/// glibc maps each buffer above its mmap threshold (32 MiB at most) afresh and unmaps it when
/// freed, so every chunk of logits is page-faulted in anew (BENCHMARKS.md, "CPU page faults").
/// Large buffers come from the heap instead (`M_MMAP_MAX` 0), and the heap is not trimmed.
/// Its chunks of logits are then 8× larger ([`crate::logprobs`]). Training keeps glibc's
/// defaults and the small chunks: its peak memory matters more than this time there.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn keep_cpu_memory() {
    // SAFETY: `mallopt` only sets two of glibc's allocator parameters (it takes the allocator's
    // own lock); no memory is touched.
    let kept = unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
    };
    if kept {
        crate::logprobs::heap_kept();
    }
}
