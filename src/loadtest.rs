//! `mediamesh loadtest`: many publishers and subscribers from one process, over WHEP or the
//! signal channel (WebSocket or gRPC), with a progress bar while it runs and a table at the end.

use crate::auth::{Grants, TokenKeys, parse_ttl};
use indicatif::{ProgressBar, ProgressStyle};
use mediamesh_sdk::{Client, ClientOptions, PlayOptions, PlaySession, PlayStats, PublishOptions, Role, Transport};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Whep,
    Ws,
    Grpc,
}

#[derive(Debug, clap::Args)]
pub struct LoadtestArgs {
    /// The node's HTTP base URL, e.g. http://127.0.0.1:8080
    #[arg(long)]
    pub url: String,
    #[arg(long)]
    pub room: String,
    /// Synthetic publishers to start (0: watch what is already published)
    #[arg(long, default_value_t = 1)]
    pub publishers: usize,
    #[arg(long, default_value_t = 10)]
    pub subscribers: usize,
    /// How long the subscribers watch once all are connected: 90s, 5m
    #[arg(long, default_value = "60s")]
    pub duration: String,
    #[arg(long, value_enum, default_value = "whep")]
    pub mode: Mode,
    /// Secret to mint tokens with [default: ./mediamesh-data/api-secret]
    #[arg(long, env = "MEDIAMESH_API_SECRET", hide_env_values = true)]
    pub api_secret: Option<String>,
    /// Use this token for everyone instead of minting (needs publish and subscribe grants)
    #[arg(long)]
    pub token: Option<String>,
    /// Subscribers connecting at the same time
    #[arg(long, default_value_t = 16)]
    pub connect_concurrency: usize,
    /// Video bitrate of each synthetic publisher, bits per second
    #[arg(long, default_value_t = 500_000)]
    pub bitrate: u64,
    /// Print the summary as one JSON object on the last line of stdout too
    #[arg(long)]
    pub json: bool,
}

/// The result of a run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub mode: &'static str,
    pub publishers: usize,
    pub subscribers: usize,
    pub subscribers_connected: usize,
    pub connect_failures: usize,
    pub seconds: f64,
    pub frames: u64,
    pub bytes: u64,
    /// Mean received bitrate per connected subscriber.
    pub bitrate_kbps: f64,
    pub packets_expected: u64,
    pub packets_lost: u64,
    pub loss: f64,
    pub connect_p50_ms: Option<f64>,
    pub connect_p99_ms: Option<f64>,
    pub first_frame_p50_ms: Option<f64>,
    pub first_frame_p99_ms: Option<f64>,
    pub largest_frame_gap_ms: f64,
    pub reconnects: u64,
    pub resumes: u64,
}

enum Viewer {
    Whep(PlaySession),
    Channel(Client),
}

impl Viewer {
    async fn stats(&self) -> PlayStats {
        match self {
            Viewer::Whep(session) => session.stats(),
            Viewer::Channel(client) => client.play_stats().await,
        }
    }

    fn reconnects(&self) -> (u64, u64) {
        match self {
            Viewer::Whep(_) => (0, 0),
            Viewer::Channel(client) => (client.reconnects(), client.resumes()),
        }
    }

    async fn close(self) {
        match self {
            Viewer::Whep(session) => {
                let _ = session.close().await;
            }
            Viewer::Channel(client) => client.close().await,
        }
    }
}

enum Source {
    Whip(mediamesh_sdk::PublishSession),
    Channel(Client),
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Whep => "whep",
        Mode::Ws => "ws",
        Mode::Grpc => "grpc",
    }
}

fn transport(mode: Mode) -> Transport {
    if mode == Mode::Grpc {
        Transport::Grpc
    } else {
        Transport::WebSocket
    }
}

pub async fn run(args: LoadtestArgs, secret: Option<String>) -> anyhow::Result<Summary> {
    let duration = parse_ttl(&args.duration)
        .ok_or_else(|| anyhow::anyhow!("--duration {:?} is not a duration like 90s or 5m", args.duration))?;
    let base = args.url.trim_end_matches('/').to_string();
    let keys = secret.map(|s| TokenKeys::new(&s));
    let token_for = |identity: String, grants: Grants| -> anyhow::Result<String> {
        match (&args.token, &keys) {
            (Some(token), _) => Ok(token.clone()),
            (None, Some(keys)) => Ok(keys.create(&identity, &args.room, grants, Duration::from_secs(24 * 3600))),
            (None, None) => anyhow::bail!("no --token, and no --api-secret to mint tokens with"),
        }
    };
    let publish_grants = Grants {
        publish: true,
        ..Default::default()
    };
    let subscribe_grants = Grants {
        subscribe: true,
        ..Default::default()
    };

    let mut sources = Vec::new();
    for index in 0..args.publishers {
        let token = token_for(format!("loadtest-publisher-{index}"), publish_grants)?;
        let options = PublishOptions {
            video_bitrate_bps: args.bitrate,
            ..Default::default()
        };
        let source = match args.mode {
            Mode::Whep => Source::Whip(
                mediamesh_sdk::publish(&format!("{base}/whip/{}", args.room), &token, options)
                    .await
                    .map_err(|e| anyhow::anyhow!("publisher {index}: {e}"))?,
            ),
            mode => {
                let client = Client::connect(&base, &token, client_options(&args.room, Role::Publisher, mode))
                    .await
                    .map_err(|e| anyhow::anyhow!("publisher {index}: {e}"))?;
                client
                    .publish(options)
                    .await
                    .map_err(|e| anyhow::anyhow!("publisher {index}: {e}"))?;
                Source::Channel(client)
            }
        };
        sources.push(source);
    }
    if !sources.is_empty() {
        // Let the first packets open the tracks, so viewers get them at once.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let progress = ProgressBar::new(args.subscribers as u64);
    progress.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} subscribers {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let mut joins = Vec::new();
    for index in 0..args.subscribers {
        let token = token_for(format!("loadtest-viewer-{index}"), subscribe_grants)?;
        let gate = Arc::clone(&gate);
        let base = base.clone();
        let room = args.room.clone();
        let mode = args.mode;
        let progress = progress.clone();
        joins.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await.ok();
            let viewer = connect_viewer(&base, &room, &token, mode).await;
            progress.inc(1);
            viewer
        }));
    }
    let mut viewers = Vec::new();
    let mut connect_failures = 0;
    for join in joins {
        match join.await {
            Ok(Ok(viewer)) => viewers.push(viewer),
            Ok(Err(error)) => {
                connect_failures += 1;
                progress.println(format!("subscriber failed: {error}"));
            }
            Err(error) => {
                connect_failures += 1;
                progress.println(format!("subscriber task failed: {error}"));
            }
        }
    }
    progress.set_length(duration.as_secs().max(1));
    progress.set_position(0);
    progress.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} s {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let watch_started = Instant::now();
    while watch_started.elapsed() < duration {
        tokio::time::sleep(Duration::from_secs(1).min(duration)).await;
        let mut frames = 0;
        for viewer in &viewers {
            frames += viewer.stats().await.video.frames;
        }
        progress.set_position(watch_started.elapsed().as_secs());
        progress.set_message(format!("{} connected, {frames} frames", viewers.len()));
    }
    progress.finish_and_clear();

    let seconds = started.elapsed().as_secs_f64();
    let mut summary = Summary {
        mode: mode_name(args.mode),
        publishers: args.publishers,
        subscribers: args.subscribers,
        subscribers_connected: 0,
        connect_failures,
        seconds,
        frames: 0,
        bytes: 0,
        bitrate_kbps: 0.0,
        packets_expected: 0,
        packets_lost: 0,
        loss: 0.0,
        connect_p50_ms: None,
        connect_p99_ms: None,
        first_frame_p50_ms: None,
        first_frame_p99_ms: None,
        largest_frame_gap_ms: 0.0,
        reconnects: 0,
        resumes: 0,
    };
    let mut latencies = Vec::new();
    let mut connects = Vec::new();
    let mut bitrate_sum = 0.0;
    for viewer in &viewers {
        let stats = viewer.stats().await;
        if stats.connect_latency.is_some() {
            summary.subscribers_connected += 1;
        }
        summary.frames += stats.video.frames;
        summary.bytes += stats.video.bytes + stats.audio.bytes;
        summary.packets_expected += stats.video.packets_expected + stats.audio.packets_expected;
        summary.packets_lost += stats.video.packets_lost + stats.audio.packets_lost;
        summary.largest_frame_gap_ms = summary
            .largest_frame_gap_ms
            .max(stats.video.frame_gap_max.as_secs_f64() * 1e3);
        if let Some(latency) = stats.first_frame_latency {
            latencies.push(latency.as_secs_f64() * 1e3);
        }
        if let Some(latency) = stats.connect_latency {
            connects.push(latency.as_secs_f64() * 1e3);
        }
        if let Some(first) = stats.video.first_packet_at {
            let receiving = first.elapsed().as_secs_f64().max(1e-3);
            bitrate_sum += (stats.video.bytes + stats.audio.bytes) as f64 * 8.0 / receiving / 1e3;
        }
        let (reconnects, resumes) = viewer.reconnects();
        summary.reconnects += reconnects;
        summary.resumes += resumes;
    }
    if summary.subscribers_connected > 0 {
        summary.bitrate_kbps = bitrate_sum / summary.subscribers_connected as f64;
    }
    if summary.packets_expected > 0 {
        summary.loss = summary.packets_lost as f64 / summary.packets_expected as f64;
    }
    latencies.sort_by(f64::total_cmp);
    summary.first_frame_p50_ms = percentile(&latencies, 0.50);
    summary.first_frame_p99_ms = percentile(&latencies, 0.99);
    connects.sort_by(f64::total_cmp);
    summary.connect_p50_ms = percentile(&connects, 0.50);
    summary.connect_p99_ms = percentile(&connects, 0.99);

    for viewer in viewers {
        viewer.close().await;
    }
    for source in sources {
        match source {
            Source::Whip(session) => {
                let _ = session.close().await;
            }
            Source::Channel(client) => client.close().await,
        }
    }
    Ok(summary)
}

fn client_options(room: &str, role: Role, mode: Mode) -> ClientOptions {
    ClientOptions {
        transport: transport(mode),
        room: room.to_string(),
        role,
        display_name: "loadtest".into(),
        ..Default::default()
    }
}

async fn connect_viewer(base: &str, room: &str, token: &str, mode: Mode) -> Result<Viewer, mediamesh_sdk::Error> {
    let options = PlayOptions::default();
    match mode {
        Mode::Whep => mediamesh_sdk::play(&format!("{base}/whep/{room}"), token, options)
            .await
            .map(Viewer::Whep),
        mode => {
            let client = Client::connect(base, token, client_options(room, Role::Subscriber, mode)).await?;
            client.play(options).await?;
            Ok(Viewer::Channel(client))
        }
    }
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], quantile: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (quantile * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn millis(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_string(), |v| format!("{v:.0} ms"))
}

/// The table printed at the end of a run.
pub fn table(summary: &Summary) -> String {
    let rows = [
        ("mode", summary.mode.to_string()),
        ("publishers", summary.publishers.to_string()),
        (
            "subscribers connected",
            format!("{} / {}", summary.subscribers_connected, summary.subscribers),
        ),
        ("connect failures", summary.connect_failures.to_string()),
        ("run time", format!("{:.1} s", summary.seconds)),
        ("video frames received", summary.frames.to_string()),
        ("bitrate per subscriber", format!("{:.0} kbit/s", summary.bitrate_kbps)),
        (
            "loss",
            format!(
                "{:.3} % ({} of {} packets)",
                summary.loss * 100.0,
                summary.packets_lost,
                summary.packets_expected
            ),
        ),
        ("connected p50", millis(summary.connect_p50_ms)),
        ("connected p99", millis(summary.connect_p99_ms)),
        ("first frame p50", millis(summary.first_frame_p50_ms)),
        ("first frame p99", millis(summary.first_frame_p99_ms)),
        ("largest frame gap", format!("{:.0} ms", summary.largest_frame_gap_ms)),
        ("reconnects", summary.reconnects.to_string()),
        ("resumes", summary.resumes.to_string()),
    ];
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (key, value) in rows {
        out.push_str(&format!("{key:<width$}  {value}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 0.5), Some(50.0));
        assert_eq!(percentile(&values, 0.99), Some(99.0));
        assert_eq!(percentile(&[7.0], 0.99), Some(7.0));
        assert_eq!(percentile(&[], 0.5), None);
    }
}
