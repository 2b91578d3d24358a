//! The CBLAS entry points MLX calls, forwarded to a BLAS whose symbols carry a prefix.
//!
//! MLX's Linux CPU wheel calls `cblas_sgemm`, `cblas_dgemm` and `cblas_cgemm` (its bundled
//! reference BLAS answers them, ~30 times slower than OpenBLAS). The OpenBLAS that PyPI ships
//! without root, `scipy-openblas32`, names them `scipy_cblas_sgemm` and so on, so loading it
//! changes nothing by itself. This module exports the three unprefixed names and forwards each
//! call to the address [`forward_blas`] was given; `pensieve_bridge.blas` then makes this
//! library global (`RTLD_GLOBAL`) before MLX is imported, so that MLX's calls resolve here.
//! Until then nothing calls these functions.

use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicUsize, Ordering};

use pyo3::prelude::*;

static SGEMM: AtomicUsize = AtomicUsize::new(0);
static DGEMM: AtomicUsize = AtomicUsize::new(0);
static CGEMM: AtomicUsize = AtomicUsize::new(0);

type Sgemm = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    f32,
    *const f32,
    c_int,
    *const f32,
    c_int,
    f32,
    *mut f32,
    c_int,
);
type Dgemm = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    f64,
    *const f64,
    c_int,
    *const f64,
    c_int,
    f64,
    *mut f64,
    c_int,
);
type Cgemm = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    *const c_void,
    *const c_void,
    c_int,
    *const c_void,
    c_int,
    *const c_void,
    *mut c_void,
    c_int,
);

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

fn target(slot: &AtomicUsize, name: &str) -> usize {
    match slot.load(Ordering::Acquire) {
        0 => {
            // Only reachable if something made this library global without forward_blas.
            eprintln!("pensieve: {name} was called before a BLAS was set to answer it");
            std::process::abort()
        }
        address => address,
    }
}

/// CBLAS `sgemm`, forwarded.
///
/// # Safety
/// The caller's contract is CBLAS's.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn cblas_sgemm(
    order: c_int,
    trans_a: c_int,
    trans_b: c_int,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: f32,
    a: *const f32,
    lda: c_int,
    b: *const f32,
    ldb: c_int,
    beta: f32,
    c: *mut f32,
    ldc: c_int,
) {
    let f: Sgemm = std::mem::transmute(target(&SGEMM, "cblas_sgemm"));
    f(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
}

/// CBLAS `dgemm`, forwarded.
///
/// # Safety
/// The caller's contract is CBLAS's.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn cblas_dgemm(
    order: c_int,
    trans_a: c_int,
    trans_b: c_int,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: f64,
    a: *const f64,
    lda: c_int,
    b: *const f64,
    ldb: c_int,
    beta: f64,
    c: *mut f64,
    ldc: c_int,
) {
    let f: Dgemm = std::mem::transmute(target(&DGEMM, "cblas_dgemm"));
    f(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
}

/// CBLAS `cgemm` (complex single precision: `alpha` and `beta` point at two floats), forwarded.
///
/// # Safety
/// The caller's contract is CBLAS's.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn cblas_cgemm(
    order: c_int,
    trans_a: c_int,
    trans_b: c_int,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: *const c_void,
    a: *const c_void,
    lda: c_int,
    b: *const c_void,
    ldb: c_int,
    beta: *const c_void,
    c: *mut c_void,
    ldc: c_int,
) {
    let f: Cgemm = std::mem::transmute(target(&CGEMM, "cblas_cgemm"));
    f(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
}
