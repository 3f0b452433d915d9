//! `mediamesh`: run a node, mint tokens, administer a cluster, load-test a node.

use clap::{Parser, Subcommand};
use mediamesh::admin_cli::AdminArgs;
use mediamesh::auth::{Grants, TokenKeys, parse_ttl};
use mediamesh::config::{NodeArgs, secret_in_data_dir};
use std::path::{Path, PathBuf};
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
    /// The admin API of a running cluster: nodes, rooms, migrations, drains, viewers, usage.
    ///
    /// Exit codes: 0 done, 1 the API refused, 2 bad arguments or node unreachable.
    Admin(AdminArgs),
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
        Command::Admin(args) => run_admin(args),
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
            let secret = match api_secret(&node, IfMissing::Generate) {
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

/// What [`api_secret`] does when no secret exists yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IfMissing {
    /// Generate it into the data directory, as `node` does on its first start (`token create`).
    Generate,
    /// Fail (`admin`): a fresh secret would sign tokens no running node accepts.
    Fail,
}

/// The API secret, found where `node` reads it: `--api-secret` (or `MEDIAMESH_API_SECRET`),
/// `api_secret` in the `--config` file, else `api-secret` in the data directory (`--data-dir`,
/// the config file's `data_dir`, else `./mediamesh-data`). Only those three settings of `node`
/// are read, so an unrelated bad setting does not hide the secret.
fn api_secret(node: &NodeArgs, if_missing: IfMissing) -> Result<String, String> {
    if let Some(secret) = &node.api_secret {
        return Ok(secret.clone());
    }
    let mut data_dir = node.data_dir.clone();
    if let Some(path) = &node.config {
        let file = std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|text| text.parse::<toml::Table>().map_err(|e| e.to_string()))
            .map_err(|e| format!("config file {}: {e}", path.display()))?;
        if let Some(secret) = file.get("api_secret").and_then(toml::Value::as_str) {
            return Ok(secret.to_string());
        }
        if data_dir.is_none() {
            data_dir = file.get("data_dir").and_then(toml::Value::as_str).map(PathBuf::from);
        }
    }
    let data_dir = data_dir.unwrap_or_else(|| PathBuf::from("./mediamesh-data"));
    match if_missing {
        IfMissing::Generate => std::fs::create_dir_all(&data_dir)
            .map_err(|e| format!("data directory {}: {e}", data_dir.display()))
            .and_then(|()| secret_in_data_dir(&data_dir, "api-secret").map_err(|e| e.to_string())),
        IfMissing::Fail => secret_in_file(&data_dir.join("api-secret")),
    }
}

/// The secret in `path`, never creating it.
fn secret_in_file(path: &Path) -> Result<String, String> {
    let missing = || {
        format!(
            "no admin token: give --token (or MEDIAMESH_TOKEN), or the API secret to mint one with \
             --api-secret (MEDIAMESH_API_SECRET), or the node's --config or --data-dir; {} has none",
            path.display()
        )
    };
    match std::fs::read_to_string(path) {
        Ok(text) if text.trim().is_empty() => Err(missing()),
        Ok(text) => Ok(text.trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(missing()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

fn run_admin(args: AdminArgs) -> ExitCode {
    let token = match &args.token {
        Some(token) => token.clone(),
        None => {
            let node = NodeArgs {
                api_secret: args.api_secret.clone(),
                config: args.config.clone(),
                data_dir: args.data_dir.clone(),
                ..Default::default()
            };
            match api_secret(&node, IfMissing::Fail) {
                Ok(secret) => mediamesh::admin_cli::mint_admin_token(&secret),
                Err(error) => {
                    eprintln!("error: {error}");
                    return ExitCode::from(mediamesh::admin_cli::EXIT_USAGE);
                }
            }
        }
    };
    mediamesh::admin_cli::run(&args, &token)
}

fn run_loadtest(args: mediamesh::loadtest::LoadtestArgs) -> ExitCode {
    let secret = match (&args.api_secret, &args.token) {
        (Some(secret), _) => Some(secret.clone()),
        (None, Some(_)) => None,
        (None, None) => api_secret(&NodeArgs::default(), IfMissing::Generate).ok(),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mediamesh-secret-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    #[test]
    fn the_secret_comes_from_the_flag_then_the_config_file_then_the_data_directory() {
        let dir = temp_dir();
        let data = dir.join("data");
        std::fs::create_dir_all(&data).expect("data dir");
        std::fs::write(data.join("api-secret"), "from-the-data-dir-0123\n").expect("write");
        let config = dir.join("node.toml");
        std::fs::write(&config, format!("data_dir = {:?}\n", data.display().to_string())).expect("write");
        let mut node = NodeArgs {
            config: Some(config.clone()),
            ..Default::default()
        };
        assert_eq!(api_secret(&node, IfMissing::Fail), Ok("from-the-data-dir-0123".into()));
        std::fs::write(&config, "api_secret = \"from-the-config-0123\"\n").expect("write");
        assert_eq!(api_secret(&node, IfMissing::Fail), Ok("from-the-config-0123".into()));
        node.api_secret = Some("from-the-flag-0123456".into());
        assert_eq!(api_secret(&node, IfMissing::Fail), Ok("from-the-flag-0123456".into()));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn admin_never_generates_a_secret_but_token_create_does() {
        let dir = temp_dir();
        let node = NodeArgs {
            data_dir: Some(dir.join("data")),
            ..Default::default()
        };
        let error = api_secret(&node, IfMissing::Fail).expect_err("no secret yet");
        assert!(error.contains("--token") && error.contains("--api-secret"), "{error}");
        assert!(!dir.join("data").exists(), "nothing was created");
        let generated = api_secret(&node, IfMissing::Generate).expect("generated");
        assert_eq!(api_secret(&node, IfMissing::Fail), Ok(generated));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
