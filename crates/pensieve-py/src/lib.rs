//! pensieve as a Python extension module, `pensieve_bridge._pensieve`: what the wheel's
//! `pensieve` command (`pensieve_bridge.cli`) calls with its arguments.
//!
//! The server runs inside the interpreter the wheel was installed into (its packages are the
//! environment's; nothing of the build machine's paths is compiled in), with the GIL released:
//! the backend thread takes it when it calls into the bridge, as it does in the binary.

use std::ffi::OsString;

use pyo3::prelude::*;

#[cfg(all(target_os = "linux", target_env = "gnu", target_arch = "x86_64"))]
mod alloc;
#[cfg(target_os = "linux")]
mod blas;

// jemalloc's static library, which `alloc` calls by its prefixed names.
#[cfg(all(target_os = "linux", target_env = "gnu", target_arch = "x86_64"))]
use tikv_jemalloc_sys as _;

/// Runs the `pensieve` command line (`argv[0]` is the program's name); returns its exit status.
#[pyfunction]
fn main(py: Python<'_>, argv: Vec<OsString>) -> PyResult<u8> {
    #[cfg(all(target_os = "linux", target_env = "gnu", target_arch = "x86_64"))]
    alloc::start();
    let prefix: OsString = py.import("sys")?.getattr("prefix")?.extract()?;
    pensieve::config::paths::run_inside_python(prefix.into());
    Ok(py.detach(move || pensieve::cli::run(argv)))
}

#[pymodule]
fn _pensieve(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(main, m)?)?;
    #[cfg(target_os = "linux")]
    m.add_function(wrap_pyfunction!(blas::forward_blas, m)?)?;
    Ok(())
}
