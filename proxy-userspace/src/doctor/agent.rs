//! Whether an agent holds the pins, and whether it syncs: its /healthz.

use std::{
    fs,
    time::{Duration, SystemTime},
};

use super::{Check, Context, Status};
use crate::{http_get::http_get, report::chain};

/// How long the whole exchange with /healthz may take.
const HEALTHZ_TIMEOUT: Duration = Duration::from_secs(2);
/// The most of a /healthz body read: the agent's is a short JSON object.
const HEALTHZ_BODY_LIMIT: usize = 64 * 1024;

pub(super) fn agent(cx: &Context) -> Check {
    const NAME: &str = "agent";
    let root = cx.pins.root().display();
    let check = match cx.holder {
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
    };
    check.with_details(vec![format!("checked with {}", cx.args.origin)])
}

/// kube-proxy's `/healthz` body, as far as it is read here.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Healthz {
    #[serde(default)]
    last_updated: String,
    reason: Option<String>,
}

pub(super) async fn sync(cx: &Context<'_>) -> Check {
    const NAME: &str = "sync";
    let address = cx.args.healthz_address;
    let (status, body) =
        match http_get(address, "/healthz", HEALTHZ_TIMEOUT, HEALTHZ_BODY_LIMIT).await {
            Ok(answer) => answer,
            Err(error) => {
                return Check::problem(
                    NAME,
                    Status::Fail,
                    format!("no answer from /healthz at {address}: {}", chain(&*error)),
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
