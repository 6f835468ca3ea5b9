use super::*;

#[test]
fn the_directory_source_follows_edits_and_keeps_a_broken_files_last_good_state() {
    let dir = std::env::temp_dir().join(format!("manifests-test-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let service =
        |name: &str| format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\n");
    fs::write(dir.join("a.yaml"), service("a")).unwrap();
    fs::write(dir.join("notes.txt"), "not a manifest").unwrap();
    let mut source = ManifestDir::new(&dir);
    let names = |s: &Snapshot| -> Vec<String> {
        s.services
            .iter()
            .map(|s| s.object.metadata.name.clone().unwrap_or_default())
            .collect()
    };
    assert_eq!(names(&source.next_snapshot().unwrap()), ["a"]);

    fs::write(dir.join("b.yml"), service("b")).unwrap();
    assert_eq!(names(&source.next_snapshot().unwrap()), ["a", "b"]);

    fs::write(dir.join("a.yaml"), "kind: [").unwrap();
    assert_eq!(names(&source.next_snapshot().unwrap()), ["a", "b"]);

    fs::remove_file(dir.join("a.yaml")).unwrap();
    let snapshot = source.next_snapshot().unwrap();
    assert_eq!(names(&snapshot), ["b"]);
    assert!(snapshot.services[0].origin.ends_with("b.yml"));
    fs::remove_dir_all(&dir).unwrap();
}
