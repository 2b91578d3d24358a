//! The `pensieve` command line: `serve`, `config`, `memory`, `policy check`.
//!
//! [`run`] is the whole command: the `pensieve` binary calls it with its arguments, and so does
//! the wheel's `pensieve` command (a Python console script calling the extension module).

mod bar;

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;

use crate::config::{Config, FlagBackend, FlagServer, Flags, LogFormat};
use crate::memory::{MemorySnapshot, Sampler, SystemProbe, Thresholds};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "pensieve",
    version,
    about = "A local LLM server that speaks the Anthropic Messages API on MLX"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the Messages API.
    Serve {
        /// Configuration file (default: $PENSIEVE_CONFIG, else ~/.config/pensieve/pensieve.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// A Hugging Face id, a local folder, a GGUF file, or `demo`.
        #[arg(long)]
        model: Option<String>,
        /// Load the model even when its estimated size would take memory to the warning
        /// threshold (`backend.force_load`).
        #[arg(long)]
        force: bool,
        /// Address to bind.
        #[arg(long)]
        host: Option<String>,
        /// Port to bind.
        #[arg(long)]
        port: Option<u16>,
    },
    /// Print the effective configuration and where each value came from.
    Config {
        /// Configuration file.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// WebAssembly admission policies.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Print the current memory snapshot and tier, as the server would see it.
    Memory {
        /// Configuration file.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Load policies as `serve` would, run classify and decide on sample inputs, and report
    /// what is wrong; exits non-zero on any problem.
    Check {
        /// Configuration file (for `[policies]` limits and settings).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Policy files (.wasm or .wat).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

/// Runs the command line `args` (the first is the program's name); returns the exit status.
pub fn run<I, T>(args: I) -> u8
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version are "errors" that print to stdout and succeed.
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    let result = match cli.command {
        Command::Serve {
            config,
            model,
            force,
            host,
            port,
        } => {
            let flags = Flags {
                server: FlagServer { host, port },
                backend: FlagBackend {
                    model,
                    force_load: force.then_some(true),
                },
            };
            serve(config, flags)
        }
        Command::Config { config } => Config::explain(config.as_deref(), &Flags::default())
            .map(|text| print!("{text}"))
            .map_err(|e| e.to_string()),
        Command::Memory { config } => memory(config),
        Command::Policy {
            command: PolicyCommand::Check { config, files },
        } => policy_check(config, files),
    };
    let code = match result {
        Ok(()) => 0,
        Err(message) => {
            eprintln!("pensieve: {message}");
            1
        }
    };
    let _ = std::io::stdout().flush();
    code
}

fn serve(file: Option<PathBuf>, flags: Flags) -> Result<(), String> {
    let config = Config::load(file.as_deref(), &flags).map_err(|e| e.to_string())?;
    init_logging(&config);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("pensieve-io")
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    runtime
        .block_on(crate::server::serve(config))
        .map_err(|e| e.to_string())
}

fn memory(file: Option<PathBuf>) -> Result<(), String> {
    let config = Config::load(file.as_deref(), &Flags::default()).map_err(|e| e.to_string())?;
    let mut probe = SystemProbe::new().map_err(|e| e.to_string())?;
    let snap: MemorySnapshot = Sampler::sample(
        &mut probe,
        &Thresholds::from_config(&config.memory),
        &MemorySnapshot::unknown(),
        &Default::default(),
    );
    let cgroup = probe.cgroup().map(|c| format!("{} ({:?})", c.dir.display(), c.version));
    let out = serde_json::json!({
        "tier": snap.tier.as_str(),
        "accepting_requests": snap.tier.admits(),
        "available_gb": format!("{:.2}", snap.available_gb()),
        "total_gb": format!("{:.2}", snap.total_gb()),
        "available_bytes": snap.available_bytes,
        "total_bytes": snap.total_bytes,
        "source": snap.source.as_str(),
        "cgroup": cgroup,
        "pressure_some_avg10": snap.pressure_some_avg10,
        "kernel_pressure": snap.kernel_pressure.map(|k| k.as_str()),
        "thresholds_gb": {"warning": config.memory.warning_gb, "critical": config.memory.critical_gb,
                          "emergency": config.memory.emergency_gb, "hysteresis": config.memory.hysteresis},
    });
    println!("{}", serde_json::to_string_pretty(&out).expect("json"));
    Ok(())
}

fn policy_check(file: Option<PathBuf>, files: Vec<PathBuf>) -> Result<(), String> {
    let config = Config::load(file.as_deref(), &Flags::default()).map_err(|e| e.to_string())?;
    let engine = crate::policy::PolicyEngine::new(&config.policies).map_err(|e| e.to_string())?;
    let mut probe = SystemProbe::new().map_err(|e| e.to_string())?;
    let snap = Sampler::sample(
        &mut probe,
        &Thresholds::from_config(&config.memory),
        &MemorySnapshot::unknown(),
        &Default::default(),
    );
    let mem = crate::policy::memory_record(&snap);
    let mut failed = 0;
    for f in &files {
        match engine.check(f, &mem) {
            Ok(report) => print!("ok   {report}"),
            Err(e) => {
                failed += 1;
                println!("FAIL {e}");
            }
        }
    }
    if failed > 0 {
        return Err(format!("{failed} of {} policies have problems", files.len()));
    }
    Ok(())
}

fn init_logging(config: &Config) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

    let filter = tracing_subscriber::EnvFilter::new(&config.log.level);
    // Colours and the load progress bar only on a terminal: logs piped to a file or a
    // collector stay plain text, with progress in log lines.
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer().with_ansi(terminal);
    let fmt = match config.log.format {
        LogFormat::Json => fmt
            .with_writer(std::io::stderr)
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
        LogFormat::Pretty if terminal => {
            bar::install();
            fmt.with_writer(bar::LogWriter).boxed()
        }
        LogFormat::Pretty => fmt.with_writer(std::io::stderr).boxed(),
    };
    // The dashboard's recent requests come from the request spans, whatever the log level.
    let recent = crate::api::dashboard::recent::RecentLayer.with_filter(tracing_subscriber::filter::filter_fn(|m| {
        crate::api::dashboard::recent::RecentLayer::wants(m)
    }));
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(config.dashboard.enabled.then_some(recent))
        .init();
}
