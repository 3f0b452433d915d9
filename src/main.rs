//! `mediamesh`: run a node, mint tokens, load-test a node.

use clap::{Parser, Subcommand};
use mediamesh::auth::{Grants, TokenKeys, parse_ttl};
use mediamesh::config::{NodeArgs, secret_in_data_dir};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "mediamesh", version, about = "An actor-based WebRTC media mesh")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node (a complete single-node mesh with no settings at all).
    Node(NodeArgs),
    /// Access tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Many synthetic publishers and subscribers from this process; a table of results at the end.
    Loadtest(mediamesh::loadtest::LoadtestArgs),
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a signed access token.
    Create {
        #[arg(long)]
        room: String,
        #[arg(long)]
        identity: String,
        #[arg(long)]
        publish: bool,
        #[arg(long)]
        subscribe: bool,
        #[arg(long)]
        admin: bool,
        /// Lifetime: 90s, 15m, 1h, 7d
        #[arg(long, default_value = "1h")]
        ttl: String,
        #[command(flatten)]
        node: NodeArgs,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Node(args) => run_node(args),
        Command::Loadtest(args) => run_loadtest(args),
        Command::Token {
            command:
                TokenCommand::Create {
                    room,
                    identity,
                    publish,
                    subscribe,
                    admin,
                    ttl,
                    node,
                },
        } => {
            let Some(ttl) = parse_ttl(&ttl) else {
                eprintln!("error: --ttl {ttl:?} is not a duration like 90s, 15m, 1h or 7d");
                return ExitCode::from(2);
            };
            let secret = match node.api_secret.clone() {
                Some(secret) => Ok(secret),
                None => node
                    .resolve()
                    .map(|config| config.api_secret)
                    .or_else(|_| secret_in_data_dir(std::path::Path::new("./mediamesh-data"), "api-secret")),
            };
            let secret = match secret {
                Ok(secret) => secret,
                Err(error) => {
                    eprintln!("error: {error}");
                    return ExitCode::from(2);
                }
            };
            let grants = Grants {
                publish,
                subscribe,
                admin,
            };
            println!("{}", TokenKeys::new(&secret).create(&identity, &room, grants, ttl));
            ExitCode::SUCCESS
        }
    }
}

fn run_loadtest(args: mediamesh::loadtest::LoadtestArgs) -> ExitCode {
    let secret = match (&args.api_secret, &args.token) {
        (Some(secret), _) => Some(secret.clone()),
        (None, Some(_)) => None,
        (None, None) => secret_in_data_dir(std::path::Path::new("./mediamesh-data"), "api-secret").ok(),
    };
    let json = args.json;
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: no runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(mediamesh::loadtest::run(args, secret)) {
        Ok(summary) => {
            print!("{}", mediamesh::loadtest::table(&summary));
            if json {
                println!("{}", serde_json::to_string(&summary).unwrap_or_default());
            }
            if summary.subscribers_connected < summary.subscribers {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn run_node(args: NodeArgs) -> ExitCode {
    let config = match args.resolve() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
    };
    let system = actix::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("mediamesh-media")
            .build()
            // Without a runtime there is no node; this fails only when threads cannot be made.
            .expect("tokio runtime")
    });
    let result = system.block_on(async move {
        // Inside the runtime: the OTLP exporter's channel lives on it.
        mediamesh::telemetry::init(&config.telemetry());
        let listeners = mediamesh::node::NodeListeners::bind(&config)?;
        mediamesh::node::run(config, listeners, mediamesh::node::shutdown_signal()).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "node failed");
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
