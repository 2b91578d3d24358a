//! The `pensieve` binary's memory allocator on Linux: jemalloc, for the whole process.
//!
//! The binary exports jemalloc's `malloc` and `free` (tikv-jemallocator's unprefixed build), so
//! every allocation in the process goes there: Rust's, but also the embedded Python's and MLX's
//! (an `mx.array`'s buffer is a `malloc`). glibc's allocator was the batch thread's largest cost
//! after MLX itself: ~22% of its samples (`_int_malloc`, `malloc_consolidate`, `unlink_chunk`:
//! each decoding step allocates and frees Python objects and MLX buffers of every size, from a
//! thread that is not the main one, while MLX's stream thread frees what it allocated). One
//! stream of the demo model over HTTP went from ~1,100 to ~1,500 tokens/s with jemalloc
//! (`benches/single_stream.py`; BENCHMARKS.md).
//!
//! jemalloc keeps freed pages for reuse; [`MALLOC_CONF`] has a background thread give them back
//! to the system after a second (`dirty_decay_ms`), without `MADV_FREE` (`muzzy_decay_ms:0`),
//! so that the memory probe sees memory that was freed as free. [`release_freed`] gives them
//! back at once, after a model is unloaded. `MALLOC_CONF` in the environment adds to these.
//!
//! An allocator preloaded with `LD_PRELOAD` (jemalloc's or tcmalloc's library, as some set for
//! machine-learning tools) would be a second one in the process: the binary's exports win for
//! `malloc` and `free`, the preloaded library's for C++'s `new` and `delete` and the rest, and
//! memory from one freed by the other crashed the server while it loaded its model. At start-up
//! [`preloaded_allocators`] finds such libraries, and the binary starts itself again without
//! them (`main.rs`), saying so.
//!
//! The wheel's extension module runs inside the user's Python, whose allocator it cannot
//! replace: there, and on macOS, this module does nothing.

/// jemalloc's options, read before `main` (the `malloc_conf` symbol).
#[cfg(all(feature = "embed", target_os = "linux"))]
pub const MALLOC_CONF: &[u8] =
    b"background_thread:true,max_background_threads:1,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

/// Whether this process allocates with jemalloc (the `pensieve` binary on Linux).
pub const JEMALLOC: bool = cfg!(all(feature = "embed", target_os = "linux"));

/// Gives the pages jemalloc keeps for reuse back to the system now (after an unload: the
/// model's memory was freed, and the system should see it free without waiting for the
/// background thread). Returns whether it did.
pub fn release_freed() -> bool {
    #[cfg(all(feature = "embed", target_os = "linux"))]
    {
        // "arena.<MALLCTL_ARENAS_ALL>.purge": every arena's unused dirty pages.
        let name = c"arena.4096.purge";
        // SAFETY: a void mallctl (no old or new value) with a NUL-terminated name.
        let r = unsafe {
            tikv_jemalloc_sys::mallctl(
                name.as_ptr(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                0,
            )
        };
        r == 0
    }
    #[cfg(not(all(feature = "embed", target_os = "linux")))]
    false
}

/// The libraries of `LD_PRELOAD` (as written there) that bring their own `malloc`: each one's
/// `malloc` is not the C library's. Empty where this process does not allocate with jemalloc.
pub fn preloaded_allocators() -> Vec<String> {
    #[cfg(all(feature = "embed", target_os = "linux"))]
    {
        use std::ffi::CString;
        let Some(preload) = std::env::var_os("LD_PRELOAD") else {
            return Vec::new();
        };
        let preload = preload.to_string_lossy().into_owned();
        // SAFETY: dlopen with RTLD_NOLOAD only looks up libraries already loaded (it loads
        // nothing and runs no constructor), dlsym reads a symbol's address, dlclose drops the
        // reference taken; the names are NUL-terminated.
        let malloc_of = |lib: &str| -> Option<usize> {
            let name = CString::new(lib).ok()?;
            unsafe {
                let handle = libc::dlopen(name.as_ptr(), libc::RTLD_LAZY | libc::RTLD_NOLOAD);
                if handle.is_null() {
                    return None;
                }
                let address = libc::dlsym(handle, c"malloc".as_ptr()) as usize;
                libc::dlclose(handle);
                (address != 0).then_some(address)
            }
        };
        let Some(system) = malloc_of("libc.so.6") else {
            return Vec::new();
        };
        preload
            .split([':', ' '])
            .filter(|lib| !lib.is_empty())
            .filter(|lib| malloc_of(lib).is_some_and(|m| m != system))
            .map(str::to_string)
            .collect()
    }
    #[cfg(not(all(feature = "embed", target_os = "linux")))]
    Vec::new()
}

/// The allocator this process uses, for the start-up log.
pub fn allocator_name() -> &'static str {
    if JEMALLOC {
        "jemalloc"
    } else {
        "the system's"
    }
}
