use super::*;

#[test]
fn reads_services_and_slices_and_ignores_other_kinds() {
    let objects = parse_manifests(
        "apiVersion: v1\nkind: Service\nmetadata: {name: a}\n---\n\
         apiVersion: v1\nkind: ConfigMap\nmetadata: {name: b}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: c}\n\
         addressType: IPv4\nendpoints: []\n---\n",
    )
    .unwrap();
    assert_eq!(objects.services.len(), 1);
    assert_eq!(objects.endpoint_slices.len(), 1);
}

#[test]
fn broken_yaml_names_the_document() {
    let error =
        parse_manifests("apiVersion: v1\nkind: Service\n---\nmetadata: {name: [\n").unwrap_err();
    assert!(error.starts_with("document 2: invalid YAML"), "{error}");
}

#[test]
fn a_wrongly_typed_object_names_kind_and_name() {
    let error = parse_manifests(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: eighty}]}\n",
    )
    .unwrap_err();
    assert!(error.starts_with("document 1: Service web: "), "{error}");
}

#[test]
fn a_document_that_is_not_an_object_is_an_error() {
    assert!(parse_manifests("- just\n- a list\n").is_err());
}

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
