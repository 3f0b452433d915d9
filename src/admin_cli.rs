//! `mediamesh admin`: the admin API (`/admin/v1`) from a terminal. Any node answers for the whole
//! cluster. Tables for people by default, the API's own JSON body with `--json` for scripts.
//!
//! Exit codes: 0 done; 1 the API refused (its `problem+json` goes to stderr as
//! `error: <status> <title>: <detail>`); 2 bad arguments, no token, or the node could not be
//! reached.
//!
//! The HTTP shell is [`run`]; everything it prints comes from pure functions of the JSON body
//! ([`render_cluster`], [`render_rooms`], ...) that never panic on odd JSON: a missing field
//! prints as `-`.

use crate::auth::{Grants, TokenKeys};
use serde_json::Value;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long the TCP connect to the node may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one request may take: `migrate` answers only when the room's clients have moved.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Lifetime of the admin token minted when no `--token` is given.
pub const MINTED_TOKEN_TTL: Duration = Duration::from_secs(5 * 60);
/// Identity (`sub`) of a minted token, as it shows in the node's logs.
pub const MINTED_TOKEN_IDENTITY: &str = "mediamesh-admin-cli";
/// Largest response body read; a larger one is an error, not an allocation.
pub const RESPONSE_BYTES_MAX: u64 = 32 * 1024 * 1024;
/// Characters of a non-JSON error body echoed to stderr.
const ERROR_BODY_CHARS_MAX: usize = 300;
/// Spaces between two table columns.
const COLUMN_GAP: usize = 2;

pub const EXIT_API_ERROR: u8 = 1;
pub const EXIT_USAGE: u8 = 2;

#[derive(Debug, clap::Args)]
pub struct AdminArgs {
    #[command(subcommand)]
    pub command: AdminCommand,
    /// HTTP base URL of any node
    #[arg(long, env = "MEDIAMESH_URL", default_value = "http://127.0.0.1:8080", global = true)]
    pub url: String,
    /// Admin token [default: minted for 5 minutes from the API secret]
    #[arg(long, env = "MEDIAMESH_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// Print the API's JSON body instead of a table
    #[arg(long, global = true)]
    pub json: bool,
    /// Secret to mint the admin token with (as `token create` finds it) [default: ./mediamesh-data/api-secret]
    #[arg(long, env = "MEDIAMESH_API_SECRET", hide_env_values = true, global = true)]
    pub api_secret: Option<String>,
    /// The node's TOML config file, to read `api_secret` or `data_dir` from
    #[arg(long, env = "MEDIAMESH_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// The node's data directory, to read `api-secret` from [default: ./mediamesh-data]
    #[arg(long, env = "MEDIAMESH_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum AdminCommand {
    /// The store's view: leader, term, commit index, and every node with its load.
    Cluster,
    /// Every placed room in the cluster: host, epoch, sessions per node.
    Rooms,
    /// One room: placement, counts per node, and the answering node's sessions.
    Room { room: String },
    /// Moves a room to another node; answers when its clients have moved.
    Migrate {
        room: String,
        /// Node id to move the room to
        #[arg(long)]
        to: String,
    },
    /// Drains a node: it moves every room and client off, leaves the cluster and stops.
    Drain { node: String },
    /// A viewer's stored state: room, position, subscriptions, layers.
    Viewer { viewer: String },
    /// Migrations in flight and recently finished, on every node.
    Migrations,
    /// Viewer-minutes per room on one day in KST.
    Usage {
        /// The day, YYYY-MM-DD (KST)
        #[arg(long, value_parser = parse_day)]
        day: String,
    },
}

/// A calendar day `YYYY-MM-DD` (checked here, so a typo never reaches the node).
fn parse_day(text: &str) -> Result<String, String> {
    crate::clock::kst_day_span(text)
        .map(|_| text.to_string())
        .ok_or_else(|| format!("{text:?} is not a calendar day like 2026-11-22"))
}

/// A short-lived token with the admin grant on every room.
pub fn mint_admin_token(secret: &str) -> String {
    let grants = Grants {
        admin: true,
        ..Default::default()
    };
    TokenKeys::new(secret).create(MINTED_TOKEN_IDENTITY, "*", grants, MINTED_TOKEN_TTL)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
}

/// One admin API call: method, path segments under the base URL, query and JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub method: Method,
    pub segments: Vec<String>,
    pub query: Option<(&'static str, String)>,
    pub body: Option<Value>,
}

impl Call {
    fn get(segments: &[&str]) -> Call {
        Call {
            method: Method::Get,
            segments: segments.iter().map(|s| s.to_string()).collect(),
            query: None,
            body: None,
        }
    }

    /// The full URL under `base` (whose own path, e.g. behind a proxy, is kept); every segment
    /// is percent-encoded, so a room name cannot reach another endpoint.
    pub fn url(&self, base: &reqwest::Url) -> reqwest::Url {
        let mut url = base.clone();
        url.set_query(None);
        url.set_fragment(None);
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(&self.segments);
        }
        if let Some((name, value)) = &self.query {
            url.query_pairs_mut().append_pair(name, value);
        }
        url
    }
}

/// The API call a command makes.
pub fn call_of(command: &AdminCommand) -> Call {
    match command {
        AdminCommand::Cluster => Call::get(&["admin", "v1", "cluster"]),
        AdminCommand::Rooms => Call::get(&["admin", "v1", "rooms"]),
        AdminCommand::Room { room } => Call::get(&["admin", "v1", "rooms", room]),
        AdminCommand::Migrate { room, to } => Call {
            method: Method::Post,
            body: Some(serde_json::json!({ "to": to })),
            ..Call::get(&["admin", "v1", "rooms", room, "migrate"])
        },
        AdminCommand::Drain { node } => Call {
            method: Method::Post,
            ..Call::get(&["admin", "v1", "nodes", node, "drain"])
        },
        AdminCommand::Viewer { viewer } => Call::get(&["admin", "v1", "viewers", viewer]),
        AdminCommand::Migrations => Call::get(&["admin", "v1", "migrations"]),
        AdminCommand::Usage { day } => Call {
            query: Some(("day", day.clone())),
            ..Call::get(&["admin", "v1", "usage"])
        },
    }
}

/// The text a command prints for a successful answer `body`; `now_ms` (Unix ms) dates the
/// heartbeats.
pub fn render(command: &AdminCommand, body: &Value, now_ms: u64) -> String {
    match command {
        AdminCommand::Cluster => render_cluster(body, now_ms),
        AdminCommand::Rooms => render_rooms(body),
        AdminCommand::Room { .. } => render_room(body),
        AdminCommand::Migrate { .. } => render_moved(body),
        AdminCommand::Drain { node } => render_drain(body, node),
        AdminCommand::Viewer { .. } => render_viewer(body),
        AdminCommand::Migrations => render_migrations(body),
        AdminCommand::Usage { .. } => render_usage(body),
    }
}

/// Runs one command against `args.url` with `token`: prints the answer, returns the exit code.
pub fn run(args: &AdminArgs, token: &str) -> ExitCode {
    let base = match reqwest::Url::parse(&args.url) {
        Ok(url) if url.scheme() == "http" => url,
        Ok(url) => {
            eprintln!(
                "error: --url {:?}: only http:// is built in (not {}://); use the node's own HTTP address",
                args.url,
                url.scheme()
            );
            return ExitCode::from(EXIT_USAGE);
        }
        Err(error) => {
            eprintln!(
                "error: --url {:?} is not a URL like http://127.0.0.1:8080: {error}",
                args.url
            );
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let call = call_of(&args.command);
    let url = call.url(&base);
    let client = match reqwest::blocking::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT)
        .build()
    {
        Ok(client) => client,
        Err(error) => {
            eprintln!("error: no HTTP client: {}", error_chain(&error));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let mut request = match call.method {
        Method::Get => client.get(url.clone()),
        Method::Post => client.post(url.clone()),
    }
    .bearer_auth(token);
    if let Some(body) = &call.body {
        request = request.json(body);
    }
    let response = match request.send() {
        Ok(response) => response,
        Err(error) => {
            let what = if error.is_timeout() {
                format!("no answer from {base} within {} s", REQUEST_TIMEOUT.as_secs())
            } else {
                format!("cannot reach {base}")
            };
            eprintln!("error: {what}: {}", error_chain(&error));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let status = response.status();
    let body = match read_body(response) {
        Ok(body) => body,
        Err(error) => {
            eprintln!("error: {status} from {url}, but its body could not be read: {error}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if !status.is_success() {
        eprintln!(
            "{}",
            problem_line(status.as_u16(), status.canonical_reason().unwrap_or(""), &body)
        );
        return ExitCode::from(EXIT_API_ERROR);
    }
    let value = if body.trim().is_empty() {
        Value::Null
    } else {
        match serde_json::from_str::<Value>(&body) {
            Ok(value) => value,
            Err(error) => {
                eprintln!("error: {status} from {url}, but the body is not JSON: {error}");
                return ExitCode::from(EXIT_API_ERROR);
            }
        }
    };
    let text = if args.json {
        // The API's own body, untouched (serde_json would reorder its keys).
        format!("{}\n", body.trim())
    } else {
        render(&args.command, &value, now_ms())
    };
    // A closed stdout (`| head`) is not worth a panic; nothing more can be said there anyway.
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
    ExitCode::SUCCESS
}

fn read_body(response: reqwest::blocking::Response) -> Result<String, String> {
    let mut bytes = Vec::new();
    response
        .take(RESPONSE_BYTES_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > RESPONSE_BYTES_MAX {
        return Err(format!("larger than {RESPONSE_BYTES_MAX} bytes"));
    }
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// An error and its sources, `a: b: c` (reqwest's own message hides the cause).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let message = cause.to_string();
        if !text.contains(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        source = cause.source();
    }
    text
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `error: <status> <title>: <detail>` from a problem+json body; any other body is shown as its
/// first characters.
pub fn problem_line(status: u16, reason: &str, body: &str) -> String {
    let problem: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let title = problem["title"]
        .as_str()
        .map(clean)
        .unwrap_or_else(|| reason.to_string());
    let detail = match problem["detail"].as_str() {
        Some(detail) => clean(detail),
        None if problem.is_object() => String::new(),
        None => clean(body.trim()).chars().take(ERROR_BODY_CHARS_MAX).collect(),
    };
    let mut line = format!("error: {status}");
    if !title.is_empty() {
        line.push(' ');
        line.push_str(&title);
    }
    if !detail.is_empty() {
        line.push_str(": ");
        line.push_str(&detail);
    }
    line
}

// ---- rendering: JSON value -> text, pure ----

/// A server string made safe for a terminal: control characters (escape sequences in a
/// client-chosen name) become `?`.
fn clean(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { '?' } else { c }).collect()
}

/// Any JSON value as one cell: `-` for missing, null or empty.
fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => clean(s),
        Value::Bool(true) => "yes".into(),
        Value::Bool(false) => "no".into(),
        Value::Number(n) => n.to_string(),
        Value::Array(items) if items.is_empty() => "-".into(),
        Value::Array(items) => items.iter().map(text).collect::<Vec<_>>().join(", "),
        Value::Object(map) if map.is_empty() => "-".into(),
        Value::Object(map) => map
            .iter()
            .map(|(key, value)| format!("{}={}", clean(key), text(value)))
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// A count that is a number, or the length of a list of sessions.
fn count(value: &Value) -> String {
    match value {
        Value::Number(n) => n.to_string(),
        Value::Array(items) => items.len().to_string(),
        _ => "-".into(),
    }
}

fn count_u64(value: &Value) -> u64 {
    match value {
        Value::Array(items) => items.len() as u64,
        other => other.as_u64().unwrap_or(0),
    }
}

fn items(value: &Value) -> &[Value] {
    value.as_array().map_or(&[], Vec::as_slice)
}

/// Terminal columns a character takes: 2 for Hangul and other East Asian wide characters.
fn char_width(c: char) -> usize {
    let wide = matches!(c as u32,
        0x1100..=0x115F | 0x2E80..=0x303E | 0x3041..=0x33FF | 0x3400..=0x4DBF | 0x4E00..=0x9FFF
        | 0xA000..=0xA4CF | 0xAC00..=0xD7A3 | 0xF900..=0xFAFF | 0xFE30..=0xFE4F | 0xFF00..=0xFF60
        | 0xFFE0..=0xFFE6 | 0x20000..=0x3FFFD);
    if wide { 2 } else { 1 }
}

fn width(text: &str) -> usize {
    text.chars().map(char_width).sum()
}

/// A plain-text table: the header row, then the rows, columns padded to their widest cell,
/// no trailing spaces. Missing cells print as `-`; extra cells are dropped.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| width(h)).collect();
    for row in rows {
        for (column, cell) in row.iter().enumerate().take(header.len()) {
            widths[column] = widths[column].max(width(cell));
        }
    }
    let mut out = String::new();
    let mut push_row = |cells: Vec<&str>| {
        let mut line = String::new();
        for (column, cell) in cells.iter().enumerate() {
            line.push_str(cell);
            if column + 1 < cells.len() {
                let pad = widths[column] - width(cell) + COLUMN_GAP;
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    };
    push_row(header.to_vec());
    for row in rows {
        push_row(
            (0..header.len())
                .map(|column| row.get(column).map_or("-", String::as_str))
                .collect(),
        );
    }
    out
}

/// Bits per second for people: `0 bit/s`, `12.3 kbit/s`, `4.5 Mbit/s`.
pub fn format_bitrate(bps: &Value) -> String {
    let Some(bps) = bps.as_f64() else {
        return "-".into();
    };
    if bps < 1_000.0 {
        format!("{bps:.0} bit/s")
    } else if bps < 1_000_000.0 {
        format!("{:.1} kbit/s", bps / 1_000.0)
    } else if bps < 1_000_000_000.0 {
        format!("{:.1} Mbit/s", bps / 1_000_000.0)
    } else {
        format!("{:.2} Gbit/s", bps / 1_000_000_000.0)
    }
}

/// A CPU share (0.12) as a percentage (`12%`).
fn format_cpu(cpu: &Value) -> String {
    cpu.as_f64()
        .map_or_else(|| "-".into(), |cpu| format!("{:.0}%", cpu * 100.0))
}

/// Unix milliseconds of `2026-11-22T01:02:03.456Z` (UTC, `Z` or `+00:00`, fraction optional).
pub fn parse_rfc3339_ms(text: &str) -> Option<u64> {
    let text = text.strip_suffix('Z').or_else(|| text.strip_suffix("+00:00"))?;
    let (date, time) = text.split_once('T')?;
    let mut date = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (year, month, day) = (date.next()??, date.next()??, date.next()??);
    let (time, fraction) = time.split_once('.').unwrap_or((time, ""));
    let mut time = time.splitn(3, ':').map(|p| p.parse::<i64>().ok());
    let (hour, minute, second) = (time.next()??, time.next()??, time.next()??);
    let in_range = (1..=12).contains(&month)
        && (1..=31).contains(&day)
        && (0..=23).contains(&hour)
        && (0..=59).contains(&minute)
        && (0..=60).contains(&second);
    if !in_range {
        return None;
    }
    let millis: i64 = if fraction.is_empty() {
        0
    } else if fraction.bytes().all(|b| b.is_ascii_digit()) {
        format!("{:0<3}", &fraction[..fraction.len().min(3)]).parse().ok()?
    } else {
        return None;
    };
    let days = crate::clock::days_from_civil(year, month as u32, day as u32);
    let ms = ((days * 86_400 + hour * 3_600 + minute * 60 + second) * 1_000) + millis;
    u64::try_from(ms).ok()
}

/// How long ago `then_ms` was: `0.4s ago`, `25s ago`, `3m ago`, `5h ago`, `2d ago`.
pub fn format_age(now_ms: u64, then_ms: u64) -> String {
    // A clock a little ahead of ours is "just now", not the future.
    let ms = now_ms.saturating_sub(then_ms);
    let seconds = ms / 1_000;
    if seconds < 10 {
        format!("{:.1}s ago", ms as f64 / 1_000.0)
    } else if seconds < 120 {
        format!("{seconds}s ago")
    } else if seconds < 2 * 3_600 {
        format!("{}m ago", seconds / 60)
    } else if seconds < 2 * 86_400 {
        format!("{}h ago", seconds / 3_600)
    } else {
        format!("{}d ago", seconds / 86_400)
    }
}

fn unreachable_warning(body: &Value) -> String {
    let nodes: Vec<String> = items(&body["unreachable"]).iter().map(text).collect();
    if nodes.is_empty() {
        String::new()
    } else {
        format!(
            "warning: no answer from {}; their sessions are missing from the counts\n",
            nodes.join(", ")
        )
    }
}

/// `GET /admin/v1/cluster`: a summary line, then one row per node sorted by region then id.
pub fn render_cluster(body: &Value, now_ms: u64) -> String {
    let leader = body["leader"].as_str();
    let mut out = format!(
        "leader {}  term {}  commit index {}  applied {}  (answered by {})\n",
        leader.map_or_else(|| "none".to_string(), clean),
        text(&body["term"]),
        text(&body["commit_index"]),
        text(&body["applied_index"]),
        text(&body["node"]),
    );
    let mut nodes: Vec<&Value> = items(&body["nodes"]).iter().collect();
    nodes.sort_by_key(|node| (text(&node["region"]), text(&node["id"])));
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|node| {
            let is_leader = match node["leader"].as_bool() {
                Some(is_leader) => is_leader,
                // Before the per-node flag: the summary's leader id.
                None => leader.is_some() && node["id"].as_str() == leader,
            };
            let heartbeat = match node["last_heartbeat"].as_str() {
                Some(at) => parse_rfc3339_ms(at).map_or_else(|| clean(at), |at_ms| format_age(now_ms, at_ms)),
                None => "-".into(),
            };
            let load = &node["load"];
            vec![
                text(&node["id"]),
                text(&node["region"]),
                text(&node["state"]),
                if is_leader { "leader" } else { "follower" }.into(),
                text(&node["membership"]),
                format_cpu(&load["cpu"]),
                text(&load["connections"]),
                text(&load["rooms"]),
                format_bitrate(&load["egress_bps"]),
                heartbeat,
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "ID",
            "REGION",
            "STATE",
            "ROLE",
            "MEMBERSHIP",
            "CPU",
            "CONNS",
            "ROOMS",
            "EGRESS",
            "HEARTBEAT",
        ],
        &rows,
    ));
    out
}

/// `n1*:4 n3:8`: subscribers per node, `*` on the host.
fn nodes_cell(nodes: &Value) -> String {
    let cells: Vec<String> = items(nodes)
        .iter()
        .map(|node| {
            let star = if node["hosted"].as_bool() == Some(true) {
                "*"
            } else {
                ""
            };
            format!("{}{star}:{}", text(&node["node"]), count(&node["subscribers"]))
        })
        .collect();
    if cells.is_empty() { "-".into() } else { cells.join(" ") }
}

/// `GET /admin/v1/rooms`: one row per room, and a warning for nodes that did not answer.
pub fn render_rooms(body: &Value) -> String {
    let rooms = items(&body["rooms"]);
    let mut out = if rooms.is_empty() {
        "no rooms\n".to_string()
    } else {
        let rows: Vec<Vec<String>> = rooms
            .iter()
            .map(|room| {
                vec![
                    text(&room["room"]),
                    text(&room["node"]),
                    text(&room["region"]),
                    text(&room["epoch"]),
                    count(&room["publishers"]),
                    count(&room["subscribers"]),
                    nodes_cell(&room["nodes"]),
                ]
            })
            .collect();
        table(
            &["ROOM", "HOST", "REGION", "EPOCH", "PUBLISHERS", "SUBSCRIBERS", "NODES"],
            &rows,
        )
    };
    out.push_str(&unreachable_warning(body));
    out
}

/// `GET /admin/v1/rooms/{room}`: the placement, counts per node, the answering node's sessions.
pub fn render_room(body: &Value) -> String {
    let room = text(&body["room"]);
    let answered_by = text(&body["node"]);
    let placement = &body["placement"];
    let mut out = if placement.is_object() {
        format!(
            "room {room}: hosted by {} (epoch {})",
            text(&placement["node"]),
            text(&placement["epoch"])
        )
    } else {
        format!("room {room}: not placed")
    };
    if body["placement_stale"].as_bool() == Some(true) {
        out.push_str(&format!(
            " (from {answered_by}'s own replica: it could not reach a majority, this may be stale)"
        ));
    }
    out.push('\n');
    let role = match body["hosted"].as_bool() {
        Some(true) => "hosts it".to_string(),
        Some(false) => format!("relays it ({} tracks pulled)", text(&body["relayed_tracks"])),
        None => "-".to_string(),
    };
    out.push_str(&format!(
        "answered by {answered_by}: {role}, {} watchers\n\n",
        text(&body["watchers"])
    ));
    // Before the cluster-wide counts: the answering node's own.
    let own = [body.clone()];
    let nodes = match body["nodes"].as_array() {
        Some(nodes) => nodes.as_slice(),
        None => &own,
    };
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|node| {
            vec![
                text(&node["node"]),
                text(&node["hosted"]),
                count(&node["publishers"]),
                count(&node["subscribers"]),
                text(&node["watchers"]),
                text(&node["relayed_tracks"]),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "NODE",
            "HOSTED",
            "PUBLISHERS",
            "SUBSCRIBERS",
            "WATCHERS",
            "RELAYED-TRACKS",
        ],
        &rows,
    ));
    out.push('\n');
    let sessions: Vec<Vec<String>> = [("publisher", &body["publishers"]), ("subscriber", &body["subscribers"])]
        .into_iter()
        .flat_map(|(kind, list)| {
            items(list).iter().map(move |session| {
                vec![
                    text(&session["session"]),
                    kind.to_string(),
                    text(&session["identity"]),
                    text(&session["display_name"]),
                    text(&session["connected"]),
                    text(&session["tracks"]),
                ]
            })
        })
        .collect();
    if sessions.is_empty() {
        out.push_str(&format!("no sessions on {answered_by}\n"));
    } else {
        out.push_str(&format!("sessions on {answered_by}:\n"));
        out.push_str(&table(
            &["SESSION", "KIND", "IDENTITY", "NAME", "CONNECTED", "TRACKS"],
            &sessions,
        ));
    }
    out.push_str(&unreachable_warning(body));
    out
}

/// `POST /admin/v1/rooms/{room}/migrate`: `moved r1 from n2 to n3 (epoch 3) in 412 ms`.
pub fn render_moved(body: &Value) -> String {
    format!(
        "moved {} from {} to {} (epoch {}) in {} ms\n",
        text(&body["room"]),
        text(&body["from"]),
        text(&body["to"]),
        text(&body["epoch"]),
        text(&body["elapsed_ms"]),
    )
}

/// `POST /admin/v1/nodes/{id}/drain`: `draining n2` (`asked` when the body does not say).
pub fn render_drain(body: &Value, asked: &str) -> String {
    let node = body["node"].as_str().map_or_else(|| clean(asked), clean);
    format!("draining {node}\n")
}

/// A position as `1:23.456` (or `1:02:03.456` past an hour).
fn format_position(ms: u64) -> String {
    let (hours, minutes, seconds, millis) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1_000 % 60, ms % 1_000);
    if hours > 0 {
        format!("{hours}:{minutes:02}:{seconds:02}.{millis:03}")
    } else {
        format!("{minutes}:{seconds:02}.{millis:03}")
    }
}

/// `GET /admin/v1/viewers/{viewer}`: one `key  value` line per field.
pub fn render_viewer(body: &Value) -> String {
    let position = match body["position_ms"].as_u64() {
        Some(ms) => format!("{ms} ms ({})", format_position(ms)),
        None => text(&body["position_ms"]),
    };
    let pairs = [
        ("viewer", text(&body["viewer"])),
        ("room", text(&body["room"])),
        ("node", text(&body["node"])),
        ("session", text(&body["session"])),
        ("display name", text(&body["display_name"])),
        ("position", position),
        ("subscriptions", text(&body["subscriptions"])),
        ("layers", text(&body["layers"])),
        ("updated", text(&body["updated_at"])),
        ("expires", text(&body["expires_at"])),
        ("revision", text(&body["revision"])),
    ];
    let key_width = pairs.iter().map(|(key, _)| key.len()).max().unwrap_or(0);
    pairs
        .iter()
        .map(|(key, value)| format!("{key:<key_width$}  {value}\n"))
        .collect()
}

/// `GET /admin/v1/migrations`: in flight (oldest first), then the recent ones (newest first).
pub fn render_migrations(body: &Value) -> String {
    let row = |m: &Value, outcome: String| {
        vec![
            text(&m["room"]),
            text(&m["from"]),
            text(&m["to"]),
            outcome,
            text(&m["epoch"]),
            text(&m["elapsed_ms"]),
            text(&m["started_at"]),
        ]
    };
    let mut rows: Vec<Vec<String>> = items(&body["in_flight"])
        .iter()
        .map(|m| row(m, "in flight".into()))
        .collect();
    rows.extend(items(&body["recent"]).iter().map(|m| {
        let outcome = match (m["ok"].as_bool(), m["error"].as_str()) {
            (Some(true), _) => "moved".to_string(),
            (_, Some(error)) => format!("failed: {}", clean(error)),
            _ => "failed".to_string(),
        };
        row(m, outcome)
    }));
    let mut out = if rows.is_empty() {
        "no migrations\n".to_string()
    } else {
        table(&["ROOM", "FROM", "TO", "OUTCOME", "EPOCH", "MS", "STARTED"], &rows)
    };
    out.push_str(&unreachable_warning(body));
    out
}

/// `GET /admin/v1/usage?day=`: viewer-minutes and sessions per room, then the total.
pub fn render_usage(body: &Value) -> String {
    let mut out = format!(
        "usage on {} ({}): {} to {}\n",
        text(&body["day"]),
        text(&body["timezone"]),
        text(&body["from"]),
        text(&body["to"]),
    );
    // `+ 0.0` turns a negative zero (a sum of nothing) into `0.0`.
    let minutes = |value: &Value| {
        value
            .as_f64()
            .map_or_else(|| "-".to_string(), |m| format!("{:.1}", m + 0.0))
    };
    let rooms = items(&body["rooms"]);
    let mut rows: Vec<Vec<String>> = rooms
        .iter()
        .map(|room| {
            vec![
                text(&room["room"]),
                minutes(&room["viewer_minutes"]),
                text(&room["sessions"]),
            ]
        })
        .collect();
    let sessions: u64 = rooms.iter().map(|room| count_u64(&room["sessions"])).sum();
    rows.push(vec![
        "total".into(),
        minutes(&body["total_viewer_minutes"]),
        sessions.to_string(),
    ]);
    out.push_str(&table(&["ROOM", "VIEWER-MINUTES", "SESSIONS"], &rows));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn lines(text: &str) -> Vec<&str> {
        text.lines().collect()
    }

    #[test]
    fn a_table_pads_columns_to_the_widest_cell_without_trailing_spaces() {
        let out = table(
            &["ID", "REGION", "N"],
            &[
                vec!["n1".into(), "seoul".into(), "3".into()],
                vec!["node-22".into(), "-".into()],
            ],
        );
        assert_eq!(out, "ID       REGION  N\nn1       seoul   3\nnode-22  -       -\n");
    }

    #[test]
    fn hangul_takes_two_columns() {
        let out = table(
            &["NAME", "X"],
            &[vec!["김민수".into(), "1".into()], vec!["Kim*Su".into(), "2".into()]],
        );
        assert_eq!(lines(&out), ["NAME    X", "김민수  1", "Kim*Su  2"]);
    }

    #[test]
    fn control_characters_from_the_server_do_not_reach_the_terminal() {
        assert_eq!(text(&json!("a\u{1b}[31mb\n")), "a?[31mb?");
    }

    fn cluster_body() -> Value {
        json!({
            "node": "n2", "leader": "n1", "term": 3, "commit_index": 120, "applied_index": 119,
            "snapshot_index": 0, "digest": "ab",
            "nodes": [
                { "id": "n3", "region": "busan", "state": "alive", "membership": "voter", "leader": false,
                  "load": { "cpu": 0.5, "connections": 7, "egress_bps": 2_500_000, "rooms": 1 },
                  "last_heartbeat": "2026-11-22T01:02:03.000Z" },
                { "id": "n2", "region": "seoul", "state": "draining", "membership": "voter", "leader": false,
                  "load": { "cpu": 0.0, "connections": 0, "egress_bps": 0, "rooms": 0 },
                  "last_heartbeat": "2026-11-22T01:02:00.000Z" },
                { "id": "n1", "region": "seoul", "state": "alive", "membership": "voter", "leader": true,
                  "load": { "cpu": 0.123, "connections": 5, "egress_bps": 123_456, "rooms": 2 },
                  "last_heartbeat": "2026-11-22T01:02:03.200Z" }
            ]
        })
    }

    #[test]
    fn cluster_shows_the_leader_and_sorts_nodes_by_region_then_id() {
        let now = parse_rfc3339_ms("2026-11-22T01:02:03.500Z").expect("time");
        let out = render_cluster(&cluster_body(), now);
        assert_eq!(
            lines(&out),
            [
                "leader n1  term 3  commit index 120  applied 119  (answered by n2)",
                "ID  REGION  STATE     ROLE      MEMBERSHIP  CPU  CONNS  ROOMS  EGRESS        HEARTBEAT",
                "n3  busan   alive     follower  voter       50%  7      1      2.5 Mbit/s    0.5s ago",
                "n1  seoul   alive     leader    voter       12%  5      2      123.5 kbit/s  0.3s ago",
                "n2  seoul   draining  follower  voter       0%   0      0      0 bit/s       3.5s ago",
            ]
        );
    }

    #[test]
    fn cluster_without_per_node_leader_flags_takes_the_summary_leader() {
        let mut body = cluster_body();
        for node in body["nodes"].as_array_mut().expect("nodes") {
            node.as_object_mut().expect("node").remove("leader");
        }
        let out = render_cluster(&body, 0);
        let leaders: Vec<&str> = out.lines().filter(|l| l.contains(" leader ")).collect();
        assert_eq!(leaders.len(), 1, "{out}");
        assert!(leaders[0].starts_with("n1 "), "{out}");
    }

    #[test]
    fn odd_json_prints_dashes_and_never_panics() {
        for body in [
            json!(null),
            json!([1, 2]),
            json!("x"),
            json!({ "nodes": [null, 3, { "load": 5 }] }),
        ] {
            for command in [
                AdminCommand::Cluster,
                AdminCommand::Rooms,
                AdminCommand::Room { room: "r".into() },
                AdminCommand::Migrate {
                    room: "r".into(),
                    to: "n".into(),
                },
                AdminCommand::Drain { node: "n2".into() },
                AdminCommand::Viewer { viewer: "v".into() },
                AdminCommand::Migrations,
                AdminCommand::Usage {
                    day: "2026-11-22".into(),
                },
            ] {
                let out = render(&command, &body, 0);
                assert!(!out.is_empty());
            }
        }
        let out = render_cluster(&json!({ "nodes": [{ "id": "n1" }] }), 0);
        assert_eq!(
            out.lines().nth(2),
            Some("n1  -       -      follower  -           -    -      -      -       -")
        );
        assert_eq!(render_moved(&json!({})), "moved - from - to - (epoch -) in - ms\n");
        assert_eq!(render_drain(&json!(null), "n2"), "draining n2\n");
    }

    #[test]
    fn rooms_show_host_and_subscribers_per_node_with_the_host_starred() {
        let body = json!({
            "rooms": [
                { "room": "r1", "node": "n2", "epoch": 2, "region": "busan", "publishers": 1, "subscribers": 12,
                  "watchers": 3,
                  "nodes": [
                    { "node": "n2", "hosted": true, "publishers": 1, "subscribers": 4, "watchers": 1, "relayed_tracks": 0 },
                    { "node": "n3", "hosted": false, "publishers": 0, "subscribers": 8, "watchers": 2, "relayed_tracks": 2 }
                  ] },
                { "room": "r2", "node": null, "epoch": 0, "region": null, "publishers": 0, "subscribers": 0, "nodes": [] }
            ],
            "unreachable": ["n4"]
        });
        assert_eq!(
            lines(&render_rooms(&body)),
            [
                "ROOM  HOST  REGION  EPOCH  PUBLISHERS  SUBSCRIBERS  NODES",
                "r1    n2    busan   2      1           12           n2*:4 n3:8",
                "r2    -     -       0      0           0            -",
                "warning: no answer from n4; their sessions are missing from the counts",
            ]
        );
        assert_eq!(render_rooms(&json!({ "rooms": [] })), "no rooms\n");
    }

    #[test]
    fn a_room_shows_placement_nodes_and_sessions() {
        let body = json!({
            "room": "r1", "node": "n1", "epoch": 2, "hosted": false, "relayed_tracks": 2, "watchers": 1,
            "publishers": [],
            "subscribers": [ { "session": "s-1", "identity": "Kim*Su", "display_name": null, "connected": true, "tracks": 2 } ],
            "placement": { "node": "n2", "epoch": 2 },
            "placement_stale": false,
            "nodes": [
                { "node": "n1", "hosted": false, "publishers": 0, "subscribers": 1, "watchers": 1, "relayed_tracks": 2 },
                { "node": "n2", "hosted": true, "publishers": 1, "subscribers": 0, "watchers": 0, "relayed_tracks": 0 }
            ],
            "unreachable": []
        });
        assert_eq!(
            lines(&render_room(&body)),
            [
                "room r1: hosted by n2 (epoch 2)",
                "answered by n1: relays it (2 tracks pulled), 1 watchers",
                "",
                "NODE  HOSTED  PUBLISHERS  SUBSCRIBERS  WATCHERS  RELAYED-TRACKS",
                "n1    no      0           1            1         2",
                "n2    yes     1           0            0         0",
                "",
                "sessions on n1:",
                "SESSION  KIND        IDENTITY  NAME  CONNECTED  TRACKS",
                "s-1      subscriber  Kim*Su    -     yes        2",
            ]
        );
    }

    #[test]
    fn a_room_without_cluster_counts_shows_the_answering_node_and_a_stale_placement_says_so() {
        let body = json!({
            "room": "r1", "node": "n2", "hosted": true, "relayed_tracks": 0, "watchers": 0,
            "publishers": [ { "session": "p", "identity": "alice", "connected": true, "tracks": 2 } ],
            "subscribers": [],
            "placement": { "node": "n2", "epoch": 1 }, "placement_stale": true
        });
        let out = render_room(&body);
        assert!(
            out.starts_with("room r1: hosted by n2 (epoch 1) (from n2's own replica"),
            "{out}"
        );
        assert!(out.contains("\nn2    yes     1           0"), "{out}");
        assert!(
            out.contains("\np        publisher  alice     -     yes        2\n"),
            "{out}"
        );
        let unplaced = render_room(&json!({ "room": "r9", "node": "n1", "publishers": [], "subscribers": [] }));
        assert!(unplaced.starts_with("room r9: not placed\n"), "{unplaced}");
        assert!(unplaced.contains("no sessions on n1"), "{unplaced}");
    }

    #[test]
    fn migrate_prints_one_line() {
        let body = json!({ "room": "r1", "from": "n2", "to": "n3", "epoch": 3, "elapsed_ms": 412 });
        assert_eq!(render_moved(&body), "moved r1 from n2 to n3 (epoch 3) in 412 ms\n");
        assert_eq!(
            render_drain(&json!({ "node": "n2", "draining": true }), "x"),
            "draining n2\n"
        );
    }

    #[test]
    fn a_viewer_prints_aligned_key_value_lines() {
        let body = json!({
            "viewer": "v1", "room": "r1", "node": "n1", "session": "s", "display_name": "Kim*Su",
            "position_ms": 83_456, "subscriptions": ["a/1", "a/2"], "layers": { "a/1": "h" },
            "updated_at": "2026-11-22T01:02:03.456Z", "expires_at": "2026-11-22T01:07:03.456Z", "revision": 4
        });
        assert_eq!(
            lines(&render_viewer(&body)),
            [
                "viewer         v1",
                "room           r1",
                "node           n1",
                "session        s",
                "display name   Kim*Su",
                "position       83456 ms (1:23.456)",
                "subscriptions  a/1, a/2",
                "layers         a/1=h",
                "updated        2026-11-22T01:02:03.456Z",
                "expires        2026-11-22T01:07:03.456Z",
                "revision       4",
            ]
        );
        assert_eq!(format_position(3_723_004), "1:02:03.004");
    }

    #[test]
    fn migrations_list_in_flight_then_recent_with_their_outcome() {
        let body = json!({
            "in_flight": [{"room": "a", "from": "n1", "to": "n2", "started_at": "2026-11-22T01:00:00.000Z",
                           "elapsed_ms": 120, "epoch": 0, "ok": false, "error": null}],
            "recent": [
                {"room": "b", "from": "n2", "to": "n3", "epoch": 4, "elapsed_ms": 412, "ok": true, "error": null},
                {"room": "c", "from": "n2", "to": "n1", "epoch": 0, "elapsed_ms": 5000, "ok": false,
                 "error": "handoff timed out"},
            ],
            "unreachable": ["n4"],
        });
        let out = render_migrations(&body);
        let lines = lines(&out);
        assert!(lines[0].starts_with("ROOM") && lines[1].contains("in flight"), "{out}");
        assert!(lines[2].contains("moved") && lines[2].contains("412"), "{out}");
        assert!(lines[3].contains("failed: handoff timed out"), "{out}");
        assert!(out.contains("n4"), "{out}");
        assert_eq!(render_migrations(&json!({})), "no migrations\n");
    }

    #[test]
    fn usage_lists_rooms_and_a_total() {
        let body = json!({
            "day": "2026-11-22", "timezone": "UTC+09:00 (KST)",
            "from": "2026-11-21T15:00:00Z", "to": "2026-11-22T15:00:00Z",
            "rooms": [
                { "room": "r1", "viewer_minutes": 12.5, "viewer_ms": 750_000, "sessions": 3 },
                { "room": "r2", "viewer_minutes": 0.25, "viewer_ms": 15_000, "sessions": 1 }
            ],
            "total_viewer_minutes": 12.75
        });
        assert_eq!(
            lines(&render_usage(&body)),
            [
                "usage on 2026-11-22 (UTC+09:00 (KST)): 2026-11-21T15:00:00Z to 2026-11-22T15:00:00Z",
                "ROOM   VIEWER-MINUTES  SESSIONS",
                "r1     12.5            3",
                "r2     0.2             1",
                "total  12.8            4",
            ]
        );
        let nothing = json!({ "day": "2026-11-22", "rooms": [], "total_viewer_minutes": -0.0 });
        assert!(
            render_usage(&nothing).ends_with("\ntotal  0.0             0\n"),
            "{}",
            render_usage(&nothing)
        );
    }

    #[test]
    fn problem_json_becomes_one_error_line() {
        let body = r#"{"type":"about:blank","title":"Not Found","status":404,"detail":"no room \"x\""}"#;
        assert_eq!(
            problem_line(404, "Not Found", body),
            "error: 404 Not Found: no room \"x\""
        );
        assert_eq!(problem_line(404, "Not Found", ""), "error: 404 Not Found");
        assert_eq!(
            problem_line(502, "Bad Gateway", "<html>oops</html>\n"),
            "error: 502 Bad Gateway: <html>oops</html>"
        );
        assert_eq!(
            problem_line(401, "Unauthorized", r#"{"title":"Unauthorized"}"#),
            "error: 401 Unauthorized"
        );
    }

    #[test]
    fn rfc3339_parses_to_unix_ms_and_ages_read_naturally() {
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339_ms("2026-11-22T01:02:55.123Z"), Some(1_795_309_375_123));
        assert_eq!(parse_rfc3339_ms("2000-02-29T00:00:00.000+00:00"), Some(951_782_400_000));
        assert_eq!(parse_rfc3339_ms("2026-11-22T01:02:55.5Z"), Some(1_795_309_375_500));
        for bad in [
            "",
            "2026-11-22",
            "2026-13-01T00:00:00Z",
            "2026-11-22T01:02:03+09:00",
            "2026-11-22T-1:02:03Z",
            "xT1:2:3Z",
        ] {
            assert_eq!(parse_rfc3339_ms(bad), None, "{bad}");
        }
        assert_eq!(format_age(10_000, 9_600), "0.4s ago");
        assert_eq!(format_age(9_000, 10_000), "0.0s ago");
        assert_eq!(format_age(100_000, 0), "100s ago");
        assert_eq!(format_age(600_000, 0), "10m ago");
        assert_eq!(format_age(3 * 86_400_000, 0), "3d ago");
    }

    #[test]
    fn bitrates_read_naturally() {
        assert_eq!(format_bitrate(&json!(999)), "999 bit/s");
        assert_eq!(format_bitrate(&json!(12_345)), "12.3 kbit/s");
        assert_eq!(format_bitrate(&json!(4_500_000)), "4.5 Mbit/s");
        assert_eq!(format_bitrate(&json!(2_000_000_000u64)), "2.00 Gbit/s");
        assert_eq!(format_bitrate(&json!(null)), "-");
    }

    #[test]
    fn calls_encode_their_path_and_keep_the_base_path() {
        let base = reqwest::Url::parse("http://127.0.0.1:8080/mesh/?x=1").expect("url");
        let call = call_of(&AdminCommand::Migrate {
            room: "a/b c".into(),
            to: "n3".into(),
        });
        assert_eq!(call.method, Method::Post);
        assert_eq!(call.body, Some(json!({ "to": "n3" })));
        assert_eq!(
            call.url(&base).as_str(),
            "http://127.0.0.1:8080/mesh/admin/v1/rooms/a%2Fb%20c/migrate"
        );
        let usage = call_of(&AdminCommand::Usage {
            day: "2026-11-22".into(),
        });
        let base = reqwest::Url::parse("http://h:1").expect("url");
        assert_eq!(usage.url(&base).as_str(), "http://h:1/admin/v1/usage?day=2026-11-22");
        let drain = call_of(&AdminCommand::Drain { node: "n2".into() });
        assert_eq!(
            (drain.method, drain.url(&base).as_str().to_string(), drain.body),
            (Method::Post, "http://h:1/admin/v1/nodes/n2/drain".to_string(), None)
        );
    }

    #[test]
    fn days_are_checked_before_asking() {
        assert_eq!(parse_day("2026-11-22"), Ok("2026-11-22".into()));
        for bad in [
            "2026-1-22",
            "2026-13-01",
            "2026-11-32",
            "2026-02-30",
            "2026/11/22",
            "today",
            "2026-11-2x",
        ] {
            assert!(parse_day(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_minted_token_is_an_admin_token_that_expires_in_minutes() {
        let token = mint_admin_token("a-secret-of-enough-length");
        let claims = TokenKeys::new("a-secret-of-enough-length")
            .authorize(&token, crate::auth::Grant::Admin, None)
            .expect("admin");
        let now = now_ms() / 1_000;
        assert!(claims.exp > now && claims.exp <= now + MINTED_TOKEN_TTL.as_secs() + 1);
    }
}
