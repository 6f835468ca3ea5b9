use std::{
    fmt::Write as _,
    fs,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use proptest::prelude::*;

use super::*;

const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\n\
                       spec:\n  clusterIP: 10.96.0.10\n  ports:\n  - {name: http, port: 80}\n";

fn yaml(text: &str) -> Result<FileObjects, ManifestError> {
    parse_manifests(text.as_bytes(), Format::Yaml)
}

fn json(text: &str) -> Result<FileObjects, ManifestError> {
    parse_manifests(text.as_bytes(), Format::Json)
}

/// Parses and returns the limit hit, checking that the refusal was quick:
/// what a limit is for. The bound is loose (a loaded machine runs the unit
/// tests of a debug build); the unlimited cases took minutes.
fn limit_hit(format: Format, text: &str) -> Option<Limit> {
    let started = Instant::now();
    let result = parse_manifests(text.as_bytes(), format);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(10), "took {took:?}");
    result.err().and_then(|e| e.limit())
}

/// A directory of its own under the temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("read-test-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn mkfifo(path: &Path) {
    let status = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(status.success());
}

#[test]
fn a_fifo_is_refused_at_once_not_waited_on() {
    let dir = TempDir::new("fifo");
    let fifo = dir.0.join("web.yaml");
    mkfifo(&fifo);
    // A ConfigMap mount reaches its files through symlinks.
    let link = dir.0.join("link.yaml");
    std::os::unix::fs::symlink(&fifo, &link).unwrap();
    for path in [&fifo, &link] {
        let started = Instant::now();
        let error = read_manifest_file(path).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(
            matches!(error, ManifestError::NotRegularFile { kind: "FIFO" }),
            "{error}"
        );
    }
}

#[test]
fn a_device_is_refused() {
    let error = read_manifest_file(Path::new("/dev/zero")).unwrap_err();
    assert!(
        matches!(
            error,
            ManifestError::NotRegularFile {
                kind: "character device"
            }
        ),
        "{error}"
    );
}

#[test]
fn a_symlink_to_a_regular_file_is_read() {
    let dir = TempDir::new("symlink");
    fs::create_dir(dir.0.join("..2024_01_01")).unwrap();
    fs::write(dir.0.join("..2024_01_01/web.yaml"), SERVICE).unwrap();
    std::os::unix::fs::symlink("..2024_01_01", dir.0.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/web.yaml", dir.0.join("web.yaml")).unwrap();
    let objects = read_manifest_file(&dir.0.join("web.yaml")).unwrap();
    assert_eq!(objects.services.len(), 1);
}

#[test]
fn a_file_over_the_size_limit_is_refused_unread() {
    let dir = TempDir::new("size");
    let path = dir.0.join("big.yaml");
    // Sparse: its size is all that is looked at.
    let file = File::create(&path).unwrap();
    file.set_len(MAX_FILE_BYTES + 1).unwrap();
    let error = read_manifest_file(&path).unwrap_err();
    assert_eq!(error.limit(), Some(Limit::Size), "{error}");
    assert!(error.to_string().contains("size limit (4 MiB)"), "{error}");
}

#[test]
fn deep_flow_nesting_is_refused_quickly() {
    // The issue's reproduction: 200,000 levels kept a core busy for minutes.
    let levels = 200_000;
    let text = format!(
        "{SERVICE}  x: {}{}\n",
        "[".repeat(levels),
        "]".repeat(levels)
    );
    assert_eq!(limit_hit(Format::Yaml, &text), Some(Limit::Depth));
    let text = format!("{}{}", "{\"a\":".repeat(levels), "}".repeat(levels));
    assert_eq!(limit_hit(Format::Yaml, &text), Some(Limit::Depth));
    assert_eq!(limit_hit(Format::Json, &text), Some(Limit::Depth));
}

#[test]
fn deep_block_nesting_is_refused() {
    let text = (0..2000).fold(String::new(), |mut text, i| {
        let _ = writeln!(text, "{}a:", " ".repeat(i));
        text
    });
    assert_eq!(limit_hit(Format::Yaml, &text), Some(Limit::Depth));
    let list = (0..2000).fold(String::new(), |mut text, i| {
        let _ = writeln!(text, "{}-", " ".repeat(i));
        text
    });
    assert_eq!(limit_hit(Format::Yaml, &list), Some(Limit::Depth));
}

#[test]
fn nesting_within_the_limit_is_read() {
    // The document's mapping is the first level.
    let nested = format!(
        "{}1{}",
        "[".repeat(MAX_DEPTH - 1),
        "]".repeat(MAX_DEPTH - 1)
    );
    let text = format!("{SERVICE}x: {nested}\n");
    assert_eq!(yaml(&text).unwrap().services.len(), 1);
}

#[test]
fn repeated_aliases_are_refused_before_they_expand() {
    // The issue's reproduction: one 1,000-item anchor referenced 30,000
    // times (94 KB) took 3.1 GB.
    let items = vec!["0"; 1000].join(",");
    let refs = vec!["*a"; 30_000].join(",");
    let text = format!("{SERVICE}x: &a [{items}]\ny: [{refs}]\n");
    assert!(text.len() < 100_000);
    assert_eq!(limit_hit(Format::Yaml, &text), Some(Limit::Aliases));
}

#[test]
fn nested_aliases_are_refused() {
    // A billion laughs: nine levels of ten aliases each.
    let mut text = "a: &a [x,x,x,x,x,x,x,x,x,x]\n".to_owned();
    for (previous, name) in "abcdefgh".chars().zip("bcdefghi".chars()) {
        let refs = vec![format!("*{previous}"); 10].join(",");
        let _ = writeln!(text, "{name}: &{name} [{refs}]");
    }
    assert_eq!(limit_hit(Format::Yaml, &text), Some(Limit::Aliases));
}

#[test]
fn an_aliased_long_string_is_refused() {
    // Few nodes, but each alias copies a megabyte.
    let text = format!(
        "a: &a \"{}\"\nb: [{}]\n",
        "x".repeat(1 << 20),
        vec!["*a"; 1000].join(",")
    );
    assert_eq!(limit_hit(Format::Yaml, &text), Some(Limit::Aliases));
}

#[test]
fn a_few_aliases_are_fine() {
    let text = "apiVersion: v1\nkind: Service\nmetadata: {name: web, labels: &l {app: web}}\n\
                spec:\n  clusterIP: 10.96.0.10\n  selector: *l\n  ports: [{port: 80}]\n";
    let objects = yaml(text).unwrap();
    let selector = objects.services[0].spec.as_ref().unwrap().selector.as_ref();
    assert_eq!(selector.unwrap()["app"], "web");
}

#[test]
fn too_many_documents_are_refused() {
    let text = "---\na: 1\n".repeat(MAX_DOCUMENTS + 1);
    assert_eq!(limit_hit(Format::Yaml, &text), Some(Limit::Documents));
    let text = "{}".repeat(MAX_DOCUMENTS + 1);
    assert_eq!(limit_hit(Format::Json, &text), Some(Limit::Documents));
}

#[test]
fn too_many_nodes_are_refused() {
    let text = format!("x: [{}]\n", vec!["1"; MAX_NODES].join(","));
    assert_eq!(limit_hit(Format::Yaml, &text), Some(Limit::Nodes));
    let text = format!("[{}]", vec!["1"; MAX_NODES + 1].join(","));
    assert_eq!(limit_hit(Format::Json, &text), Some(Limit::Nodes));
}

#[test]
fn reads_services_and_slices_and_counts_other_kinds() {
    let objects = yaml(
        "apiVersion: v1\nkind: Service\nmetadata: {name: a}\n---\n\
         apiVersion: v1\nkind: ConfigMap\nmetadata: {name: b}\n---\n\
         apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n---\n\
         apiVersion: v1\nkind: Endpoints\nmetadata: {name: e}\n---\n\
         apiVersion: v1\nkind: ConfigMap\nmetadata: {name: f}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: c}\n\
         addressType: IPv4\nendpoints: []\n---\n",
    )
    .unwrap();
    assert_eq!(objects.services.len(), 1);
    assert_eq!(objects.endpoint_slices.len(), 1);
    let ignored: Vec<(&str, usize)> = objects
        .ignored
        .iter()
        .map(|(k, n)| (k.as_str(), *n))
        .collect();
    assert_eq!(
        ignored,
        [
            ("apps/v1 Deployment", 1),
            ("v1 ConfigMap", 2),
            ("v1 Endpoints", 1)
        ]
    );
}

#[test]
fn reads_the_items_of_lists() {
    // As `kubectl get svc,endpointslices -o yaml` prints them.
    let list = "apiVersion: v1\nkind: List\nmetadata: {resourceVersion: \"\"}\nitems:\n\
                - apiVersion: v1\n  kind: Service\n  metadata: {name: a}\n\
                - apiVersion: discovery.k8s.io/v1\n  kind: EndpointSlice\n  \
                  metadata: {name: a-1}\n  addressType: IPv4\n  endpoints: []\n\
                - apiVersion: apps/v1\n  kind: Deployment\n  metadata: {name: d}\n";
    let objects = yaml(list).unwrap();
    assert_eq!(objects.services.len(), 1);
    assert_eq!(objects.endpoint_slices.len(), 1);
    assert_eq!(objects.ignored.len(), 1);
    // The API's own lists leave out the items' kind.
    let typed = r#"{"apiVersion": "v1", "kind": "ServiceList", "items": [
        {"metadata": {"name": "a"}}, {"metadata": {"name": "b"}}]}"#;
    let objects = json(typed).unwrap();
    let names: Vec<_> = objects
        .services
        .iter()
        .map(|s| s.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(names, ["a", "b"]);
    let error = yaml("apiVersion: v1\nkind: ServiceList\nitems: {}\n").unwrap_err();
    assert!(matches!(error, ManifestError::NoItems { .. }), "{error}");
}

#[test]
fn a_byte_order_mark_is_skipped() {
    let text = format!("\u{feff}{SERVICE}");
    assert_eq!(yaml(&text).unwrap().services.len(), 1);
    let text = "\u{feff}{\"apiVersion\": \"v1\", \"kind\": \"Service\", \"metadata\": {}}";
    assert_eq!(json(text).unwrap().services.len(), 1);
}

#[test]
fn a_json_stream_is_read_object_by_object() {
    let text = "{\"apiVersion\": \"v1\", \"kind\": \"Service\", \"metadata\": {\"name\": \"a\"}}\n\
                {\"apiVersion\": \"v1\", \"kind\": \"Service\", \"metadata\": {\"name\": \"b\"}}";
    assert_eq!(json(text).unwrap().services.len(), 2);
    // Brackets inside strings do not count as nesting.
    let text = format!(
        "{{\"apiVersion\": \"v1\", \"kind\": \"Service\", \"metadata\": {{\"name\": \"{}\\\"\"}}}}",
        "[".repeat(1000)
    );
    assert_eq!(json(&text).unwrap().services.len(), 1);
}

#[test]
fn text_that_is_not_utf8_is_refused() {
    let error = parse_manifests(b"kind: \xff\xfe", Format::Yaml).unwrap_err();
    assert!(
        matches!(error, ManifestError::NotUtf8 { offset: 6 }),
        "{error}"
    );
}

#[test]
fn broken_yaml_is_a_syntax_error_with_its_line() {
    let error = yaml("apiVersion: v1\nkind: Service\n---\nmetadata: {name: [\n").unwrap_err();
    assert!(
        matches!(error, ManifestError::Syntax { format: "YAML", .. }),
        "{error}"
    );
    assert!(error.to_string().contains("line 4"), "{error}");
}

#[test]
fn a_wrongly_typed_object_names_kind_and_name() {
    let error = yaml(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: eighty}]}\n",
    )
    .unwrap_err();
    assert!(
        error.to_string().starts_with("document 1: Service web: "),
        "{error}"
    );
}

#[test]
fn a_document_that_is_not_an_object_is_an_error() {
    assert!(matches!(
        yaml("- just\n- a list\n"),
        Err(ManifestError::NotAnObject { .. })
    ));
    assert!(matches!(
        json("[1, 2]"),
        Err(ManifestError::NotAnObject { .. })
    ));
    assert!(matches!(
        yaml("apiVersion: v1\nkind: 3\n"),
        Err(ManifestError::NotAnObject { .. })
    ));
}

#[test]
fn empty_and_null_documents_are_skipped() {
    assert_eq!(yaml("").unwrap().services.len(), 0);
    assert_eq!(yaml("---\n---\nnull\n---\n~\n").unwrap().services.len(), 0);
    let text = format!("---\n{SERVICE}---\n");
    assert_eq!(yaml(&text).unwrap().services.len(), 1);
}

/// The slowest a parse of a small input may take, even in a debug build
/// on a busy machine.
const PARSE_TIME: Duration = Duration::from_secs(2);

fn parses_in_time(bytes: &[u8]) {
    for format in [Format::Yaml, Format::Json] {
        let started = Instant::now();
        let _ = parse_manifests(bytes, format);
        let took = started.elapsed();
        assert!(took < PARSE_TIME, "{format:?} took {took:?}");
    }
}

/// Valid manifests to mutate: a Service and its slice, a list, JSON.
fn seeds() -> Vec<Vec<u8>> {
    let slice = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  \
                 labels: {kubernetes.io/service-name: web}\naddressType: IPv4\n\
                 ports: [{name: http, port: 8080, protocol: TCP}]\n\
                 endpoints:\n- addresses: [\"10.244.0.10\"]\n  conditions: {ready: true}\n";
    vec![
        format!("{SERVICE}---\n{slice}").into_bytes(),
        b"apiVersion: v1
kind: List
items:
- &s {apiVersion: v1, kind: Service}
- *s
"
        .to_vec(),
        br#"{"apiVersion": "v1", "kind": "ServiceList", "items": [{"metadata": {"name": "a"},
            "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]}}]}"#
            .to_vec(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic_and_parse_in_time(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        parses_in_time(&bytes);
    }

    #[test]
    fn mutated_manifests_never_panic_and_parse_in_time(
        seed in 0..3_usize,
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0..3_u8), 1..16),
    ) {
        let mut bytes = seeds().swap_remove(seed);
        for (at, byte, how) in edits {
            let at = at.index(bytes.len() + 1);
            match how {
                0 => bytes.insert(at, byte),
                1 if at < bytes.len() => bytes[at] = byte,
                _ if at < bytes.len() => { bytes.remove(at); }
                _ => {}
            }
        }
        parses_in_time(&bytes);
    }

    #[test]
    fn structural_characters_never_panic_and_parse_in_time(
        text in "[\\[\\]{}:,&*!|>\"' \\n\\t#a-c0-9-]{0,512}",
    ) {
        parses_in_time(text.as_bytes());
    }
}
