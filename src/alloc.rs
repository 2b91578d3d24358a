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
//! The wheel's server runs inside the user's Python, whose allocator an imported module cannot
//! replace. Its extension module carries jemalloc too and exports the C allocation functions
//! (`crates/pensieve-py/src/alloc.rs`), and the wheel's `pensieve` command starts its
//! interpreter again with that library preloaded: [`allocator_name`] says which allocator a
//! process has, found at run time, and [`release_freed`] purges the preloaded one too. On macOS
//! this module does nothing.

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
    #[cfg(all(not(feature = "embed"), target_os = "linux"))]
    if let Some(purge) = wheel_purge() {
        // SAFETY: the wheel's `pensieve_jemalloc_purge`, `extern "C" fn() -> bool`.
        return unsafe { purge() };
    }
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

/// The libraries of `LD_PRELOAD` (as written there), split into those that bring their own
/// `malloc` (each one's `malloc` is not the C library's) and the others, in order. Both are
/// empty where this process does not allocate with jemalloc.
pub fn preloaded_allocators() -> (Vec<String>, Vec<String>) {
    #[cfg(all(feature = "embed", target_os = "linux"))]
    {
        let Some(preload) = std::env::var_os("LD_PRELOAD") else {
            return Default::default();
        };
        let preload = preload.to_string_lossy().into_owned();
        let Some(system) = malloc_in("libc.so.6") else {
            return Default::default();
        };
        preload
            .split([':', ' '])
            .filter(|lib| !lib.is_empty())
            .map(str::to_string)
            .partition(|lib| malloc_in(lib).is_some_and(|m| m != system))
    }
    #[cfg(not(all(feature = "embed", target_os = "linux")))]
    Default::default()
}

/// The allocator this process uses, for the start-up log: `jemalloc` (the binary's),
/// `jemalloc (preloaded)` (the wheel's, see the module docs), `glibc`, `preloaded from <file>`
/// (another library in `LD_PRELOAD`), or `the system's`.
pub fn allocator_name() -> String {
    if JEMALLOC {
        return "jemalloc".into();
    }
    #[cfg(target_os = "linux")]
    {
        let ours = current_malloc();
        if ours.is_some() && ours == malloc_in("libc.so.6") {
            return "glibc".into();
        }
        if wheel_purge().is_some() {
            return "jemalloc (preloaded)".into();
        }
        if let Some(file) = malloc_file() {
            return format!("preloaded from {file}");
        }
    }
    "the system's".into()
}

/// The address `malloc` resolves to for this process (the first definition in the global
/// lookup order: a preloaded library's before the C library's).
#[cfg(target_os = "linux")]
fn current_malloc() -> Option<usize> {
    // SAFETY: dlsym over the global scope with a NUL-terminated name; nothing is loaded.
    let address = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"malloc".as_ptr()) } as usize;
    (address != 0).then_some(address)
}

/// The file of the loaded object whose `malloc` this process uses (the wheel's extension
/// module checks with it whether it was preloaded as the allocator).
#[cfg(target_os = "linux")]
pub fn malloc_file() -> Option<String> {
    current_malloc().and_then(file_of)
}

/// The address of `malloc` as the already loaded library `lib` defines it.
#[cfg(target_os = "linux")]
fn malloc_in(lib: &str) -> Option<usize> {
    let name = std::ffi::CString::new(lib).ok()?;
    // SAFETY: dlopen with RTLD_NOLOAD only looks up libraries already loaded (it loads nothing
    // and runs no constructor), dlsym reads a symbol's address, dlclose drops the reference
    // taken; the names are NUL-terminated.
    unsafe {
        let handle = libc::dlopen(name.as_ptr(), libc::RTLD_LAZY | libc::RTLD_NOLOAD);
        if handle.is_null() {
            return None;
        }
        let address = libc::dlsym(handle, c"malloc".as_ptr()) as usize;
        libc::dlclose(handle);
        (address != 0).then_some(address)
    }
}

/// The file of the loaded object that holds `address`.
#[cfg(target_os = "linux")]
pub fn file_of(address: usize) -> Option<String> {
    // SAFETY: dladdr fills `info` for an address inside a loaded object; `dli_fname` is then a
    // NUL-terminated string owned by the loader.
    unsafe {
        let mut info: libc::Dl_info = std::mem::zeroed();
        if libc::dladdr(address as *const libc::c_void, &mut info) == 0 || info.dli_fname.is_null() {
            return None;
        }
        Some(std::ffi::CStr::from_ptr(info.dli_fname).to_string_lossy().into_owned())
    }
}

/// The wheel's purge function, when the wheel's library is this process's allocator: its
/// `pensieve_jemalloc_purge`, found in the same file as the `malloc` the process uses (the
/// library may be loaded without being the allocator: imported, or made global for BLAS).
#[cfg(target_os = "linux")]
fn wheel_purge() -> Option<unsafe extern "C" fn() -> bool> {
    // SAFETY: dlsym over the global scope with a NUL-terminated name.
    let purge = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"pensieve_jemalloc_purge".as_ptr()) } as usize;
    if purge == 0 {
        return None;
    }
    if malloc_file()? != file_of(purge)? {
        return None;
    }
    // SAFETY: the wheel's library defines it as `extern "C" fn() -> bool`.
    Some(unsafe { std::mem::transmute::<usize, unsafe extern "C" fn() -> bool>(purge) })
}
