//! `deploy/` as `kubectl apply -k deploy/` would send it: the kustomization
//! is rendered (resources, generated ConfigMaps, namespace, images), every
//! object is read into its k8s-openapi type with no field left over, and
//! what replacing kube-proxy depends on is checked: read-only RBAC, the
//! DaemonSet's privileges, mounts, probes and arguments, and a ConfigMap
//! the agent's own parser accepts.
//!
//! Unprivileged: it runs in `cargo test --workspace`.

#[path = "../../proxy-userspace/src/cidr.rs"]
#[allow(
    dead_code,
    reason = "included for kube_proxy_config, which uses part of it"
)]
mod cidr;
#[path = "../../proxy-userspace/src/kube_proxy_config.rs"]
mod kube_proxy_config;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, Container, PodSpec, ServiceAccount, VolumeMount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::{Value, json};

const NAMESPACE: &str = "kube-system";
const HEALTH_PORT: i32 = 10256;

fn deploy_dir() -> PathBuf {
    xtask::workspace_root().join("deploy")
}

/// The parts of a kustomization this renderer knows; any other field fails
/// the test rather than being silently left out of the rendering.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Kustomization {
    api_version: String,
    kind: String,
    namespace: Option<String>,
    #[serde(default)]
    resources: Vec<String>,
    #[serde(default)]
    config_map_generator: Vec<ConfigMapGenerator>,
    generator_options: Option<GeneratorOptions>,
    #[serde(default)]
    images: Vec<Image>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigMapGenerator {
    name: String,
    #[serde(default)]
    files: Vec<String>,
    #[serde(default)]
    literals: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct GeneratorOptions {
    disable_name_suffix_hash: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Image {
    name: String,
    new_name: Option<String>,
    new_tag: Option<String>,
}

/// Kinds with no namespace, which kustomize's `namespace` leaves alone.
const CLUSTER_SCOPED: &[&str] = &["ClusterRole", "ClusterRoleBinding", "Namespace"];

/// What `kustomize build dir` yields, as untyped objects. Rendered here,
/// not by `kubectl kustomize`: Debian packages kubectl only as
/// kubernetes-client 1.20, whose kustomize is v2, and a plain `cargo test`
/// must pass on a machine with no kubectl at all.
fn render(dir: &Path) -> Vec<Value> {
    let kustomization: Kustomization = serde_saphyr::from_str(
        &std::fs::read_to_string(dir.join("kustomization.yaml")).expect("kustomization.yaml"),
    )
    .expect("kustomization.yaml has only fields this renderer knows");
    assert_eq!(kustomization.api_version, "kustomize.config.k8s.io/v1beta1");
    assert_eq!(kustomization.kind, "Kustomization");
    let mut objects = Vec::new();
    for resource in &kustomization.resources {
        let text = std::fs::read_to_string(dir.join(resource))
            .unwrap_or_else(|e| panic!("resource {resource}: {e}"));
        let documents: Vec<Value> = serde_saphyr::from_multiple(&text)
            .unwrap_or_else(|e| panic!("resource {resource} is not YAML: {e}"));
        for object in documents {
            if !object.is_null() {
                objects.push(object);
            }
        }
    }
    if !kustomization.config_map_generator.is_empty() {
        // With the hash suffix, kustomize renames the ConfigMaps and every
        // reference to them; this renderer does not, so it must be off.
        assert!(
            kustomization
                .generator_options
                .as_ref()
                .is_some_and(|o| o.disable_name_suffix_hash),
            "generated ConfigMaps must keep their names (disableNameSuffixHash)"
        );
    }
    for generator in &kustomization.config_map_generator {
        let mut data = BTreeMap::new();
        for file in &generator.files {
            let (key, path) = file.split_once('=').unwrap_or_else(|| {
                let name = Path::new(file).file_name().expect("a file name");
                (name.to_str().expect("UTF-8"), file)
            });
            let contents = std::fs::read_to_string(dir.join(path))
                .unwrap_or_else(|e| panic!("ConfigMap {} file {path}: {e}", generator.name));
            data.insert(key.to_owned(), contents);
        }
        for literal in &generator.literals {
            let (key, value) = literal
                .split_once('=')
                .unwrap_or_else(|| panic!("literal {literal:?} has no ="));
            data.insert(key.to_owned(), value.to_owned());
        }
        objects.push(json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": generator.name},
            "data": data,
        }));
    }
    for object in &mut objects {
        let kind = object["kind"].as_str().unwrap_or_default().to_owned();
        if let Some(namespace) = &kustomization.namespace
            && !CLUSTER_SCOPED.contains(&kind.as_str())
        {
            object["metadata"]["namespace"] = json!(namespace);
        }
        for list in ["initContainers", "containers"] {
            // pointer_mut, as indexing a Value would add what is missing.
            let Some(containers) = object
                .pointer_mut(&format!("/spec/template/spec/{list}"))
                .and_then(Value::as_array_mut)
            else {
                continue;
            };
            for container in containers {
                let image = container["image"].as_str().unwrap_or_default();
                let (name, tag) = image.split_once(':').unwrap_or((image, ""));
                if let Some(rule) = kustomization.images.iter().find(|i| i.name == name) {
                    let name = rule.new_name.as_deref().unwrap_or(name);
                    let tag = rule.new_tag.as_deref().unwrap_or(tag);
                    container["image"] = json!(if tag.is_empty() {
                        name.to_owned()
                    } else {
                        format!("{name}:{tag}")
                    });
                }
            }
        }
    }
    objects
}

/// Paths of `input` that `output` lacks or holds otherwise.
fn differences(input: &Value, output: &Value, path: &str, found: &mut Vec<String>) {
    match (input, output) {
        (Value::Object(fields), Value::Object(kept)) => {
            for (name, value) in fields {
                let path = format!("{path}.{name}");
                match kept.get(name) {
                    Some(kept) => differences(value, kept, &path, found),
                    None => found.push(path),
                }
            }
        }
        (Value::Array(items), Value::Array(kept)) if items.len() == kept.len() => {
            for (i, (item, kept)) in items.iter().zip(kept).enumerate() {
                differences(item, kept, &format!("{path}[{i}]"), found);
            }
        }
        (input, output) if input == output => {}
        _ => found.push(path.to_owned()),
    }
}

/// The object as its k8s-openapi type. k8s-openapi skips fields it does not
/// know, so the typed value is written back and compared with the input:
/// whatever did not survive is a field the API server would not know
/// either (a typo, a wrong level of indentation).
fn typed<T: DeserializeOwned + Serialize>(object: &Value) -> T {
    let what = format!("{}/{}", object["kind"], object["metadata"]["name"]);
    let value: T = serde_json::from_value(object.clone())
        .unwrap_or_else(|e| panic!("{what} does not parse: {e}"));
    let back = serde_json::to_value(&value).expect("serialises");
    let mut unknown = Vec::new();
    differences(object, &back, "", &mut unknown);
    assert!(
        unknown.is_empty(),
        "{what}: fields Kubernetes does not know (or that change on the way): {unknown:?}"
    );
    value
}

/// The rendered objects, typed.
#[derive(Default)]
struct Deploy {
    daemon_sets: Vec<DaemonSet>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    config_maps: Vec<ConfigMap>,
}

fn deploy() -> Deploy {
    let mut deploy = Deploy::default();
    for object in render(&deploy_dir()) {
        let namespace = object["metadata"]["namespace"].as_str();
        let kind = object["kind"].as_str().unwrap_or_default();
        if CLUSTER_SCOPED.contains(&kind) {
            assert_eq!(namespace, None, "{kind} is cluster-scoped");
        } else {
            assert_eq!(namespace, Some(NAMESPACE), "{kind} {}", object["metadata"]);
        }
        match kind {
            "DaemonSet" => deploy.daemon_sets.push(typed(&object)),
            "ServiceAccount" => deploy.service_accounts.push(typed(&object)),
            "ClusterRole" => deploy.cluster_roles.push(typed(&object)),
            "ClusterRoleBinding" => deploy.bindings.push(typed(&object)),
            "ConfigMap" => deploy.config_maps.push(typed(&object)),
            other => panic!("deploy/ renders a {other} this test does not check"),
        }
    }
    deploy
}

fn name<
    T: k8s_openapi::Metadata<Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>,
>(
    object: &T,
) -> &str {
    object.metadata().name.as_deref().unwrap_or_default()
}

fn one<'a, T>(objects: &'a [T], what: &str) -> &'a T {
    assert_eq!(objects.len(), 1, "expected one {what}");
    &objects[0]
}

fn config_map<'a>(deploy: &'a Deploy, wanted: &str) -> &'a ConfigMap {
    deploy
        .config_maps
        .iter()
        .find(|c| name(*c) == wanted)
        .unwrap_or_else(|| panic!("no ConfigMap {wanted} is rendered"))
}

fn pod_spec(daemon_set: &DaemonSet) -> &PodSpec {
    daemon_set
        .spec
        .template
        .spec
        .as_ref()
        .expect("a pod template spec")
}

fn agent(daemon_set: &DaemonSet) -> &Container {
    let pod = pod_spec(daemon_set);
    pod.containers
        .iter()
        .find(|c| c.name == "agent")
        .expect("an agent container")
}

fn mount<'a>(container: &'a Container, path: &str) -> &'a VolumeMount {
    container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == path)
        .unwrap_or_else(|| panic!("{} mounts nothing at {path}", container.name))
}

#[test]
fn rbac_is_read_only_on_exactly_services_endpointslices_and_nodes() {
    let deploy = deploy();
    let role = one(&deploy.cluster_roles, "ClusterRole");
    let mut granted = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        assert!(
            rule.resource_names.is_none() && rule.non_resource_urls.is_none(),
            "{rule:?}"
        );
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    granted.insert((group.as_str(), resource.as_str(), verb.as_str()));
                }
            }
        }
    }
    let mut expected = BTreeSet::new();
    for (group, resource) in [
        ("", "services"),
        ("", "nodes"),
        ("discovery.k8s.io", "endpointslices"),
    ] {
        for verb in ["get", "list", "watch"] {
            expected.insert((group, resource, verb));
        }
    }
    assert_eq!(granted, expected);

    let account = one(&deploy.service_accounts, "ServiceAccount");
    let binding = one(&deploy.bindings, "ClusterRoleBinding");
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(binding.role_ref.name, name(role));
    let subjects = binding.subjects.as_deref().unwrap_or_default();
    assert_eq!(subjects.len(), 1, "{subjects:?}");
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(subjects[0].name, name(account));
    assert_eq!(subjects[0].namespace.as_deref(), Some(NAMESPACE));
    let daemon_set = one(&deploy.daemon_sets, "DaemonSet");
    let pod = pod_spec(daemon_set);
    assert_eq!(pod.service_account_name.as_deref(), Some(name(account)));
}

#[test]
fn the_daemonset_runs_on_every_node_with_capabilities_not_privilege() {
    let deploy = deploy();
    let daemon_set = one(&deploy.daemon_sets, "DaemonSet");
    let pod = pod_spec(daemon_set);
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(
        pod.host_pid,
        Some(true),
        "the pods' namespaces are found by pid"
    );
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert!(
        pod.tolerations
            .iter()
            .flatten()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "no toleration of every taint: {:?}",
        pod.tolerations
    );

    let agent = agent(daemon_set);
    let security = agent.security_context.as_ref().expect("a securityContext");
    assert_ne!(security.privileged, Some(true), "the agent is privileged");
    let capabilities = security.capabilities.as_ref().expect("capabilities");
    let added: BTreeSet<&str> = capabilities
        .add
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    assert_eq!(
        added,
        BTreeSet::from([
            "BPF",
            "NET_ADMIN",
            "SYS_ADMIN",
            "PERFMON",
            "SYS_RESOURCE",
            "NET_RAW",
            "SYS_PTRACE"
        ])
    );
    assert_eq!(capabilities.drop.as_deref(), Some(&["ALL".to_owned()][..]));

    // Bidirectional propagation only where Kubernetes allows it: in the
    // privileged init container that mounts bpffs.
    assert_eq!(
        mount(agent, "/sys/fs/bpf").mount_propagation.as_deref(),
        Some("HostToContainer")
    );
    let init = pod.init_containers.iter().flatten().collect::<Vec<_>>();
    assert_eq!(init.len(), 1);
    assert_eq!(
        init[0].security_context.as_ref().and_then(|s| s.privileged),
        Some(true)
    );
    assert_eq!(
        mount(init[0], "/sys/fs/bpf").mount_propagation.as_deref(),
        Some("Bidirectional")
    );
    for container in pod.containers.iter().chain(init.iter().copied()) {
        let bidirectional = container
            .volume_mounts
            .iter()
            .flatten()
            .any(|m| m.mount_propagation.as_deref() == Some("Bidirectional"));
        let privileged = container
            .security_context
            .as_ref()
            .and_then(|s| s.privileged);
        assert!(
            !bidirectional || privileged == Some(true),
            "{} mounts Bidirectional unprivileged: the API server refuses that",
            container.name
        );
        let resources = container.resources.as_ref().expect("resources");
        let requests = resources.requests.as_ref().expect("requests");
        let limits = resources.limits.as_ref().expect("limits");
        assert!(
            requests.contains_key("cpu") && requests.contains_key("memory"),
            "{}",
            container.name
        );
        assert!(limits.contains_key("memory"), "{}", container.name);
    }
}

#[test]
fn the_agent_gets_its_arguments_mounts_probes_and_node_name() {
    let deploy = deploy();
    let daemon_set = one(&deploy.daemon_sets, "DaemonSet");
    let pod = pod_spec(daemon_set);
    let agent = agent(daemon_set);
    assert_eq!(agent.image.as_deref(), Some("ebpf-proxy:dev"));
    assert_eq!(
        agent.args.as_deref().unwrap_or_default(),
        [
            "run",
            "--config",
            "/etc/kube-proxy/config.conf",
            "--cgroup",
            "/run/ebpf-proxy/cgroupv2",
            "--bpffs",
            "/sys/fs/bpf/ebpf-proxy",
        ]
    );
    let node_name = agent
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME");
    assert_eq!(
        node_name
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str()),
        Some("spec.nodeName")
    );

    // Each argument's path is a volume of the right source.
    let volume = |mount: &VolumeMount| {
        pod.volumes
            .iter()
            .flatten()
            .find(|v| v.name == mount.name)
            .unwrap_or_else(|| panic!("no volume {}", mount.name))
    };
    let host_path = |path| {
        volume(mount(agent, path))
            .host_path
            .as_ref()
            .map(|h| h.path.clone())
    };
    assert_eq!(host_path("/sys/fs/bpf").as_deref(), Some("/sys/fs/bpf"));
    assert_eq!(
        host_path("/run/ebpf-proxy/cgroupv2").as_deref(),
        Some("/sys/fs/cgroup")
    );
    assert_eq!(
        host_path("/run/xtables.lock").as_deref(),
        Some("/run/xtables.lock")
    );
    let config_volume = volume(mount(agent, "/etc/kube-proxy"));
    let config_name = config_volume
        .config_map
        .as_ref()
        .map(|c| c.name.as_str())
        .expect("/etc/kube-proxy is a ConfigMap");
    let config = config_map(&deploy, config_name);
    assert!(
        config
            .data
            .as_ref()
            .is_some_and(|d| d.contains_key("config.conf")),
        "ConfigMap {config_name} has no config.conf"
    );

    // The in-cluster client's address, which must not be a ClusterIP.
    let from = agent.env_from.as_deref().unwrap_or_default();
    assert_eq!(from.len(), 1);
    let apiserver_name = &from[0].config_map_ref.as_ref().expect("a ConfigMap").name;
    let apiserver = config_map(&deploy, apiserver_name)
        .data
        .clone()
        .unwrap_or_default();
    assert!(
        apiserver.contains_key("KUBERNETES_SERVICE_HOST")
            && apiserver.contains_key("KUBERNETES_SERVICE_PORT"),
        "{apiserver:?}"
    );

    for (probe, path) in [
        (agent.liveness_probe.as_ref(), "/livez"),
        (agent.readiness_probe.as_ref(), "/healthz"),
    ] {
        let get = probe
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("no HTTP probe of {path}"));
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(get.port, IntOrString::Int(HEALTH_PORT));
    }
}

#[test]
fn the_configmap_parses_with_the_agent_parser_and_serves_health_where_probed() {
    let deploy = deploy();
    let config = config_map(&deploy, "ebpf-proxy");
    let text = &config.data.as_ref().expect("data")["config.conf"];
    let parsed = kube_proxy_config::parse(text).expect("the agent accepts deploy's ConfigMap");
    assert!(parsed.ignored.is_empty(), "{:?}", parsed.ignored);
    assert_eq!(
        parsed.healthz_bind_address.map(|a| i32::from(a.port())),
        Some(HEALTH_PORT),
        "the probes would knock at a closed port"
    );
}

#[test]
fn fields_kubernetes_does_not_know_are_caught() {
    let daemon_set = render(&deploy_dir())
        .into_iter()
        .find(|o| o["kind"] == "DaemonSet")
        .unwrap();
    let mut broken = daemon_set.clone();
    broken["spec"]["template"]["spec"]["hostNetwrok"] = json!(true);
    let caught = std::panic::catch_unwind(|| typed::<DaemonSet>(&broken));
    assert!(caught.is_err(), "a misspelt field went through");
    typed::<DaemonSet>(&daemon_set);
}
