//! The `pensieve` binary: the command line of [`pensieve::cli`].

/// jemalloc for the whole process on Linux, the embedded Python and MLX included
/// ([`pensieve::alloc`]).
#[cfg(target_os = "linux")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options ([`pensieve::alloc::MALLOC_CONF`]), read before `main`.
#[cfg(target_os = "linux")]
#[allow(non_upper_case_globals)]
#[no_mangle]
pub static malloc_conf: Option<&'static std::ffi::c_char> = Some(unsafe {
    // SAFETY: a `u8` and a `c_char` have the same layout; the string is NUL-terminated.
    &*(pensieve::alloc::MALLOC_CONF.as_ptr() as *const std::ffi::c_char)
});

fn main() -> std::process::ExitCode {
    std::process::ExitCode::from(pensieve::cli::run(std::env::args_os()))
}
