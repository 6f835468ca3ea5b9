//! The real kube client and watchers against the test API server, which
//! speaks the real list/watch protocol: what the agent is told, event by
//! event.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::mpsc::UnboundedReceiver;
use xtask::apiserver::{ApiServer, Counters, Resource};

use super::*;

const NODE: &str = "node-1";
/// Long enough for the watchers' backoff (0.8 s, doubling) to retry twice.
const WAIT: Duration = Duration::from_secs(10);

fn service(name: &str, port: u16) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": port, "protocol": "TCP"}]},
    })
}

fn slice(name: &str, service: &str, address: &str) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "ports": [{"port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [address], "conditions": {"ready": true}}],
    })
}

fn node(name: &str, zone: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.1"}]},
    })
}

/// A server holding Services `a` and `b` with a slice each, our Node and
/// another one.
fn populated_server() -> ApiServer {
    let server = ApiServer::start().unwrap();
    for (name, port) in [("a", 80), ("b", 81)] {
        server.apply(service(name, port)).unwrap();
        server
            .apply(slice(&format!("{name}-1"), name, "10.244.0.1"))
            .unwrap();
    }
    server.apply(node(NODE, "zone-a")).unwrap();
    server.apply(node("node-2", "zone-b")).unwrap();
    server
}

async fn start(server: &ApiServer, page_size: u32) -> UnboundedReceiver<SourceEvent> {
    let source = KubeSource::new(Some(server.kubeconfig()), NODE)
        .await
        .unwrap()
        .with_page_size(page_size);
    let (sink, events) = EventSink::channel();
    Box::new(source).start(sink).unwrap();
    events
}

async fn next(events: &mut UnboundedReceiver<SourceEvent>) -> SourceEvent {
    tokio::time::timeout(WAIT, events.recv())
        .await
        .expect("no event in time")
        .expect("the source stopped")
}

/// The `Changes` batches up to `Synced`, which must come with nothing
/// amiss on the way.
async fn until_synced(events: &mut UnboundedReceiver<SourceEvent>) -> Vec<Vec<Change>> {
    let mut batches = Vec::new();
    loop {
        match next(events).await {
            SourceEvent::Changes(changes) => batches.push(changes),
            SourceEvent::Synced { complete } => {
                assert!(complete);
                return batches;
            }
            SourceEvent::Status(status) => panic!("unexpected status {status:?}"),
        }
    }
}

/// The next `Changes` batch, passing over status reports.
async fn next_changes(events: &mut UnboundedReceiver<SourceEvent>) -> Vec<Change> {
    loop {
        match next(events).await {
            SourceEvent::Changes(changes) => return changes,
            SourceEvent::Status(_) => {}
            SourceEvent::Synced { .. } => panic!("synced twice"),
        }
    }
}

/// Asserts that no change arrives for a while; status reports may.
async fn no_changes_for(events: &mut UnboundedReceiver<SourceEvent>, quiet: Duration) {
    let deadline = tokio::time::Instant::now() + quiet;
    while let Ok(event) = tokio::time::timeout_at(deadline, events.recv()).await {
        match event.expect("the source stopped") {
            SourceEvent::Status(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// Waits until `done` holds for the server's counters of `resource`.
async fn until_counted(server: &ApiServer, resource: Resource, done: impl Fn(Counters) -> bool) {
    let start = Instant::now();
    while !done(server.counters(resource)) {
        assert!(
            start.elapsed() < WAIT,
            "{resource:?}: {:?}",
            server.counters(resource)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Changes in a form that is easy to compare: `+kind ns/name` for an upsert,
/// `-kind ns/name` for a deletion.
fn summary(changes: &[Change]) -> Vec<String> {
    let mut summary: Vec<String> = changes
        .iter()
        .map(|change| match change {
            Change::Service(name, object) => {
                format!("{}service {name}", sign(object.as_ref()))
            }
            Change::EndpointSlice(name, object) => {
                format!("{}slice {name}", sign(object.as_ref()))
            }
            Change::Node(object) => format!(
                "{}node {}",
                sign(object.as_ref()),
                object.as_ref().map_or("", |n| &n.name)
            ),
        })
        .collect();
    summary.sort();
    summary
}

fn sign<T>(object: Option<&T>) -> &'static str {
    if object.is_some() { "+" } else { "-" }
}

fn service_port(change: &Change) -> i32 {
    let Change::Service(_, Some(service)) = change else {
        panic!("not a Service upsert: {change:?}");
    };
    assert_eq!(&*service.origin, ORIGIN);
    service.object.ports[0].port
}

#[tokio::test]
async fn lists_everything_in_one_batch_per_kind_then_synced() {
    let server = populated_server();
    let mut events = start(&server, 500).await;
    let mut batches = until_synced(&mut events).await;
    batches.sort_by_key(|b| summary(b));
    let summaries: Vec<Vec<String>> = batches.iter().map(|b| summary(b)).collect();
    assert_eq!(
        summaries,
        [
            vec!["+node node-1"],
            vec!["+service default/a", "+service default/b"],
            vec!["+slice default/a-1", "+slice default/b-1"],
        ]
    );
    let Change::Node(Some(node)) = &batches[0][0] else {
        unreachable!()
    };
    assert_eq!(node.zone.as_deref(), Some("zone-a"));
    assert_eq!(node.addresses, ["192.0.2.1"]);
    let Change::EndpointSlice(_, Some(slice)) = &batches[2][0] else {
        unreachable!()
    };
    assert_eq!(slice.object.service.as_deref(), Some("a"));
    assert_eq!(&*slice.origin, ORIGIN);
}

#[tokio::test]
async fn follows_adds_updates_and_deletes_and_skips_what_it_does_not_read() {
    let server = populated_server();
    let mut events = start(&server, 500).await;
    until_synced(&mut events).await;

    server.apply(service("c", 90)).unwrap();
    let changes = next_changes(&mut events).await;
    assert_eq!(summary(&changes), ["+service default/c"]);

    server.apply(service("a", 8000)).unwrap();
    let changes = next_changes(&mut events).await;
    assert_eq!(summary(&changes), ["+service default/a"]);
    assert_eq!(service_port(&changes[0]), 8000);

    // An annotation the model does not read: a new resourceVersion, the
    // same slim object, nothing to send. The next batch is the deletion.
    let mut annotated = service("a", 8000);
    annotated["metadata"]["annotations"] = json!({"note": "unread"});
    server.apply(annotated).unwrap();
    assert!(server.delete(Resource::Service, "default", "b"));
    let changes = next_changes(&mut events).await;
    assert_eq!(summary(&changes), ["-service default/b"]);

    server.apply(node(NODE, "zone-c")).unwrap();
    // Another node's changes are not ours.
    server.apply(node("node-2", "zone-c")).unwrap();
    let changes = next_changes(&mut events).await;
    assert_eq!(summary(&changes), ["+node node-1"]);
    assert!(matches!(&changes[0], Change::Node(Some(n)) if n.zone.as_deref() == Some("zone-c")));

    assert!(server.delete(Resource::EndpointSlice, "default", "a-1"));
    let changes = next_changes(&mut events).await;
    assert_eq!(summary(&changes), ["-slice default/a-1"]);
    no_changes_for(&mut events, Duration::from_millis(300)).await;
}

#[tokio::test]
async fn lists_in_pages_and_sends_the_whole_listing_at_once() {
    let server = ApiServer::start().unwrap();
    for i in 0..23 {
        server.apply(service(&format!("s{i:02}"), 80)).unwrap();
    }
    let mut events = start(&server, 5).await;
    let batches = until_synced(&mut events).await;
    assert_eq!(batches.len(), 1, "only Services exist: one batch");
    assert_eq!(batches[0].len(), 23);
    assert!(
        server.counters(Resource::Service).lists >= 5,
        "{:?}",
        server.counters(Resource::Service)
    );
}

#[tokio::test]
async fn a_restarted_server_is_listed_again_and_only_real_differences_are_sent() {
    let mut server = populated_server();
    let mut events = start(&server, 500).await;
    until_synced(&mut events).await;
    let before = server.counters(Resource::Service);

    // Nothing changed: the relist after 410 sends nothing.
    server.restart().unwrap();
    until_counted(&server, Resource::Service, |c| {
        c.expired > before.expired && c.lists > before.lists
    })
    .await;
    no_changes_for(&mut events, Duration::from_millis(500)).await;

    // `b` goes while the server is down; the history that would tell is
    // gone, so only the relist can find out.
    server.stop();
    assert!(server.delete(Resource::Service, "default", "b"));
    server.apply(service("a", 80)).unwrap(); // unchanged to the model
    server.restart().unwrap();
    let changes = next_changes(&mut events).await;
    assert_eq!(summary(&changes), ["-service default/b"]);
    no_changes_for(&mut events, Duration::from_millis(500)).await;
}

#[tokio::test]
async fn bookmarks_keep_the_watch_position_and_disturb_nothing() {
    let mut server = populated_server();
    server.set_bookmark_interval(Some(Duration::from_millis(50)));
    let mut events = start(&server, 500).await;
    until_synced(&mut events).await;

    // Moves the revision past the Services watcher's last object.
    server.apply(slice("a-1", "a", "10.244.0.9")).unwrap();
    assert_eq!(
        summary(&next_changes(&mut events).await),
        ["+slice default/a-1"]
    );
    let seen = server.counters(Resource::Service).bookmarks;
    until_counted(&server, Resource::Service, |c| c.bookmarks >= seen + 3).await;
    no_changes_for(&mut events, Duration::from_millis(200)).await;

    // The history is gone and the connections drop, but the bookmarks told
    // the Services watcher where it stands: it resumes without a relist.
    let before = server.counters(Resource::Service);
    server.compact();
    server.stop();
    server.resume().unwrap();
    until_counted(&server, Resource::Service, |c| c.watches > before.watches).await;
    server.apply(service("c", 90)).unwrap();
    assert_eq!(
        summary(&next_changes(&mut events).await),
        ["+service default/c"]
    );
    let after = server.counters(Resource::Service);
    assert_eq!((after.lists, after.expired), (before.lists, before.expired));
}

/// The next status report, passing over changes.
async fn next_status(events: &mut UnboundedReceiver<SourceEvent>) -> Option<String> {
    loop {
        if let SourceEvent::Status(status) = next(events).await {
            return status;
        }
    }
}

#[tokio::test]
async fn a_server_down_then_up_is_reported_and_caught_up_with() {
    let mut server = populated_server();
    let mut events = start(&server, 500).await;
    until_synced(&mut events).await;

    server.stop();
    let status = next_status(&mut events).await;
    assert!(status.is_some());
    server.resume().unwrap();
    // Nothing changed, so only the probe can tell the server is back. (The
    // error may change on the way: a dropped stream, then a refused
    // connection.)
    while next_status(&mut events).await.is_some() {}

    server.stop();
    assert!(next_status(&mut events).await.is_some());
    assert!(server.delete(Resource::Service, "default", "a"));
    server.apply(service("d", 90)).unwrap();
    server.resume().unwrap();
    let mut seen = Vec::new();
    let mut healthy = false;
    while !(healthy && seen.len() == 2) {
        match next(&mut events).await {
            SourceEvent::Changes(changes) => seen.extend(summary(&changes)),
            SourceEvent::Status(status) => healthy = status.is_none(),
            SourceEvent::Synced { .. } => panic!("synced twice"),
        }
    }
    seen.sort();
    assert_eq!(seen, ["+service default/d", "-service default/a"]);
}

#[tokio::test]
async fn a_forbidden_node_holds_back_synced_until_it_is_allowed() {
    let server = populated_server();
    server.fail(Resource::Node, Some(403));
    let mut events = start(&server, 500).await;
    let mut kinds = Vec::new();
    let mut status = None;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
    while let Ok(event) = tokio::time::timeout_at(deadline, events.recv()).await {
        match event.unwrap() {
            SourceEvent::Changes(changes) => kinds.extend(summary(&changes)),
            SourceEvent::Status(s) => status = s,
            SourceEvent::Synced { .. } => panic!("synced without the Node"),
        }
    }
    kinds.sort();
    assert_eq!(kinds.len(), 4, "Services and slices are listed: {kinds:?}");
    let status = status.expect("the failure is reported");
    assert!(
        status.contains("Node") && status.contains("403"),
        "{status}"
    );

    server.fail(Resource::Node, None);
    let mut synced = false;
    let mut healthy = false;
    while !(synced && healthy) {
        match next(&mut events).await {
            SourceEvent::Changes(changes) => assert_eq!(summary(&changes), ["+node node-1"]),
            SourceEvent::Status(status) => healthy = status.is_none(),
            SourceEvent::Synced { complete } => synced = complete,
        }
    }
}

/// Reads changes and status reports for at most `within`, until `done`
/// holds for the changes read and the source's current status (kept in
/// `status` across calls); fails the test with what did come otherwise.
async fn until_within(
    events: &mut UnboundedReceiver<SourceEvent>,
    status: &mut Option<String>,
    within: Duration,
    what: &str,
    mut done: impl FnMut(&[String], Option<&str>) -> bool,
) {
    let deadline = tokio::time::Instant::now() + within;
    let mut seen = Vec::new();
    while !done(&seen, status.as_deref()) {
        let Ok(event) = tokio::time::timeout_at(deadline, events.recv()).await else {
            panic!("{what} not within {within:?}: changes {seen:?}, status {status:?}");
        };
        match event.expect("the source stopped") {
            SourceEvent::Changes(changes) => seen.extend(summary(&changes)),
            SourceEvent::Status(now) => *status = now,
            SourceEvent::Synced { .. } => panic!("synced twice"),
        }
    }
}

#[tokio::test]
async fn after_a_restart_storm_every_watcher_is_back_within_five_seconds() {
    const STORM: Duration = Duration::from_secs(24);
    const BACK_WITHIN: Duration = Duration::from_secs(5);
    let mut server = populated_server();
    let mut events = start(&server, 500).await;
    until_synced(&mut events).await;
    let mut status = None;

    // Short outages, with the server up in between long enough for a
    // resumed watch to be accepted again: each outage is one more failure,
    // and a silently resumed watch yields no event to reset the back-off,
    // so it grows to its cap (30 s, and jitter). Every third time the
    // server restarts, so the watchers also meet 410 and list again.
    let storm = Instant::now();
    let mut round = 0;
    while storm.elapsed() < STORM {
        round += 1;
        server.stop();
        tokio::time::sleep(Duration::from_millis(600)).await;
        if round % 3 == 0 {
            server.restart().unwrap();
        } else {
            server.resume().unwrap();
        }
        tokio::time::sleep(Duration::from_millis(900)).await;
    }
    while let Ok(Some(event)) = tokio::time::timeout(Duration::ZERO, events.recv()).await {
        if let SourceEvent::Status(now) = event {
            status = now;
        }
    }
    server.restart().unwrap();
    // Made while a watcher may still be away: only its resumed watch or
    // its relist can bring them.
    server.apply(service("c", 90)).unwrap();
    server.apply(slice("a-1", "a", "10.244.0.9")).unwrap();
    assert!(server.delete(Resource::Service, "default", "b"));
    until_within(
        &mut events,
        &mut status,
        BACK_WITHIN,
        "the changes",
        |seen, _| {
            [
                "+service default/c",
                "+slice default/a-1",
                "-service default/b",
            ]
            .iter()
            .all(|change| seen.iter().any(|s| s == change))
        },
    )
    .await;
    until_within(
        &mut events,
        &mut status,
        BACK_WITHIN,
        "a clean status",
        |_, status| status.is_none(),
    )
    .await;
    // The source says all is well only when every watcher streams again,
    // so what changes next arrives at once.
    server.apply(service("d", 91)).unwrap();
    server.apply(slice("d-1", "d", "10.244.0.4")).unwrap();
    server.apply(node(NODE, "zone-d")).unwrap();
    until_within(
        &mut events,
        &mut status,
        Duration::from_secs(1),
        "the later changes",
        |seen, _| {
            let mut seen = seen.to_vec();
            seen.sort();
            seen == ["+node node-1", "+service default/d", "+slice default/d-1"]
        },
    )
    .await;
}
