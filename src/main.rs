//! The `ferry` binary: parse the configuration, set up logging, run; or mint a token.

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use ferry::auth::{self, Grants};
use ferry::config::{Config, LogFormat, ServeArgs, parse_duration};
use ferry::server::Server;

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "P2P-first WebRTC signaling hub and media relay"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (the default).
    Serve(ServeArgs),
    /// Print an access token signed with the configured API key and secret.
    Token(TokenArgs),
    /// Load a running Ferry with publishers and subscribers (real WebRTC peers on this machine)
    /// and report throughput, loss, latency and the server's CPU and memory per packet/subscriber.
    Loadgen(ferry::loadgen::LoadgenArgs),
}

#[derive(Args)]
struct TokenArgs {
    /// The user's identity (the token's `sub`).
    #[arg(long)]
    identity: String,
    /// Restrict the token to this room (default: any room).
    #[arg(long)]
    room: Option<String>,
    /// Lifetime, e.g. "1h", "30m".
    #[arg(long, default_value = "1h")]
    ttl: String,
    /// Do not allow creating rooms.
    #[arg(long)]
    no_create: bool,
    /// Do not allow publishing media.
    #[arg(long)]
    no_publish: bool,
    /// Do not allow receiving media.
    #[arg(long)]
    no_subscribe: bool,
    /// Always carry this user's media through the relay.
    #[arg(long)]
    relay_only: bool,
    #[command(flatten)]
    config: ServeArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Token(t)) => token(t),
        Some(Command::Serve(args)) => serve(args),
        Some(Command::Loadgen(args)) => loadgen(args),
        None => serve(cli.serve),
    }
}

fn loadgen(args: ferry::loadgen::LoadgenArgs) -> ExitCode {
    let json = args.json;
    // Logs (e.g. FERRY_LOG=rtc_ice=debug) on standard error only when asked: the report is on
    // standard output.
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .init();
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ferry loadgen: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(ferry::loadgen::run(args)) {
        Ok(report) => {
            if json {
                println!("{report:#}");
            } else {
                ferry::loadgen::print_human(&report);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ferry loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}

fn token(t: TokenArgs) -> ExitCode {
    let cfg = match Config::load(&t.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ferry: {e}");
            return ExitCode::from(2);
        }
    };
    let Some((key, secret)) = cfg.api else {
        eprintln!(
            "ferry: no API secret configured: set FERRY_API_KEY and FERRY_API_SECRET (or --api-key/--api-secret, or the config file)"
        );
        return ExitCode::from(2);
    };
    let ttl = match parse_duration("ttl", &t.ttl) {
        Ok(d) if !d.is_zero() => d,
        Ok(_) => {
            eprintln!("ferry: invalid value for ttl: must be greater than zero");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("ferry: {e}");
            return ExitCode::from(2);
        }
    };
    if t.identity.is_empty() || t.identity.len() > 256 {
        eprintln!("ferry: --identity must be 1 to 256 characters");
        return ExitCode::from(2);
    }
    let grants = Grants {
        room: t.room,
        create: !t.no_create,
        publish: !t.no_publish,
        subscribe: !t.no_subscribe,
        relay_only: t.relay_only,
    };
    match auth::mint(&key, &secret, &t.identity, ttl, grants) {
        Ok(tok) => {
            println!("{tok}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ferry: cannot sign token: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(ferry::DEFAULT_LOG_FILTER));
    // Colours only on a terminal: not in files, pipes or the journal.
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Raise the open-file limit to what the system allows: each WebSocket, HTTP connection and
/// ICE-TCP client takes a descriptor, and the default soft limit (often 1024) would be reached
/// long before the connection caps.
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit with a valid, initialised struct.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    raise_fd_limit();
    let cfg = match Config::load(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ferry: {e}");
            return ExitCode::from(2);
        }
    };
    init_tracing(cfg.log_format);
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let result = rt.block_on(async move {
        let server = Server::bind(cfg).await?;
        let handle = server.shutdown_handle();
        // SIGHUP reloads the TLS certificate; without TLS it is only logged (its default action
        // would end the process, e.g. on a `systemctl reload`).
        let tls = server.tls();
        tokio::spawn(async move {
            #[cfg(unix)]
            {
                use tokio::signal::unix::{SignalKind, signal};
                let Ok(mut hup) = signal(SignalKind::hangup()) else {
                    return;
                };
                while hup.recv().await.is_some() {
                    match tls.as_ref().map(|t| t.reload()) {
                        None => tracing::info!("SIGHUP: nothing to reload (no tls_cert)"),
                        Some(Ok(())) => tracing::info!("TLS certificate reloaded"),
                        Some(Err(e)) => tracing::error!(
                            error = %e,
                            "TLS certificate not reloaded: the previous one stays in use"
                        ),
                    }
                }
            }
            #[cfg(not(unix))]
            drop(tls);
        });
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutdown signal received: draining (send it again to stop now)");
            handle.shutdown();
            wait_for_signal().await;
            tracing::info!("second shutdown signal: closing every session now");
            handle.shutdown_now();
        });
        server.run().await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
