//! jemalloc for the wheel's server, when this library is preloaded.
//!
//! The `pensieve` binary links jemalloc and exports its `malloc`, so that Python's and MLX's
//! allocations go there too (`pensieve::alloc`; one stream of the demo model went from ~1,100 to
//! ~1,500 tokens/s). A Python extension module cannot do that by being imported: by then the
//! interpreter and its libraries are bound to the C library's `malloc`. So this library carries
//! jemalloc (tikv-jemalloc-sys, prefixed: its own symbols are `_rjem_*` and stay inside) and
//! exports the C allocation functions as calls into it; the wheel's `pensieve` command
//! (`pensieve_bridge.cli`) starts its interpreter again with this library in `LD_PRELOAD`, ahead
//! of the C library, so that every allocation of the process comes here from the start.
//!
//! Imported without the preload (`import pensieve_bridge._pensieve` in someone's program), the
//! process's `malloc` stays the C library's: the functions below are found only by a lookup that
//! starts here, and the C library comes first in every other. Then nothing calls them, and
//! memory from one allocator never reaches the other.
//!
//! Options are the binary's: freed pages go back to the system after a second
//! (`dirty_decay_ms`), so that the memory probe sees them free, given back by one background
//! thread, and [`pensieve_jemalloc_purge`] gives them back at once after a model is unloaded.
//! jemalloc starts when the library is loaded, preloaded or imported; its background thread is
//! started by [`start`], only in a process whose allocator it is.

use std::ffi::{c_char, c_int, c_void};

/// jemalloc's options, the binary's (`pensieve::alloc::MALLOC_CONF`) but the background thread,
/// read when the library is loaded.
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: Option<&'static c_char> = Some(unsafe {
    // SAFETY: the literal is static and NUL-terminated.
    &*c"max_background_threads:1,dirty_decay_ms:1000,muzzy_decay_ms:0".as_ptr()
});

// jemalloc's own entry points, by their prefixed names: a build that unprefixed them (feature
// unification with the binary's) fails to link here rather than calling itself.
extern "C" {
    #[link_name = "_rjem_malloc"]
    fn je_malloc(size: usize) -> *mut c_void;
    #[link_name = "_rjem_calloc"]
    fn je_calloc(number: usize, size: usize) -> *mut c_void;
    #[link_name = "_rjem_realloc"]
    fn je_realloc(ptr: *mut c_void, size: usize) -> *mut c_void;
    #[link_name = "_rjem_free"]
    fn je_free(ptr: *mut c_void);
    #[link_name = "_rjem_posix_memalign"]
    fn je_posix_memalign(ptr: *mut *mut c_void, alignment: usize, size: usize) -> c_int;
    #[link_name = "_rjem_aligned_alloc"]
    fn je_aligned_alloc(alignment: usize, size: usize) -> *mut c_void;
    #[link_name = "_rjem_memalign"]
    fn je_memalign(alignment: usize, size: usize) -> *mut c_void;
    #[link_name = "_rjem_valloc"]
    fn je_valloc(size: usize) -> *mut c_void;
    #[link_name = "_rjem_malloc_usable_size"]
    fn je_malloc_usable_size(ptr: *const c_void) -> usize;
    #[link_name = "_rjem_mallctl"]
    fn je_mallctl(
        name: *const c_char,
        oldp: *mut c_void,
        oldlenp: *mut usize,
        newp: *mut c_void,
        newlen: usize,
    ) -> c_int;
}

/// C's `malloc`, from jemalloc.
///
/// # Safety
/// C's contract.
#[no_mangle]
pub unsafe extern "C" fn malloc(size: usize) -> *mut c_void {
    je_malloc(size)
}

/// C's `calloc`, from jemalloc.
///
/// # Safety
/// C's contract.
#[no_mangle]
pub unsafe extern "C" fn calloc(number: usize, size: usize) -> *mut c_void {
    je_calloc(number, size)
}

/// C's `realloc`, from jemalloc.
///
/// # Safety
/// C's contract: `ptr` is null or came from these functions.
#[no_mangle]
pub unsafe extern "C" fn realloc(ptr: *mut c_void, size: usize) -> *mut c_void {
    je_realloc(ptr, size)
}

/// C's `free`, from jemalloc.
///
/// # Safety
/// C's contract: `ptr` is null or came from these functions.
#[no_mangle]
pub unsafe extern "C" fn free(ptr: *mut c_void) {
    je_free(ptr)
}

/// POSIX's `posix_memalign`, from jemalloc.
///
/// # Safety
/// POSIX's contract.
#[no_mangle]
pub unsafe extern "C" fn posix_memalign(ptr: *mut *mut c_void, alignment: usize, size: usize) -> c_int {
    je_posix_memalign(ptr, alignment, size)
}

/// C's `aligned_alloc`, from jemalloc.
///
/// # Safety
/// C's contract.
#[no_mangle]
pub unsafe extern "C" fn aligned_alloc(alignment: usize, size: usize) -> *mut c_void {
    je_aligned_alloc(alignment, size)
}

/// glibc's `memalign`, from jemalloc.
///
/// # Safety
/// glibc's contract.
#[no_mangle]
pub unsafe extern "C" fn memalign(alignment: usize, size: usize) -> *mut c_void {
    je_memalign(alignment, size)
}

/// `valloc`, from jemalloc.
///
/// # Safety
/// glibc's contract.
#[no_mangle]
pub unsafe extern "C" fn valloc(size: usize) -> *mut c_void {
    je_valloc(size)
}

/// glibc's `pvalloc` (`valloc` of the size rounded up to whole pages), from jemalloc.
///
/// # Safety
/// glibc's contract.
#[no_mangle]
pub unsafe extern "C" fn pvalloc(size: usize) -> *mut c_void {
    let page = match libc::sysconf(libc::_SC_PAGESIZE) {
        p if p > 0 => p as usize,
        _ => 4096,
    };
    match size.checked_next_multiple_of(page) {
        Some(rounded) => je_memalign(page, rounded.max(page)),
        None => std::ptr::null_mut(),
    }
}

/// glibc's `malloc_usable_size`, from jemalloc.
///
/// # Safety
/// glibc's contract: `ptr` is null or came from these functions.
#[no_mangle]
pub unsafe extern "C" fn malloc_usable_size(ptr: *const c_void) -> usize {
    if ptr.is_null() {
        0
    } else {
        je_malloc_usable_size(ptr)
    }
}

/// Gives the pages jemalloc keeps for reuse back to the system now; returns whether it did.
/// The server looks this function up (`pensieve::alloc::release_freed`) after an unload: it
/// finds it only when this library is the process's allocator.
#[no_mangle]
pub extern "C" fn pensieve_jemalloc_purge() -> bool {
    // "arena.<MALLCTL_ARENAS_ALL>.purge": every arena's unused dirty pages.
    // SAFETY: a void mallctl (no old or new value) with a NUL-terminated name.
    unsafe {
        je_mallctl(
            c"arena.4096.purge".as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        ) == 0
    }
}

/// Whether this library's `malloc` is the process's (preloaded): then jemalloc's background
/// thread is started, which gives freed pages back to the system while the server idles.
pub fn start() -> bool {
    // By file: `malloc`'s address taken here would be the global one too, whichever it is.
    let here = pensieve::alloc::file_of(start as *const () as usize);
    if here.is_none() || pensieve::alloc::malloc_file() != here {
        return false;
    }
    let mut on = true;
    // SAFETY: "background_thread" takes a bool; the new value's size is given.
    unsafe {
        je_mallctl(
            c"background_thread".as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            &mut on as *mut bool as *mut c_void,
            std::mem::size_of::<bool>(),
        );
    }
    true
}
