//! The `pensieve` binary: the command line of [`pensieve::cli`].

fn main() -> std::process::ExitCode {
    std::process::ExitCode::from(pensieve::cli::run(std::env::args_os()))
}
