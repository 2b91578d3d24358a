//! Makes the binary find the same libpython that PyO3 was built against.
//!
//! PyO3 links `libpython3.x.so` from the interpreter named by `PYO3_PYTHON` (the project's
//! `.venv`), but at run time the dynamic loader searches the system paths first, where another
//! Python of the same version may live. An rpath to that interpreter's `LIBDIR` makes the
//! choice explicit instead of an accident of the machine.
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=PYO3_PYTHON");
    let python = std::env::var("PYO3_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let out = Command::new(&python)
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_config_var('LIBDIR') or '')",
        ])
        .output();
    match out {
        Ok(out) if out.status.success() => {
            let libdir = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            if !libdir.is_empty() {
                println!("cargo:rustc-link-arg=-Wl,-rpath,{libdir}");
                println!("cargo:rustc-env=PENSIEVE_PYTHON_LIBDIR={libdir}");
            }
        }
        _ => println!("cargo:warning=could not ask {python} for its LIBDIR; no rpath set"),
    }
}
