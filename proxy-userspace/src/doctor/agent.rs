//! Whether an agent holds the pins, and whether it syncs: its /healthz.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, SystemTime},
};

use super::{Check, Context, Status};

pub(super) fn agent(cx: &Context) -> Check {
    const NAME: &str = "agent";
    let root = cx.pins.root().display();
    match cx.holder {
        Some(pid) => {
            let command = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            Check::ok(NAME, format!("{} (pid {pid}) holds {root}", command.trim()))
        }
        None if !cx.pins.root().exists() => Check::problem(
            NAME,
            Status::Fail,
            format!("no datapath at {root}: the agent never ran with this --bpffs"),
            cx.restart.clone(),
        ),
        None => Check::problem(
            NAME,
            Status::Fail,
            format!(
                "no agent holds {root}: the pinned datapath serves what it last had, and nothing updates it"
            ),
            cx.restart.clone(),
        ),
    }
}

/// kube-proxy's `/healthz` body, as far as it is read here.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Healthz {
    #[serde(default)]
    last_updated: String,
    reason: Option<String>,
}

pub(super) fn sync(cx: &Context) -> Check {
    const NAME: &str = "sync";
    let address = cx.args.healthz_address;
    let (status, body) = match http_get(address, "/healthz") {
        Ok(answer) => answer,
        Err(error) => {
            return Check::problem(
                NAME,
                Status::Fail,
                format!("no answer from /healthz at {address}: {error}"),
                if cx.holder.is_some() {
                    "pass the agent's --healthz-bind-address as --healthz-address".to_owned()
                } else {
                    cx.restart.clone()
                },
            );
        }
    };
    let health: Option<Healthz> = serde_json::from_str(&body).ok();
    let age = health
        .as_ref()
        .and_then(|h| h.last_updated.parse::<k8s_openapi::jiff::Timestamp>().ok())
        .and_then(|t| {
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .ok()?;
            Some(
                now.as_secs()
                    .saturating_sub(u64::try_from(t.as_second()).ok()?),
            )
        })
        .map_or_else(
            || "no sync yet".to_owned(),
            |age| format!("last sync {age}s ago"),
        );
    if status == 200 {
        return Check::ok(NAME, format!("/healthz 200 at {address}: {age}"));
    }
    let reason = health
        .and_then(|h| h.reason)
        .unwrap_or_else(|| body.trim().to_owned());
    Check::problem(
        NAME,
        Status::Fail,
        format!("/healthz {status} at {address}: {reason} ({age})"),
        "read the agent's log for the failing writes or the Node's deletion; the source check below says whether the source answers",
    )
}

/// One GET, one answer: the agent's responder serves one request per
/// connection.
fn http_get(address: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let timeout = Duration::from_secs(2);
    let mut stream = TcpStream::connect_timeout(&address, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.take(64 * 1024).read_to_string(&mut response)?;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("not an HTTP answer"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}
