//! The wire protocol, spoken by hand: what the kube client relies on.

use std::io::{BufRead, BufReader, Read, Write};

use super::*;

fn service(name: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]},
    })
}

/// A GET on a fresh connection: status code and the reader, positioned at
/// the body.
fn get_raw(server: &ApiServer, target: &str) -> (u16, Vec<String>, BufReader<TcpStream>) {
    let mut stream = TcpStream::connect(server.addr()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(stream, "GET {target} HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let code = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        if line.trim().is_empty() {
            break;
        }
        headers.push(line.trim().to_lowercase());
    }
    (code, headers, reader)
}

fn get_json(server: &ApiServer, target: &str) -> (u16, Value) {
    let (code, headers, mut reader) = get_raw(server, target);
    let length: usize = headers
        .iter()
        .find_map(|h| h.strip_prefix("content-length:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    (code, serde_json::from_slice(&body).unwrap())
}

/// The next watch event of a chunked stream; `None` at its end.
fn next_event(reader: &mut BufReader<TcpStream>) -> Option<Value> {
    let mut size = String::new();
    reader.read_line(&mut size).unwrap();
    let size = usize::from_str_radix(size.trim(), 16).unwrap();
    let mut chunk = vec![0; size + 2];
    reader.read_exact(&mut chunk).unwrap();
    (size > 0).then(|| serde_json::from_slice(&chunk[..size]).unwrap())
}

#[test]
fn lists_in_pages_with_one_resource_version() {
    let server = ApiServer::start().unwrap();
    for i in 0..5 {
        server.apply(service(&format!("s{i}"))).unwrap();
    }
    let mut names = Vec::new();
    let mut target = "/api/v1/services?limit=2".to_owned();
    let mut versions = Vec::new();
    loop {
        let (code, list) = get_json(&server, &target);
        assert_eq!(code, 200, "{list}");
        assert_eq!(list["kind"], "ServiceList");
        versions.push(
            list["metadata"]["resourceVersion"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
        for item in list["items"].as_array().unwrap() {
            names.push(item["metadata"]["name"].as_str().unwrap().to_owned());
            assert!(item["metadata"]["uid"].is_string());
            assert!(item["metadata"]["creationTimestamp"].is_string());
        }
        match list["metadata"]["continue"].as_str() {
            Some(token) => target = format!("/api/v1/services?limit=2&continue={token}"),
            None => break,
        }
    }
    assert_eq!(names, ["s0", "s1", "s2", "s3", "s4"]);
    assert_eq!(versions, vec![server.revision().to_string(); 3]);
    assert_eq!(server.counters(Resource::Service).lists, 3);
}

#[test]
fn watch_streams_changes_from_a_version_and_expires_old_ones() {
    let server = ApiServer::start().unwrap();
    server.apply(service("a")).unwrap();
    let from = server.revision();
    server.apply(service("b")).unwrap();
    let (code, headers, mut stream) = get_raw(
        &server,
        &format!(
            "/api/v1/namespaces/default/services?watch=true&resourceVersion={from}&timeoutSeconds=1"
        ),
    );
    assert_eq!(code, 200);
    assert!(headers.contains(&"transfer-encoding: chunked".to_owned()));
    let added = next_event(&mut stream).unwrap();
    assert_eq!(
        (
            added["type"].as_str(),
            added["object"]["metadata"]["name"].as_str()
        ),
        (Some("ADDED"), Some("b"))
    );
    assert!(server.delete(Resource::Service, "default", "a"));
    let deleted = next_event(&mut stream).unwrap();
    assert_eq!(deleted["type"], "DELETED");
    assert_eq!(
        deleted["object"]["metadata"]["resourceVersion"],
        server.revision().to_string()
    );
    // timeoutSeconds=1 ends the stream.
    assert!(next_event(&mut stream).is_none());

    server.compact();
    let (code, _, mut stream) = get_raw(
        &server,
        &format!("/api/v1/services?watch=1&resourceVersion={from}"),
    );
    assert_eq!(code, 200);
    let error = next_event(&mut stream).unwrap();
    assert_eq!(error["type"], "ERROR");
    assert_eq!(
        (
            error["object"]["code"].as_u64(),
            error["object"]["reason"].as_str()
        ),
        (Some(410), Some("Expired"))
    );
    assert!(next_event(&mut stream).is_none());
    assert_eq!(server.counters(Resource::Service).expired, 1);
}

#[test]
fn nodes_by_field_selector_and_bookmarks() {
    let server = ApiServer::start().unwrap();
    for name in ["node-a", "node-b"] {
        server
            .apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}))
            .unwrap();
    }
    let (_, list) = get_json(
        &server,
        "/api/v1/nodes?fieldSelector=metadata.name%3Dnode-b",
    );
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["metadata"]["name"], "node-b");

    server.set_bookmark_interval(Some(Duration::from_millis(50)));
    let target = format!(
        "/api/v1/nodes?watch=true&resourceVersion={}&allowWatchBookmarks=true&fieldSelector=metadata.name%3Dnode-b",
        server.revision()
    );
    let (_, _, mut stream) = get_raw(&server, &target);
    let bookmark = next_event(&mut stream).unwrap();
    assert_eq!(bookmark["type"], "BOOKMARK");
    assert_eq!(
        bookmark["object"]["metadata"]["resourceVersion"],
        server.revision().to_string()
    );
    // A change of the other node is not for this watch.
    server
        .apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a", "labels": {"x": "y"}}}))
        .unwrap();
    server
        .apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-b", "labels": {"x": "y"}}}))
        .unwrap();
    let event = loop {
        let event = next_event(&mut stream).unwrap();
        if event["type"] != "BOOKMARK" {
            break event;
        }
    };
    assert_eq!(
        (
            event["type"].as_str(),
            event["object"]["metadata"]["name"].as_str()
        ),
        (Some("MODIFIED"), Some("node-b"))
    );
}

#[test]
fn stop_refuses_connections_and_resume_takes_the_same_port() {
    let mut server = ApiServer::start().unwrap();
    let (_, _, mut watch) = get_raw(&server, "/api/v1/services?watch=true&resourceVersion=1000");
    server.stop();
    assert!(TcpStream::connect(server.addr()).is_err());
    // The open watch was dropped, without the end of its stream.
    let mut rest = Vec::new();
    assert!(matches!(watch.read_to_end(&mut rest), Ok(0) | Err(_)));
    server.resume().unwrap();
    let (code, _) = get_json(&server, "/api/v1/services");
    assert_eq!(code, 200);
    server.fail(Resource::Service, Some(403));
    let (code, status) = get_json(&server, "/api/v1/services");
    assert_eq!((code, status["reason"].as_str()), (403, Some("Forbidden")));
}
