//! The `logon-gate` binary: parses the command line, sets up logging, dispatches, and turns
//! errors into one sentence on stderr and a non-zero exit code.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

// jemalloc: it returns freed memory to the system (see `runtime`) and costs less CPU per
// request than glibc or mimalloc here (docs/performance.md).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

// jemalloc's own options are compiled in from `.cargo/config.toml`
// (`JEMALLOC_SYS_WITH_MALLOC_CONF`): larger per-thread caches, trimmed less often. Why is said
// there.

use logon_gate::config::Edition;
use logon_gate::telemetry::logfmt;
use logon_gate::{demo, ops, serve};

#[derive(Parser, Debug)]
#[command(
    name = "logon-gate",
    version,
    about = "Edge gateway for custom webmail logon addresses"
)]
struct Cli {
    /// Path of gateway.toml.
    #[arg(short, long, global = true, default_value = "config/gateway.toml")]
    config: PathBuf,
    /// Log level or filter (overrides RUST_LOG), e.g. `info` or `logon_gate=debug`.
    #[arg(long, global = true)]
    log_level: Option<String>,
    /// Log lines as `human` text or one `json` object per line.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the gateway (the default).
    Serve,
    /// Validate the configuration and certificates, like `nginx -t`.
    Check,
    /// Create a tenant or change its edition.
    #[command(subcommand)]
    Tenant(TenantCmd),
    /// Walk a logon address through its lifecycle.
    #[command(subcommand)]
    Domain(DomainCmd),
    /// Install a certificate for a host.
    #[command(subcommand)]
    Cert(CertCmd),
    /// The etcd store (SPEC §6): import the files of [paths], or export it as files.
    #[command(subcommand)]
    Store(StoreCmd),
    /// Run the gateway on loopback with a demo backend and throwaway certificates.
    Demo {
        /// HTTPS listener for the demo.
        #[arg(long, default_value = "127.0.0.1:9443")]
        https: SocketAddr,
        /// Plain HTTP listener for the demo.
        #[arg(long, default_value = "127.0.0.1:9080")]
        http: SocketAddr,
    },
}

#[derive(Subcommand, Debug)]
enum TenantCmd {
    /// Create a tenant file for DOMAIN.
    Add {
        domain: String,
        /// free | standard | enterprise
        #[arg(long)]
        edition: Edition,
    },
    /// Change a tenant's edition.
    Edition { domain: String, edition: Edition },
}

#[derive(Subcommand, Debug)]
enum DomainCmd {
    /// Add a logon address to a tenant (pending, disabled).
    Add { domain: String, host: String },
    /// Check with real DNS that HOST's CNAME chain reaches cname_target, and record it.
    Verify {
        host: String,
        /// Ask this DNS server (IP:PORT) instead of the system's resolvers.
        #[arg(long)]
        nameserver: Option<SocketAddr>,
    },
    /// Record HOST's ICP filing number.
    Icp {
        host: String,
        #[arg(long)]
        number: String,
    },
    /// Enable HOST (disables the tenant's other addresses).
    Enable { host: String },
    /// Disable HOST.
    Disable { host: String },
    /// Remove HOST from its tenant.
    Remove { host: String },
    /// List logon addresses (of one tenant if DOMAIN is given).
    List {
        domain: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum StoreCmd {
    /// Copy the tenant and certificate files of [paths] into the etcd store.
    Import,
    /// Write the etcd store out under DIR as tenants/, certs/ and a gateway.toml.
    Export { dir: PathBuf },
}

#[derive(Subcommand, Debug)]
enum CertCmd {
    /// Validate and install a certificate chain and key for HOST into certs/.
    Install {
        host: String,
        #[arg(long)]
        cert: PathBuf,
        #[arg(long)]
        key: PathBuf,
        /// Replace a different valid certificate already installed for HOST.
        #[arg(long)]
        force: bool,
    },
    /// Order a certificate for HOST from the ACME CA now and wait until it is installed.
    Issue { host: String },
    /// Each logon address's certificate: source (uploaded, acme, none), expiry, ACME state.
    Status {
        host: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Held to the end of main: dropping it flushes the log lines still queued.
    let _log_guard = init_tracing(cli.log_level.as_deref(), cli.log_format);
    let json = cli.log_format == LogFormat::Json;
    let result = match cli.command.unwrap_or(Command::Serve) {
        Command::Check => check(&cli.config),
        Command::Tenant(cmd) => tenant(&cli.config, cmd),
        Command::Domain(cmd) => domain(&cli.config, cmd),
        Command::Cert(CertCmd::Install {
            host,
            cert,
            key,
            force,
        }) => ops::cert::install(&cli.config, &host, &cert, &key, force)
            .map(|lines| lines.iter().for_each(|l| println!("{l}")))
            .map_err(MainError::from),
        Command::Cert(CertCmd::Issue { host }) => runtime().and_then(|rt| {
            rt.block_on(ops::cert::issue(&cli.config, &host))
                .map(|lines| lines.iter().for_each(|l| println!("{l}")))
                .map_err(MainError::from)
        }),
        Command::Cert(CertCmd::Status { host, json }) => {
            cert_status(&cli.config, host.as_deref(), json)
        }
        Command::Store(cmd) => runtime().and_then(|rt| {
            let done = match cmd {
                StoreCmd::Import => rt.block_on(ops::store::import(&cli.config)),
                StoreCmd::Export { dir } => rt.block_on(ops::store::export(&cli.config, &dir)),
            };
            done.map(|l| println!("{l}")).map_err(MainError::from)
        }),
        Command::Serve => runtime().and_then(|rt| rt.block_on(serve(cli.config, json))),
        Command::Demo { https, http } => runtime().and_then(|rt| {
            let opts = demo::DemoOptions {
                https,
                http,
                config: cli.config,
            };
            rt.block_on(run_demo(opts, json))
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = e.sentence();
            if json {
                eprintln!("{}", logfmt::process_line(true, "ERROR", &msg, &[]));
            } else {
                eprintln!("logon-gate: {msg}");
            }
            e.exit_code()
        }
    }
}

/// Why a command failed; `main` says it in one sentence (causes after colons) and exits 1.
#[derive(Debug, thiserror::Error)]
enum MainError {
    #[error(transparent)]
    Op(#[from] ops::OpError),
    #[error(transparent)]
    Start(#[from] serve::StartError),
    #[error("{}: configuration is invalid ({count} error{})", config.display(), if *count == 1 { "" } else { "s" })]
    Invalid { config: PathBuf, count: usize },
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error("cannot watch {0}")]
    Signal(&'static str, #[source] std::io::Error),
    #[error("the gateway task failed")]
    Task(#[source] tokio::task::JoinError),
    #[error("cannot write the JSON")]
    Json(#[source] serde_json::Error),
    #[error("cannot start the demo backend")]
    DemoBackend(#[source] std::io::Error),
    #[error(transparent)]
    Demo(#[from] demo::DemoError),
    #[error("{} (change the ports with --https/--http)", logon_gate::error::sentence(.0))]
    DemoStart(serve::StartError),
    #[error("the demo needs both listeners")]
    DemoListeners,
}

impl MainError {
    /// The error and its causes, each after a colon.
    fn sentence(&self) -> String {
        logon_gate::error::sentence(self)
    }

    fn exit_code(&self) -> ExitCode {
        ExitCode::FAILURE
    }
}

fn print(r: Result<String, ops::OpError>) -> Result<(), MainError> {
    r.map(|msg| println!("{msg}")).map_err(MainError::from)
}

fn cert_status(config: &std::path::Path, host: Option<&str>, json: bool) -> Result<(), MainError> {
    let rows = ops::cert::status(config, host)?;
    if json {
        let text = serde_json::to_string_pretty(&rows).map_err(MainError::Json)?;
        println!("{text}");
    } else {
        print!("{}", ops::cert::render_status(&rows));
    }
    Ok(())
}

fn tenant(config: &std::path::Path, cmd: TenantCmd) -> Result<(), MainError> {
    use ops::lifecycle as l;
    match cmd {
        TenantCmd::Add { domain, edition } => print(l::tenant_add(config, &domain, edition)),
        TenantCmd::Edition { domain, edition } => {
            print(l::tenant_edition(config, &domain, edition))
        }
    }
}

fn domain(config: &std::path::Path, cmd: DomainCmd) -> Result<(), MainError> {
    use ops::lifecycle as l;
    match cmd {
        DomainCmd::Add { domain, host } => print(l::domain_add(config, &domain, &host)),
        DomainCmd::Verify { host, nameserver } => {
            runtime().and_then(|rt| print(rt.block_on(l::domain_verify(config, &host, nameserver))))
        }
        DomainCmd::Icp { host, number } => print(l::domain_icp(config, &host, &number)),
        DomainCmd::Enable { host } => print(l::domain_enable(config, &host)),
        DomainCmd::Disable { host } => print(l::domain_disable(config, &host)),
        DomainCmd::Remove { host } => print(l::domain_remove(config, &host)),
        DomainCmd::List { domain, json } => {
            let rows = l::domain_list(config, domain.as_deref())?;
            if json {
                let text = serde_json::to_string_pretty(&rows).map_err(MainError::Json)?;
                println!("{text}");
            } else {
                print!("{}", l::render(&rows));
            }
            Ok(())
        }
    }
}

/// Logs go to stderr through tracing-appender's writer thread (see below). Access lines have
/// their own formatter (`logfmt::AccessLayer`); everything else uses tracing-subscriber's.
fn init_tracing(
    level: Option<&str>,
    format: LogFormat,
) -> tracing_appender::non_blocking::WorkerGuard {
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::filter::{FilterExt as _, Targets};
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let spec = level
        .map(str::to_owned)
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info".into());
    let env = || EnvFilter::try_new(&spec).unwrap_or_else(|_| EnvFilter::new("info"));
    // A worker thread writes the lines, so no serving thread waits on write(2); it flushes
    // its buffer whenever the queue runs dry, so a burst goes out in few writes and a quiet
    // gateway's lines at once. Not lossy: under a log destination too slow for the queued
    // lines, logging waits, as nginx's does, rather than dropping access lines.
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        // Its queue's slots are allocated up front: 16k lines take 0.5 MB, the default
        // 128k took 4 MB.
        .buffered_lines_limit(16 * 1024)
        .thread_name("log-writer")
        .finish(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::io::stderr(),
        ));
    let json = format == LogFormat::Json;
    let general = tracing_subscriber::fmt::layer()
        .with_writer(writer.clone())
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // A closed stderr must not take the gateway down (eprintln! would panic).
        .log_internal_errors(false);
    let general = if json {
        general.json().flatten_event(true).boxed()
    } else {
        general.boxed()
    };
    // Each layer carries its own static filter (EnvFilter, Targets): interest is then decided
    // once per callsite. A global filter mixed with per-layer ones made every tracing callsite
    // in h2 and tokio ask at run time (about 4% of the gateway's CPU under HTTP/2 load).
    let not_access = Targets::new()
        .with_default(tracing::level_filters::LevelFilter::TRACE)
        .with_target(
            logfmt::ACCESS_TARGET,
            tracing::level_filters::LevelFilter::OFF,
        );
    tracing_subscriber::registry()
        .with(general.with_filter(env().and(not_access)))
        .with(logfmt::AccessLayer::new(writer, json).with_filter(env()))
        .init();
    guard
}

/// Sets jemalloc's dirty-page decay time, for the arenas that exist and those made later.
fn set_dirty_decay_ms(ms: isize) {
    use tikv_jemalloc_ctl::{Access, AsName};
    let set = |key: &str| key.as_bytes().name().write(ms);
    if let Err(e) = set("arenas.dirty_decay_ms\0") {
        tracing::debug!(error = %e, "jemalloc decay time not set");
    }
    let narenas = tikv_jemalloc_ctl::arenas::narenas::read().unwrap_or(0);
    for i in 0..narenas {
        // Arenas not yet in use refuse the setting; they take the default set above.
        let _ = set(&format!("arena.{i}.dirty_decay_ms\0"));
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, MainError> {
    // jemalloc returns freed pages to the system only while something allocates, unless its
    // background threads do it: without them the buffers freed when connections go idle or
    // close stay resident after a burst. Not fatal if unavailable.
    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        tracing::debug!(error = %e, "jemalloc background threads unavailable");
    }
    // And they do it after 1 s rather than jemalloc's 10 s: the 16 KB read buffers hyper frees
    // when connections are parked otherwise stay resident for 10 s after a wave of clients, at
    // no throughput cost (docs/performance.md).
    set_dirty_decay_ms(1000);
    // One worker: connections are served on the serving threads (`workers`); this runtime
    // only accepts, reloads and answers the admin endpoint.
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(MainError::Runtime)
}

fn check(config: &std::path::Path) -> Result<(), MainError> {
    match ops::check(config) {
        Ok(table) => {
            print!("{}", ops::summary(config, &table));
            Ok(())
        }
        Err(errors) => {
            for e in &errors {
                eprintln!("{e}");
            }
            Err(MainError::Invalid {
                config: config.to_path_buf(),
                count: errors.len(),
            })
        }
    }
}

async fn serve(config: PathBuf, json: bool) -> Result<(), MainError> {
    let running = serve::start(&config).await?;
    // One line on stdout, so scripts (and tests) learn the bound ports.
    let https = running.https.map_or("off".into(), |a| a.to_string());
    let http = running.http.map_or("off".into(), |a| a.to_string());
    let fields = [("https", https.as_str()), ("http", http.as_str())];
    println!(
        "{}",
        logfmt::process_line(json, "INFO", "listening", &fields)
    );
    wait_for_stop(&running).await?;
    running.wait().await.map_err(MainError::Task)
}

/// Waits for SIGTERM or SIGINT and starts a graceful shutdown.
async fn wait_for_stop(running: &serve::Running) -> Result<(), MainError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(|e| MainError::Signal("SIGTERM", e))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| MainError::Signal("SIGINT", e))?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    running.shutdown();
    Ok(())
}

async fn run_demo(opts: demo::DemoOptions, json: bool) -> Result<(), MainError> {
    let backend = demo::start_backend()
        .await
        .map_err(MainError::DemoBackend)?;
    let setup = demo::prepare(&opts, backend)?;
    let running = serve::start(&setup.gateway_toml)
        .await
        .map_err(MainError::DemoStart)?;
    let (Some(https), Some(http)) = (running.https, running.http) else {
        return Err(MainError::DemoListeners);
    };
    let text = demo::instructions(&setup, https, http);
    if json {
        let fields = [("instructions", text.as_str())];
        println!(
            "{}",
            logfmt::process_line(true, "INFO", "demo ready", &fields)
        );
    } else {
        println!("{text}");
    }
    wait_for_stop(&running).await?;
    running.wait().await.map_err(MainError::Task)
}

#[cfg(test)]
mod tests {
    /// The options from `.cargo/config.toml` are compiled into jemalloc, not just set.
    #[test]
    fn jemalloc_takes_the_compiled_in_options() {
        use tikv_jemalloc_ctl::{Access, AsName};
        // The environment variable would override them; the test reads what is in force.
        if std::env::var_os("_RJEM_MALLOC_CONF").is_some() {
            return;
        }
        let small = |key: &'static [u8]| -> u32 { key.name().read().expect("jemalloc option") };
        assert_eq!(small(b"opt.tcache_nslots_small_min\0"), 256);
        assert_eq!(small(b"opt.tcache_nslots_small_max\0"), 1024);
        let gc: usize = b"opt.tcache_gc_incr_bytes\0"
            .name()
            .read()
            .expect("jemalloc option");
        assert_eq!(gc, 2 * 1024 * 1024);
    }
}
