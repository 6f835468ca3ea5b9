use std::time::Duration;

use super::*;
use crate::source::{EventSink, SourceEvent};

/// The next event, or a failure after a generous wait.
async fn next(events: &mut tokio::sync::mpsc::UnboundedReceiver<SourceEvent>) -> SourceEvent {
    tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .expect("an event within 5 s")
        .expect("the source is running")
}

fn names(event: &SourceEvent) -> Vec<String> {
    let SourceEvent::Changes(changes) = event else {
        panic!("expected changes, got {event:?}");
    };
    changes
        .iter()
        .map(|change| match change {
            Change::Service(name, Some(_)) => format!("+{}", name.name()),
            Change::Service(name, None) => format!("-{}", name.name()),
            other => format!("{other:?}"),
        })
        .collect()
}

#[tokio::test]
async fn the_directory_source_sends_what_changed_and_keeps_a_broken_files_last_good_state() {
    let dir = std::env::temp_dir().join(format!("manifests-test-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let service =
        |name: &str| format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\n");
    fs::write(dir.join("a.yaml"), service("a")).unwrap();
    fs::write(dir.join("notes.txt"), "not a manifest").unwrap();
    let (sink, mut events) = EventSink::channel();
    Box::new(ManifestDir::new(&dir)).start(sink).unwrap();
    assert_eq!(names(&next(&mut events).await), ["+a"]);
    assert_eq!(
        next(&mut events).await,
        SourceEvent::Synced { complete: true }
    );

    // Only the new file's objects are sent.
    fs::write(dir.join("b.yml"), service("b")).unwrap();
    let event = next(&mut events).await;
    assert_eq!(names(&event), ["+b"]);
    let SourceEvent::Changes(changes) = &event else {
        unreachable!()
    };
    assert!(matches!(&changes[0], Change::Service(_, Some(s)) if s.origin.ends_with("b.yml")));

    // A broken file keeps its objects, and the view is incomplete.
    fs::write(dir.join("a.yaml"), "kind: [").unwrap();
    assert_eq!(
        next(&mut events).await,
        SourceEvent::Synced { complete: false }
    );

    fs::remove_file(dir.join("a.yaml")).unwrap();
    assert_eq!(names(&next(&mut events).await), ["-a"]);
    assert_eq!(
        next(&mut events).await,
        SourceEvent::Synced { complete: true }
    );
    fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_file_that_suddenly_holds_nothing_is_believed_only_after_a_grace_period() {
    let dir = std::env::temp_dir().join(format!("manifests-grace-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    fs::write(
        dir.join("a.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: a}\n",
    )
    .unwrap();
    let (sink, mut events) = EventSink::channel();
    Box::new(ManifestDir::new(&dir)).start(sink).unwrap();
    assert_eq!(names(&next(&mut events).await), ["+a"]);
    next(&mut events).await; // Synced
    let truncated = std::time::Instant::now();
    fs::write(dir.join("a.yaml"), "").unwrap();
    assert_eq!(names(&next(&mut events).await), ["-a"]);
    assert!(
        truncated.elapsed() >= EMPTY_GRACE,
        "believed after {:?}",
        truncated.elapsed()
    );
    fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn an_object_defined_twice_is_taken_from_the_first_file() {
    let dir = std::env::temp_dir().join(format!("manifests-dup-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let service =
        |name: &str| format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\n");
    fs::write(dir.join("a.yaml"), service("a")).unwrap();
    let (sink, mut events) = EventSink::channel();
    Box::new(ManifestDir::new(&dir)).start(sink).unwrap();
    assert_eq!(names(&next(&mut events).await), ["+a"]);
    next(&mut events).await; // Synced
    fs::write(dir.join("d.yaml"), service("a")).unwrap();
    fs::write(dir.join("e.yaml"), service("e")).unwrap();
    let mut seen = Vec::new();
    while !seen.contains(&"+e".to_owned()) {
        seen.extend(names(&next(&mut events).await));
    }
    assert!(!seen.contains(&"-a".to_owned()), "{seen:?}");
    fs::remove_dir_all(&dir).unwrap();
}
