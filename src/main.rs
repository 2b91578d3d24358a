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
    #[cfg(target_os = "linux")]
    without_preloaded_allocators();
    std::process::ExitCode::from(pensieve::cli::run(std::env::args_os()))
}

/// Starts this binary again without the `LD_PRELOAD` libraries that bring an allocator of
/// their own: two allocators in one process crash it ([`pensieve::alloc`]).
#[cfg(target_os = "linux")]
fn without_preloaded_allocators() {
    use std::os::unix::process::CommandExt;
    let (dropped, kept) = pensieve::alloc::preloaded_allocators();
    if dropped.is_empty() {
        return;
    }
    eprintln!(
        "pensieve: LD_PRELOAD brings another memory allocator ({}); pensieve has jemalloc built in, \
         and two allocators in one process crash it: starting again without {}",
        dropped.join(", "),
        if dropped.len() == 1 { "it" } else { "them" }
    );
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_default();
    let exe = std::env::current_exe().unwrap_or_else(|_| "/proc/self/exe".into());
    let mut again = std::process::Command::new(exe);
    again.arg0(arg0).args(args);
    if kept.is_empty() {
        again.env_remove("LD_PRELOAD");
    } else {
        again.env("LD_PRELOAD", kept.join(":"));
    }
    let e = again.exec();
    eprintln!("pensieve: could not start again without LD_PRELOAD's allocator: {e}");
    std::process::exit(1);
}
