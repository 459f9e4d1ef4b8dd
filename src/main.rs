//! `sprint-sidecar`: parse the command line, load the configuration, harden the process,
//! run. Exit codes: 0 clean stop, 1 run-time failure (or an unhealthy pool for `status`),
//! 2 invalid configuration or secrets.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use sprint_sidecar::app::{self, AppError};
use sprint_sidecar::config::{Config, LogFormat, Overrides};
use sprint_sidecar::shutdown::Shutdown;
use sprint_sidecar::{demo, secret, status_cli};

#[global_allocator]
static GLOBAL: secret::WipingAllocator = secret::WipingAllocator;

#[derive(Parser, Debug)]
#[command(
    name = "sprint-sidecar",
    version,
    about = "TLS sidecar proxy for the Bitcoin Sprint relay"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the proxy (the default).
    Run,
    /// Validate the configuration and print the effective values (secrets redacted).
    CheckConfig,
    /// Query a running sidecar's admin API and print the pool as a table.
    Status {
        /// Base URL of the admin listener [default: from the configuration's admin.address
        /// (--config, SPRINT_SIDECAR_*, --admin-listen), http://127.0.0.1:9091 without one]
        #[arg(long)]
        admin: Option<String>,
        /// Print the raw JSON document.
        #[arg(long)]
        json: bool,
        /// File holding the admin bearer token [default: the configuration's admin.token_file]
        #[arg(long)]
        token_file: Option<PathBuf>,
    },
    /// Start an embedded local TLS relay, the sidecar in front of it, and a little traffic.
    Demo,
}

#[derive(Args, Debug, Clone, Default)]
struct RunArgs {
    /// Configuration file (TOML).
    #[arg(long, global = true, env = "SPRINT_SIDECAR_CONFIG")]
    config: Option<PathBuf>,
    /// Data listener address (listener.address).
    #[arg(long, global = true)]
    listen: Option<String>,
    /// Admin listener address (admin.address).
    #[arg(long, global = true)]
    admin_listen: Option<String>,
    /// Relay endpoint HOST:PORT (upstream.endpoint).
    #[arg(long, global = true)]
    upstream: Option<String>,
    /// TLS server name (upstream.server_name).
    #[arg(long, global = true)]
    server_name: Option<String>,
    /// PEM trust anchors for the relay (upstream.ca_file).
    #[arg(long, global = true)]
    ca_file: Option<String>,
    /// Warm connections (pool.size).
    #[arg(long, global = true)]
    pool_size: Option<String>,
    /// text or json (log.format).
    #[arg(long, global = true)]
    log_format: Option<String>,
    /// error, warn, info, debug, trace (log.level).
    #[arg(long, global = true)]
    log_level: Option<String>,
}

impl RunArgs {
    fn overrides(&self) -> Overrides {
        Overrides {
            listen: self.listen.clone(),
            admin_listen: self.admin_listen.clone(),
            upstream: self.upstream.clone(),
            server_name: self.server_name.clone(),
            ca_file: self.ca_file.clone(),
            pool_size: self.pool_size.clone(),
            log_format: self.log_format.clone(),
            log_level: self.log_level.clone(),
        }
    }
}

fn init_tracing(format: LogFormat, level: &str) {
    use tracing::level_filters::STATIC_MAX_LEVEL;
    let within_build = sprint_sidecar::config::log_filter_for_this_build(level);
    let filter = tracing_subscriber::EnvFilter::try_new(within_build.as_ref())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
    if within_build != level {
        tracing::warn!(
            "log.level {level:?} asks for more than this build records: it was compiled with \
             {STATIC_MAX_LEVEL} as its most detailed level, so {within_build:?} is in effect"
        );
    }
}

fn fail(e: &AppError) -> ExitCode {
    eprintln!("sprint-sidecar: {e}");
    ExitCode::from(e.exit_code() as u8)
}

/// The main thread's runtime: event loop 0 of the data plane (`app::run` starts the others,
/// see `event_loops`), the admin listener and the background tasks.
fn runtime() -> Result<tokio::runtime::Runtime, AppError> {
    sprint_sidecar::busy_poll::loop_runtime()
        .build()
        .map_err(|e| AppError::runtime(format!("cannot start the runtime: {e}")))
}

fn announce(bound: app::Bound) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "sprint-sidecar listening data=http://{} admin=http://{}",
        bound.data, bound.admin
    );
    let _ = out.flush();
}

fn run(args: &RunArgs) -> Result<(), AppError> {
    let cfg = Config::load(args.config.as_deref(), &args.overrides())
        .map_err(|e| AppError::config(e.to_string()))?;
    init_tracing(cfg.log.format, &cfg.log.level);
    for w in cfg.warnings() {
        tracing::warn!("{w}");
    }
    // Hardening and secrets come before any thread is spawned.
    let state = app::harden(&cfg)?;
    let credential = app::load_credential(&cfg)?;
    runtime()?.block_on(app::run(cfg, state, credential, Shutdown::new(), announce))
}

fn check_config(args: &RunArgs) -> Result<(), AppError> {
    let cfg = Config::load(args.config.as_deref(), &args.overrides())
        .map_err(|e| AppError::config(e.to_string()))?;
    sprint_sidecar::tls::install_default_provider();
    sprint_sidecar::tls::setup(&cfg.upstream, cfg.pool.size.get())
        .map_err(|e| AppError::config(e.to_string()))?;
    // The same protection `run` applies before it reads a secret: a machine where memory
    // cannot be locked while `memory.require_lock` is set fails here as it would there.
    let hardening = app::harden(&cfg)?;
    let credential = app::load_credential(&cfg)?;
    let admin_token = app::check_admin_token(&cfg)?;
    print!("{}", cfg.to_toml());
    for w in cfg.warnings() {
        println!("# warning: {w}");
    }
    if let Some(c) = credential {
        if hardening.is_degraded() {
            println!(
                "# relay credential: loaded, but NOT in locked memory (memory.require_lock = \
                 false and locking is not permitted here), value redacted"
            );
        } else {
            println!("# relay credential: loaded into locked memory ({c:?}), value redacted");
        }
    }
    if admin_token {
        println!("# admin token: readable and private, value redacted");
    }
    let max = tracing::level_filters::STATIC_MAX_LEVEL;
    let within_build = sprint_sidecar::config::log_filter_for_this_build(&cfg.log.level);
    if within_build != cfg.log.level.as_str() {
        println!(
            "# log level: {:?} asks for more than this build records (compiled with {max} as \
             its most detailed level): {within_build:?} is in effect",
            cfg.log.level
        );
    }
    let loops = cfg.runtime.event_loops(cfg.pool.size.get());
    println!(
        "# event loops: {loops} (runtime.worker_threads = {}{})",
        cfg.runtime.worker_threads,
        if cfg.runtime.worker_threads == 0 {
            ": one per core this process may use, at most pool.size"
        } else {
            ""
        }
    );
    // Tried for real (this process exits next), so the line says what `run` would get here.
    let priority = app::apply_priority(&cfg);
    println!(
        "# scheduling priority: nice {} (runtime.nice); {}",
        cfg.runtime.nice,
        match priority {
            app::Priority::Unchanged(_) => "already in effect here".to_string(),
            app::Priority::Set { .. } => "permitted here".to_string(),
            app::Priority::Refused { current, .. } => format!(
                "NOT permitted here (needs root, CAP_SYS_NICE or RLIMIT_NICE): would run at \
                 nice {current}"
            ),
        }
    );
    if cfg.runtime.busy_poll.is_zero() {
        println!("# busy polling: off (runtime.busy_poll = 0s)");
    } else if let Some(cores) = sprint_sidecar::busy_poll::cpu_quota() {
        println!(
            "# busy polling: stands down here, a CPU quota of {cores:.2} core(s) applies \
             (runtime.busy_poll = {})",
            humantime::format_duration(cfg.runtime.busy_poll)
        );
    } else {
        println!(
            "# busy polling: on (runtime.busy_poll = {}): while an event loop sleeps with {}+ \
             requests in flight, an idle-class thread keeps its core awake for up to that long, \
             as long as a trial (one period of 100 ms in ten without it) finds that this makes \
             answers faster",
            humantime::format_duration(cfg.runtime.busy_poll),
            sprint_sidecar::busy_poll::MIN_IN_FLIGHT
        );
    }
    let setting = match cfg.runtime.yield_every {
        Some(every) => humantime::format_duration(every).to_string(),
        None => "auto".to_owned(),
    };
    let policy = cfg.runtime.yield_policy(loops);
    if policy.every.is_zero() {
        println!("# handing the core over: never (runtime.yield_every = {setting})");
    } else {
        println!(
            "# handing the core over: at most every {} (runtime.yield_every = {setting}), a \
             loop that has run out of tasks yields its core to waiting threads before it looks \
             for events{}",
            humantime::format_duration(policy.every),
            if policy.only_when_sharing {
                ", while the process may run on more than one core"
            } else {
                ""
            }
        );
    }
    println!("# configuration is valid");
    Ok(())
}

/// Where `status` asks, and with which token file: the flags when given, else the effective
/// configuration's `admin.address` (a wildcard address asked on loopback) and
/// `admin.token_file`, as `run` with the same file, variables and flags would listen.
fn status_target(
    args: &RunArgs,
    admin: &Option<String>,
    token_file: &Option<PathBuf>,
) -> Result<(String, Option<PathBuf>), AppError> {
    if let Some(admin) = admin
        && token_file.is_some()
    {
        return Ok((admin.clone(), token_file.clone()));
    }
    let cfg = Config::load(args.config.as_deref(), &args.overrides())
        .map_err(|e| AppError::config(e.to_string()))?;
    let admin = admin.clone().unwrap_or_else(|| {
        let mut addr = cfg.admin.address;
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr {
                std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        format!("http://{addr}")
    });
    Ok((admin, token_file.clone().or(cfg.admin.token_file)))
}

fn main() -> ExitCode {
    // Wipe freed memory from the very start (configuration loading copies the environment,
    // which may hold the token); `[memory] wipe_freed_memory` may turn it off afterwards.
    secret::set_wipe_on_free(true);
    let cli = Cli::parse();
    let result = match &cli.command {
        None => run(&cli.run),
        Some(Command::Run) => run(&cli.run),
        Some(Command::CheckConfig) => check_config(&cli.run),
        Some(Command::Demo) => {
            let a = &cli.run;
            init_tracing(LogFormat::Text, a.log_level.as_deref().unwrap_or("info"));
            runtime().and_then(|rt| rt.block_on(demo::run(a.config.as_deref(), a.overrides())))
        }
        Some(Command::Status {
            admin,
            json,
            token_file,
        }) => {
            let (admin, token_file) = match status_target(&cli.run, admin, token_file) {
                Ok(target) => target,
                Err(e) => return fail(&e),
            };
            let token = match token_file.as_deref().map(status_cli::read_token_file) {
                Some(Ok(t)) => Some(t),
                Some(Err(e)) => return fail(&AppError::config(e.to_string())),
                None => None,
            };
            match runtime().map(|rt| rt.block_on(status_cli::run(&admin, *json, token))) {
                Ok(Ok(true)) => Ok(()),
                Ok(Ok(false)) => return ExitCode::from(1),
                Ok(Err(e)) => Err(AppError::config(e.to_string())),
                Err(e) => Err(e),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}
