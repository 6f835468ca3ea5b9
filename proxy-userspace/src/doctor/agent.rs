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
            Check::ok(NAME, format!("{} holds {root}", command.trim()))
                .with_volatile(vec![format!("pid {pid}")])
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
        return Check::ok(NAME, format!("/healthz 200 at {address}")).with_volatile(vec![age]);
    }
    let reason = health
        .and_then(|h| h.reason)
        .unwrap_or_else(|| body.trim().to_owned());
    let stable_reason = without_seconds(&reason);
    let mut volatile = vec![age];
    if stable_reason != reason {
        volatile.push(reason);
    }
    Check::problem(
        NAME,
        Status::Fail,
        format!("/healthz {status} at {address}: {stable_reason}"),
        "read the agent's log for the failing writes or the Node's deletion; the source check below says whether the source answers",
    )
    .with_volatile(volatile)
}

/// `text` with each duration in seconds (`12s`) as `Ns`: the agent's
/// reasons count how long a problem has lasted, which changes every second.
fn without_seconds(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find(|c: char| c.is_ascii_digit()) {
        let digits = rest[start..]
            .find(|c: char| !c.is_ascii_digit())
            .map_or(rest.len(), |end| start + end);
        let after = &rest[digits..];
        let starts_word = !rest[..start]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '.' || c == ':');
        let is_seconds =
            after.starts_with('s') && !after[1..].chars().next().is_some_and(char::is_alphanumeric);
        out.push_str(&rest[..start]);
        out.push_str(if starts_word && is_seconds {
            "N"
        } else {
            &rest[start..digits]
        });
        rest = after;
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_seconds_are_masked_and_nothing_else() {
        assert_eq!(
            without_seconds("changes have waited 12s to reach the maps"),
            "changes have waited Ns to reach the maps"
        );
        assert_eq!(
            without_seconds("failing for 3s: 10.96.0.10:80s refused, 2 files, v6s 7"),
            "failing for Ns: 10.96.0.10:80s refused, 2 files, v6s 7"
        );
        assert_eq!(without_seconds("5s"), "Ns");
        assert_eq!(without_seconds(""), "");
    }
}
