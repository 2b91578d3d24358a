//! Where things are on the user's machine, resolved at run time: nothing here is a path of the
//! machine the binary was built on.
//!
//! - State: one folder per kind under [`state_dir`] (`$PENSIEVE_CACHE_DIR`, else
//!   `$XDG_CACHE_HOME/pensieve`, else `~/.cache/pensieve`): `models/` (the demo model) and
//!   `prompt-cache/` (the prompt cache's disk tier). The bridge is told this folder at start-up.
//! - The Python environment holding mlx and mlx-lm ([`find_python`]): the interpreter pensieve
//!   runs inside (the wheel's `pensieve` command), else `backend.python` when set, else
//!   `$PENSIEVE_PYTHON`, else `$VIRTUAL_ENV`, else `.venv` in the working directory.
//! - The configuration file ([`config_file`]): `--config`, else `$PENSIEVE_CONFIG`, else
//!   `$XDG_CONFIG_HOME/pensieve/pensieve.toml` (`~/.config/pensieve/pensieve.toml`), else none.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

fn var(name: &str) -> Option<PathBuf> {
    std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from)
}

/// The configuration file to read, and why that one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigFile {
    /// The file; `None` when there is none (defaults, the environment and flags only).
    pub path: Option<PathBuf>,
    /// Where it was named: `--config`, `PENSIEVE_CONFIG`, the user's configuration folder, or
    /// nothing found.
    pub from: &'static str,
    /// Named explicitly (`--config`, `PENSIEVE_CONFIG`): it must exist.
    pub required: bool,
}

/// The configuration file: `flag` (`--config`), else `$PENSIEVE_CONFIG`, else
/// `$XDG_CONFIG_HOME/pensieve/pensieve.toml` (`~/.config/pensieve/pensieve.toml`) when it exists.
pub fn config_file(flag: Option<&Path>) -> ConfigFile {
    if let Some(path) = flag {
        return ConfigFile {
            path: Some(path.to_owned()),
            from: "--config",
            required: true,
        };
    }
    if let Some(path) = var("PENSIEVE_CONFIG") {
        return ConfigFile {
            path: Some(path),
            from: "PENSIEVE_CONFIG",
            required: true,
        };
    }
    let user = var("XDG_CONFIG_HOME")
        .or_else(|| var("HOME").map(|home| home.join(".config")))
        .map(|dir| dir.join("pensieve").join("pensieve.toml"));
    match user {
        Some(path) if path.is_file() => ConfigFile {
            path: Some(path),
            from: "the user's configuration folder",
            required: false,
        },
        _ => ConfigFile {
            path: None,
            from: "none found: defaults",
            required: false,
        },
    }
}

/// The folder all of pensieve's state lives under.
pub fn state_dir() -> PathBuf {
    if let Some(dir) = var("PENSIEVE_CACHE_DIR") {
        return dir;
    }
    if let Some(dir) = var("XDG_CACHE_HOME") {
        return dir.join("pensieve");
    }
    var("HOME")
        .unwrap_or_else(|| PathBuf::from("."))
        .join(".cache")
        .join("pensieve")
}

/// Built models (the demo model): `<state>/models`.
pub fn models_dir() -> PathBuf {
    state_dir().join("models")
}

/// The prompt cache's disk tier: `<state>/prompt-cache`, unless `backend.prompt_cache_dir`.
pub fn prompt_cache_dir(configured: &str) -> PathBuf {
    if configured.is_empty() {
        state_dir().join("prompt-cache")
    } else {
        PathBuf::from(configured)
    }
}

/// A Python environment found, and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PythonEnv {
    /// The environment's folder (it has `lib/python3.x/site-packages`).
    pub dir: PathBuf,
    /// Where it was found: `backend.python`, `PENSIEVE_PYTHON`, `VIRTUAL_ENV`, `./.venv`, or
    /// [`RUNNING_INTERPRETER`].
    pub from: &'static str,
}

impl PythonEnv {
    /// pensieve runs inside this environment's interpreter (the wheel): its packages are
    /// importable already, and the interpreter's main thread is not pensieve's.
    pub fn is_running_interpreter(&self) -> bool {
        self.from == RUNNING_INTERPRETER
    }
}

/// How [`PythonEnv::from`] names the interpreter pensieve was started from.
pub const RUNNING_INTERPRETER: &str = "the interpreter running pensieve";

static HOST: OnceLock<PathBuf> = OnceLock::new();

/// Says that pensieve runs inside a Python interpreter (the wheel's extension module), whose
/// `sys.prefix` is `prefix`: that environment is the one used, whatever is configured.
pub fn run_inside_python(prefix: PathBuf) {
    let _ = HOST.set(prefix);
}

/// The prefix of the interpreter pensieve runs inside, if it does.
pub fn running_interpreter() -> Option<&'static Path> {
    HOST.get().map(PathBuf::as_path)
}

/// No Python environment was found; says where it looked.
#[derive(Debug, thiserror::Error)]
#[error(
    "no Python environment with mlx and mlx-lm was found (looked at {tried}): set backend.python \
     (or PENSIEVE_PYTHON) to a virtual environment that has them, e.g. the checkout's .venv made by \
     `make venv`"
)]
pub struct NoPython {
    /// What was tried, in order.
    pub tried: String,
}

/// Finds the Python environment: the interpreter pensieve runs inside, if it does; else
/// `configured` (`backend.python`) when not empty, else `$PENSIEVE_PYTHON`, else
/// `$VIRTUAL_ENV`, else `.venv` in the working directory. Each may name the environment's
/// folder or an interpreter inside it (`.venv/bin/python`).
pub fn find_python(configured: &Path) -> Result<PythonEnv, NoPython> {
    if let Some(prefix) = running_interpreter() {
        return Ok(PythonEnv {
            dir: prefix.to_owned(),
            from: RUNNING_INTERPRETER,
        });
    }
    let candidates: Vec<(Option<PathBuf>, &'static str)> = if configured.as_os_str().is_empty() {
        vec![
            (var("PENSIEVE_PYTHON"), "PENSIEVE_PYTHON"),
            (var("VIRTUAL_ENV"), "VIRTUAL_ENV"),
            (Some(PathBuf::from(".venv")), "./.venv"),
        ]
    } else {
        // Configured explicitly: that, and nothing else.
        vec![(Some(configured.to_owned()), "backend.python")]
    };
    let mut tried = Vec::new();
    for (candidate, from) in candidates {
        let Some(path) = candidate else { continue };
        tried.push(format!("{from} = {}", path.display()));
        if let Some(dir) = environment_of(&path) {
            return Ok(PythonEnv { dir, from });
        }
    }
    Err(NoPython {
        tried: if tried.is_empty() {
            "nothing".into()
        } else {
            tried.join(", ")
        },
    })
}

/// The environment a path names: the folder itself, or the one an interpreter is in.
fn environment_of(path: &Path) -> Option<PathBuf> {
    let dir = if path.is_file() {
        path.parent()?.parent()?.to_owned()
    } else {
        path.to_owned()
    };
    dir.join("lib")
        .is_dir()
        .then(|| std::path::absolute(&dir).unwrap_or(dir))
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use super::*;

    #[test]
    fn state_folders_are_one_per_kind_and_follow_the_environment() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("HOME", "/home/u");
            jail.set_env("PENSIEVE_CACHE_DIR", "");
            jail.set_env("XDG_CACHE_HOME", "");
            assert_eq!(state_dir(), Path::new("/home/u/.cache/pensieve"));
            jail.set_env("XDG_CACHE_HOME", "/x");
            assert_eq!(models_dir(), Path::new("/x/pensieve/models"));
            jail.set_env("PENSIEVE_CACHE_DIR", "/p");
            assert_eq!(prompt_cache_dir(""), Path::new("/p/prompt-cache"));
            assert_eq!(prompt_cache_dir("/elsewhere"), Path::new("/elsewhere"));
            // The demo model and the prompt cache never share a folder.
            assert!(!prompt_cache_dir("").starts_with(models_dir()));
            Ok(())
        });
    }

    #[test]
    fn the_python_environment_is_found_by_configuration_then_the_environment() {
        figment::Jail::expect_with(|jail| {
            let venv = jail.directory().join("env");
            std::fs::create_dir_all(venv.join("lib")).unwrap();
            std::fs::create_dir_all(venv.join("bin")).unwrap();
            std::fs::write(venv.join("bin/python"), "").unwrap();
            jail.set_env("PENSIEVE_PYTHON", "");
            jail.set_env("VIRTUAL_ENV", "");
            // Nothing configured, no .venv here: an error that says where it looked.
            let e = find_python(Path::new("")).unwrap_err().to_string();
            assert!(e.contains("./.venv = .venv") && e.contains("backend.python"), "{e}");
            jail.set_env("VIRTUAL_ENV", venv.display());
            assert_eq!(find_python(Path::new("")).unwrap().from, "VIRTUAL_ENV");
            // An interpreter names its environment.
            jail.set_env("PENSIEVE_PYTHON", venv.join("bin/python").display());
            let found = find_python(Path::new("")).unwrap();
            assert_eq!((found.dir, found.from), (venv.clone(), "PENSIEVE_PYTHON"));
            // Configured explicitly, only that counts.
            let e = find_python(Path::new("/no/such/venv")).unwrap_err().to_string();
            assert!(e.contains("backend.python = /no/such/venv"), "{e}");
            Ok(())
        });
    }
}
