//! The command-line front end, wired into the `roomcast` binary as
//! `roomcast sub ROOM`, `roomcast pub ROOM DATA`, `roomcast history ROOM`,
//! `roomcast presence ROOM`.
//!
//! Output on stdout is one JSON value per line; notices go to stderr.

use std::io::Write;

use serde::Serialize;
use serde_json::value::RawValue;

use crate::{Client, ClientError, Data, Encoding, HistoryOptions, Member, Publication, SubscriptionEvent};

/// How to reach the cluster (shared by every subcommand).
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct ConnArgs {
    /// Node WebSocket URL; several (comma-separated or repeated) are tried in turn.
    #[arg(long, env = "ROOMCAST_URL", default_value = "ws://127.0.0.1:8000/ws", value_delimiter = ',')]
    pub url: Vec<String>,
    /// Connection token (JWT).
    #[arg(long, env = "ROOMCAST_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Use MessagePack instead of JSON on the wire.
    #[arg(long)]
    pub msgpack: bool,
}

/// The client subcommands.
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum CliCommand {
    /// Subscribe to a room and print each publication as a JSON line
    /// `{"room":..,"offset":..,"data":..}` until Ctrl-C.
    Sub {
        room: String,
        /// Exit after this many publications.
        #[arg(long)]
        count: Option<u64>,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Publish DATA (JSON; text that is not JSON is sent as a JSON string) and print the
    /// position `{"offset":..,"epoch":..}` (`null` in rooms without history).
    Pub {
        room: String,
        data: String,
        /// Do not push the publication back to this connection.
        #[arg(long)]
        skip_self: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Print a room's kept publications as JSON lines, oldest first.
    History {
        room: String,
        /// At most this many.
        #[arg(long)]
        limit: Option<u64>,
        /// Newest first.
        #[arg(long)]
        reverse: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Print a room's members as JSON lines `{"client":..,"user":..,"info":..}`.
    Presence {
        room: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
}

/// Runs a subcommand, printing to stdout.
pub async fn run(cmd: CliCommand) -> Result<(), ClientError> {
    let mut out = std::io::stdout();
    match run_with(cmd, &mut out).await {
        Err(ClientError::Io(e)) if e.contains("Broken pipe") => Ok(()),
        r => r,
    }
}

/// Runs a subcommand, printing to `out`.
pub async fn run_with(cmd: CliCommand, out: &mut (dyn Write + Send)) -> Result<(), ClientError> {
    match cmd {
        CliCommand::Sub { room, count, conn } => {
            let client = connect(&conn).await?;
            let r = sub(&client, &room, count, out).await;
            client.close().await;
            r
        }
        CliCommand::Pub { room, data, skip_self, conn } => {
            let data = parse_data(&data)?;
            let client = connect(&conn).await?;
            let first = if skip_self {
                client.publish_skip_self(&room, data.clone()).await
            } else {
                client.publish(&room, data.clone()).await
            };
            let r = match first {
                // The namespace lets only subscribers publish: subscribe, then publish
                // without receiving our own message.
                Err(e) if e.server_code() == Some(103) => match client.subscribe(&room).await {
                    Ok(_sub) => client.publish_skip_self(&room, data).await,
                    Err(_) => Err(e),
                },
                r => r,
            };
            client.close().await;
            let line = r?.map(|p| PositionLine { offset: p.offset, epoch: p.epoch });
            let text = serde_json::to_string(&line).map_err(|e| ClientError::Protocol(e.to_string()))?;
            writeln!(out, "{text}")?;
            out.flush()?;
            Ok(())
        }
        CliCommand::History { room, limit, reverse, conn } => {
            let client = connect(&conn).await?;
            let opts = HistoryOptions { since: None, limit, reverse };
            let r = client.history(&room, opts).await;
            client.close().await;
            let h = r?;
            eprintln!("{room}: offset {} epoch {}", h.position.offset, h.position.epoch);
            for p in &h.publications {
                write_publication(out, p)?;
            }
            out.flush()?;
            Ok(())
        }
        CliCommand::Presence { room, conn } => {
            let client = connect(&conn).await?;
            let r = client.presence(&room).await;
            client.close().await;
            for m in r? {
                write_member(out, &m)?;
            }
            out.flush()?;
            Ok(())
        }
    }
}

async fn connect(conn: &ConnArgs) -> Result<Client, ClientError> {
    Client::builder(conn.url.clone())
        .maybe_token(conn.token.clone())
        .encoding(if conn.msgpack { Encoding::Msgpack } else { Encoding::Json })
        .name("roomcast-cli")
        .connect()
        .await
}

async fn sub(
    client: &Client,
    room: &str,
    count: Option<u64>,
    out: &mut (dyn Write + Send),
) -> Result<(), ClientError> {
    if count == Some(0) {
        return Ok(());
    }
    let mut sub = client.subscribe(room).await?;
    let mut seen = 0u64;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let ev = tokio::select! {
            _ = &mut ctrl_c => return Ok(()),
            ev = sub.next() => ev,
        };
        match ev {
            Some(SubscriptionEvent::Publication(p)) => {
                write_publication(out, &p)?;
                out.flush()?;
                seen += 1;
                if count.is_some_and(|c| seen >= c) {
                    return Ok(());
                }
            }
            Some(SubscriptionEvent::Subscribed { recovered, position, .. }) => {
                let at = position.map(|p| format!(" at offset {} epoch {}", p.offset, p.epoch));
                let how = match recovered {
                    Some(true) => " (recovered)",
                    Some(false) => " (NOT recovered: publications were missed)",
                    None => "",
                };
                eprintln!("subscribed to {room}{}{how}", at.unwrap_or_default());
            }
            Some(SubscriptionEvent::Join(m)) => eprintln!("join {room}: {} ({})", m.client, m.user),
            Some(SubscriptionEvent::Leave(m)) => eprintln!("leave {room}: {} ({})", m.client, m.user),
            Some(SubscriptionEvent::Unsubscribed { code, reason }) => {
                return Err(ClientError::Closed { code, reason });
            }
            None => return Err(ClientError::closed_locally()),
        }
    }
}

/// `data` as JSON if it parses, else as a JSON string.
pub fn parse_data(text: &str) -> Result<Data, ClientError> {
    match Data::from_json(text.to_string()) {
        Ok(d) => Ok(d),
        Err(_) => Ok(Data::from_serialize(&text)?),
    }
}

fn raw(data: &Data) -> Result<&RawValue, ClientError> {
    let json = data.json()?;
    let text = std::str::from_utf8(json).map_err(|e| ClientError::Protocol(e.to_string()))?;
    serde_json::from_str(text).map_err(|e| ClientError::Protocol(e.to_string()))
}

#[derive(Serialize)]
struct PositionLine {
    offset: u64,
    epoch: String,
}

#[derive(Serialize)]
struct PublicationLine<'a> {
    room: &'a str,
    offset: Option<u64>,
    data: &'a RawValue,
}

fn write_publication(out: &mut (dyn Write + Send), p: &Publication) -> Result<(), ClientError> {
    let line = PublicationLine { room: &p.room, offset: p.offset, data: raw(&p.data)? };
    let text = serde_json::to_string(&line).map_err(|e| ClientError::Protocol(e.to_string()))?;
    writeln!(out, "{text}")?;
    Ok(())
}

#[derive(Serialize)]
struct MemberLine<'a> {
    client: &'a str,
    user: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    info: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    room_info: Option<&'a RawValue>,
}

fn write_member(out: &mut (dyn Write + Send), m: &Member) -> Result<(), ClientError> {
    let line = MemberLine {
        client: &m.client,
        user: &m.user,
        info: m.info.as_ref().map(raw).transpose()?,
        room_info: m.room_info.as_ref().map(raw).transpose()?,
    };
    let text = serde_json::to_string(&line).map_err(|e| ClientError::Protocol(e.to_string()))?;
    writeln!(out, "{text}")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(subcommand)]
        cmd: CliCommand,
    }

    #[test]
    fn parses_subcommands_with_shared_connection_flags() {
        let c = Cli::try_parse_from(["roomcast", "sub", "chat:a", "--count", "3", "--msgpack"]).unwrap();
        match c.cmd {
            CliCommand::Sub { room, count, conn } => {
                assert_eq!(room, "chat:a");
                assert_eq!(count, Some(3));
                assert!(conn.msgpack);
                assert!(!conn.url.is_empty());
            }
            other => panic!("{other:?}"),
        }
        let c = Cli::try_parse_from([
            "roomcast",
            "pub",
            "r",
            "hello",
            "--url",
            "ws://a/ws,ws://b/ws",
            "--token",
            "t",
        ])
        .unwrap();
        match c.cmd {
            CliCommand::Pub { data, conn, .. } => {
                assert_eq!(data, "hello");
                assert_eq!(conn.url, ["ws://a/ws", "ws://b/ws"]);
                assert_eq!(conn.token.as_deref(), Some("t"));
            }
            other => panic!("{other:?}"),
        }
        let c = Cli::try_parse_from(["roomcast", "history", "r", "--limit", "5"]).unwrap();
        assert!(matches!(c.cmd, CliCommand::History { limit: Some(5), .. }));
        assert!(Cli::try_parse_from(["roomcast", "presence", "r"]).is_ok());
    }

    #[test]
    fn data_is_json_or_a_json_string() {
        assert_eq!(
            parse_data("{\"a\":1}").unwrap().decode::<serde_json::Value>().unwrap(),
            serde_json::json!({"a":1})
        );
        assert_eq!(parse_data("12").unwrap().decode::<serde_json::Value>().unwrap(), serde_json::json!(12));
        assert_eq!(parse_data("hello world").unwrap().decode::<String>().unwrap(), "hello world");
    }

    #[test]
    fn publication_lines() {
        let p = Publication {
            room: "r".into(),
            offset: Some(4),
            data: Data::from_json("{\"x\": [1, 2]}").unwrap(),
            info: None,
        };
        let mut out = Vec::new();
        write_publication(&mut out, &p).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\"room\":\"r\",\"offset\":4,\"data\":{\"x\": [1, 2]}}\n"
        );
    }
}
