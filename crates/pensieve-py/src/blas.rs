//! The CBLAS entry points MLX calls, forwarded to a BLAS whose symbols carry a prefix.
//!
//! MLX's Linux CPU wheel calls `cblas_sgemm`, `cblas_dgemm` and `cblas_cgemm` (its bundled
//! reference BLAS answers them, ~30 times slower than OpenBLAS). The OpenBLAS that PyPI ships
//! without root, `scipy-openblas32`, names them `scipy_cblas_sgemm` and so on, so loading it
//! changes nothing by itself. This module exports the three unprefixed names and forwards each
//! call to the address [`forward_blas`] was given; `pensieve_bridge.blas` then makes this
//! library global (`RTLD_GLOBAL`) before MLX is imported, so that MLX's calls resolve here.
//! Until then nothing calls these functions. Linux only: on macOS MLX uses Accelerate.

use std::ffi::{c_int, c_void, CStr, CString};
use std::sync::atomic::{AtomicUsize, Ordering};

use pensieve::alloc::file_of;
use pyo3::prelude::*;

static SGEMM: AtomicUsize = AtomicUsize::new(0);
static DGEMM: AtomicUsize = AtomicUsize::new(0);
static CGEMM: AtomicUsize = AtomicUsize::new(0);

/// Sets where the three CBLAS functions go: the addresses of `sgemm`, `dgemm` and `cgemm` with
/// the CBLAS signature and 32-bit integers (scipy-openblas32's `scipy_cblas_*gemm`).
#[pyfunction]
pub fn forward_blas(sgemm: usize, dgemm: usize, cgemm: usize) -> PyResult<()> {
    if sgemm == 0 || dgemm == 0 || cgemm == 0 {
        return Err(pyo3::exceptions::PyValueError::new_err(
            "a BLAS function's address is null",
        ));
    }
    SGEMM.store(sgemm, Ordering::Release);
    DGEMM.store(dgemm, Ordering::Release);
    CGEMM.store(cgemm, Ordering::Release);
    Ok(())
}

fn target(slot: &AtomicUsize, name: &CStr) -> usize {
    match slot.load(Ordering::Acquire) {
        0 => {
            // This library is global without forward_blas having been called: preloaded as the
            // process's allocator (`alloc`), its functions come first for MLX whatever BLAS was
            // chosen. The call goes where it would have gone without this library.
            let address = next_definition(name);
            if address == 0 {
                eprintln!("pensieve: {name:?} was called and no BLAS answers it");
                std::process::abort()
            }
            slot.store(address, Ordering::Release);
            address
        }
        address => address,
    }
}

/// Where `name` is defined when this library's definition is left out: the next definition in
/// the global lookup order (a BLAS loaded with `RTLD_GLOBAL`, as `backend.blas` does), else
/// the first loaded object that defines it, with its dependencies (MLX's library, whose own
/// reference BLAS answers it).
fn next_definition(name: &CStr) -> usize {
    let here = file_of(target as *const () as usize);
    let ours = |address: usize| here.is_some() && file_of(address) == here;
    // SAFETY: dlsym with a NUL-terminated name; RTLD_NEXT searches after this library.
    let next = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) } as usize;
    if next != 0 && !ours(next) {
        return next;
    }
    let mut objects: Vec<CString> = Vec::new();
    unsafe extern "C" fn each(info: *mut libc::dl_phdr_info, _: usize, data: *mut c_void) -> c_int {
        // SAFETY: the loader passes a valid `info` whose name is NUL-terminated (or null), and
        // `data` is the vector below.
        let objects = &mut *(data as *mut Vec<CString>);
        let name = (*info).dlpi_name;
        if !name.is_null() && *name != 0 {
            objects.push(CStr::from_ptr(name).to_owned());
        }
        0
    }
    // SAFETY: the callback only reads `info` and pushes to the vector it is given.
    unsafe { libc::dl_iterate_phdr(Some(each), &mut objects as *mut Vec<CString> as *mut c_void) };
    for object in objects {
        // SAFETY: RTLD_NOLOAD only finds an object already loaded; dlsym on its handle searches
        // it and its dependencies; dlclose drops the reference taken.
        let address = unsafe {
            let handle = libc::dlopen(object.as_ptr(), libc::RTLD_LAZY | libc::RTLD_NOLOAD);
            if handle.is_null() {
                continue;
            }
            let address = libc::dlsym(handle, name.as_ptr()) as usize;
            libc::dlclose(handle);
            address
        };
        if address != 0 && !ours(address) {
            return address;
        }
    }
    0
}

/// Defines `cblas_<name>` with CBLAS's `?gemm` signature, forwarding to the address in `slot`:
/// `$scalar` is the type of `alpha` and `beta`, `$in`/`$out` those of the matrices.
macro_rules! forward_gemm {
    ($name:ident, $cname:literal, $slot:ident, $scalar:ty, $in:ty, $out:ty, $doc:literal) => {
        #[doc = $doc]
        ///
        /// # Safety
        /// The caller's contract is CBLAS's.
        #[no_mangle]
        #[allow(clippy::too_many_arguments)]
        pub unsafe extern "C" fn $name(
            order: c_int,
            trans_a: c_int,
            trans_b: c_int,
            m: c_int,
            n: c_int,
            k: c_int,
            alpha: $scalar,
            a: $in,
            lda: c_int,
            b: $in,
            ldb: c_int,
            beta: $scalar,
            c: $out,
            ldc: c_int,
        ) {
            type Gemm = unsafe extern "C" fn(
                c_int,
                c_int,
                c_int,
                c_int,
                c_int,
                c_int,
                $scalar,
                $in,
                c_int,
                $in,
                c_int,
                $scalar,
                $out,
                c_int,
            );
            let f: Gemm = std::mem::transmute(target(&$slot, $cname));
            f(
                order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc,
            )
        }
    };
}

forward_gemm!(
    cblas_sgemm,
    c"cblas_sgemm",
    SGEMM,
    f32,
    *const f32,
    *mut f32,
    "CBLAS `sgemm`, forwarded."
);
forward_gemm!(
    cblas_dgemm,
    c"cblas_dgemm",
    DGEMM,
    f64,
    *const f64,
    *mut f64,
    "CBLAS `dgemm`, forwarded."
);
forward_gemm!(
    cblas_cgemm,
    c"cblas_cgemm",
    CGEMM,
    *const c_void,
    *const c_void,
    *mut c_void,
    "CBLAS `cgemm` (complex single precision: `alpha` and `beta` point at two floats), forwarded."
);
