use super::*;

/// The ConfigMap kubeadm writes (`kubectl -n kube-system get configmap
/// kube-proxy -o jsonpath='{.data.config\.conf}'`, Kubernetes 1.31), with
/// the pod subnet given at `kubeadm init`.
const KUBEADM_DEFAULT: &str = r#"
apiVersion: kubeproxy.config.k8s.io/v1alpha1
bindAddress: 0.0.0.0
bindAddressHardFail: false
clientConnection:
  acceptContentTypes: ""
  burst: 0
  contentType: ""
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 0
clusterCIDR: 10.244.0.0/16
configSyncPeriod: 0s
conntrack:
  maxPerCore: null
  min: null
  tcpBeLiberal: false
  tcpCloseWaitTimeout: null
  tcpEstablishedTimeout: null
  udpStreamTimeout: 0s
  udpTimeout: 0s
detectLocal:
  bridgeInterface: ""
  interfaceNamePrefix: ""
detectLocalMode: ""
enableProfiling: false
healthzBindAddress: ""
hostnameOverride: ""
iptables:
  localhostNodePorts: null
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
ipvs:
  excludeCIDRs: null
  minSyncPeriod: 0s
  scheduler: ""
  strictARP: false
  syncPeriod: 0s
  tcpFinTimeout: 0s
  tcpTimeout: 0s
  udpTimeout: 0s
kind: KubeProxyConfiguration
logging:
  flushFrequency: 0
  options:
    json:
      infoBufferSize: "0"
    text:
      infoBufferSize: "0"
  verbosity: 0
metricsBindAddress: ""
mode: ""
nftables:
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
nodePortAddresses: null
oomScoreAdj: null
portRange: ""
showHiddenMetricsForVersion: ""
winkernel:
  enableDSR: false
  forwardHealthCheckVip: false
  networkName: ""
  rootHnsEndpointName: ""
  sourceVip: ""
"#;

/// What kubeadm wrote before 1.20 (ipvs mode, and fields since removed):
/// clusters upgraded since still carry them.
const KUBEADM_1_19_IPVS: &str = r#"
apiVersion: kubeproxy.config.k8s.io/v1alpha1
bindAddress: 0.0.0.0
clientConnection:
  acceptContentTypes: ""
  burst: 10
  contentType: application/vnd.kubernetes.protobuf
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 5
clusterCIDR: 10.244.0.0/16
configSyncPeriod: 15m0s
conntrack:
  max: null
  maxPerCore: 32768
  min: 131072
  tcpCloseWaitTimeout: 1h0m0s
  tcpEstablishedTimeout: 24h0m0s
enableProfiling: false
healthzBindAddress: 0.0.0.0:10256
hostnameOverride: ""
iptables:
  masqueradeAll: false
  masqueradeBit: 14
  minSyncPeriod: 0s
  syncPeriod: 30s
ipvs:
  excludeCIDRs: null
  minSyncPeriod: 0s
  scheduler: ""
  syncPeriod: 30s
kind: KubeProxyConfiguration
metricsBindAddress: 127.0.0.1:10249
mode: "ipvs"
nodePortAddresses: null
oomScoreAdj: -999
portRange: ""
resourceContainer: /kube-proxy
udpIdleTimeout: 250ms
"#;

const HEADER: &str = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n";

fn parse_body(body: &str) -> Result<KubeProxyConfig, ConfigError> {
    parse(&format!("{HEADER}{body}"))
}

fn cidr(text: &str) -> Cidr {
    text.parse().unwrap()
}

#[test]
fn kubeadm_default_gives_its_cluster_cidr_and_lists_what_it_sets_in_vain() {
    let config = parse(KUBEADM_DEFAULT).unwrap();
    assert_eq!(
        config,
        KubeProxyConfig {
            cluster_cidrs: vec![cidr("10.244.0.0/16")],
            // kube-proxy's own default, read as written.
            verbosity: Some(0),
            // Only what kubeadm sets to other than the zero value.
            ignored: vec!["bindAddress".into(), "clientConnection.kubeconfig".into()],
            ..KubeProxyConfig::default()
        }
    );
}

#[test]
fn old_kubeadm_ipvs_config_is_read_and_its_other_settings_listed() {
    let config = parse(KUBEADM_1_19_IPVS).unwrap();
    assert_eq!(config.cluster_cidrs, vec![cidr("10.244.0.0/16")]);
    assert_eq!(config.masquerade_bit, Some(14));
    assert_eq!(
        config.healthz_bind_address,
        Some("0.0.0.0:10256".parse().unwrap())
    );
    assert_eq!(
        config.metrics_bind_address,
        Some("127.0.0.1:10249".parse().unwrap())
    );
    assert_eq!(config.min_sync_period, None);
    assert_eq!(
        config.ignored,
        [
            "bindAddress",
            "clientConnection.burst",
            "clientConnection.contentType",
            "clientConnection.kubeconfig",
            "clientConnection.qps",
            "configSyncPeriod",
            "conntrack.maxPerCore",
            "conntrack.min",
            "conntrack.tcpCloseWaitTimeout",
            "conntrack.tcpEstablishedTimeout",
            "iptables.syncPeriod",
            "ipvs.syncPeriod",
            "mode",
            "oomScoreAdj",
            "resourceContainer",
            "udpIdleTimeout",
        ]
    );
}

#[test]
fn the_configmap_deploy_ships_parses_with_what_it_promises() {
    // The crate's parent is the workspace, for the agent and xtask alike.
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let config = load(&deploy.join("kube-proxy-config.conf")).unwrap();
    assert_eq!(config.cluster_cidrs, vec![cidr("10.244.0.0/16")]);
    assert_eq!(
        config.healthz_bind_address,
        Some("0.0.0.0:10256".parse().unwrap())
    );
    assert_eq!(config.masquerade_bit, Some(14));
    assert_eq!(config.min_sync_period, Some(Duration::from_secs(1)));
    assert!(config.ignored.is_empty(), "{:?}", config.ignored);
}

#[test]
fn every_field_that_applies_is_read() {
    let config = parse_body(
        r"
clusterCIDR: 10.244.0.0/16, fd00:10:244::/56
nodePortAddresses: [192.168.1.0/24, primary, localhost, all]
hostnameOverride: ' Node-1 '
healthzBindAddress: '[::]:10256'
metricsBindAddress: 0.0.0.0
iptables:
  masqueradeAll: true
  masqueradeBit: 31
  minSyncPeriod: 1m30.5s
logging:
  format: json
  verbosity: 4
",
    )
    .unwrap();
    assert_eq!(
        config,
        KubeProxyConfig {
            cluster_cidrs: vec![cidr("10.244.0.0/16"), cidr("fd00:10:244::/56")],
            node_port_addresses: vec![
                NodePortAddress::Cidr(cidr("192.168.1.0/24")),
                NodePortAddress::Primary,
                NodePortAddress::Localhost,
                NodePortAddress::All,
            ],
            masquerade_all: true,
            masquerade_bit: Some(31),
            healthz_bind_address: Some("[::]:10256".parse().unwrap()),
            metrics_bind_address: Some("0.0.0.0:10249".parse().unwrap()),
            hostname_override: Some("node-1".to_owned()),
            min_sync_period: Some(Duration::from_millis(90_500)),
            logging_format: Some(LogFormat::Json),
            verbosity: Some(4),
            ignored: Vec::new(),
        }
    );
}

#[test]
fn json_is_read_too() {
    let config = parse(
        r#"{"apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
            "clusterCIDR": "10.0.0.0/8", "mode": "nftables", "iptables": {"masqueradeAll": true}}"#,
    )
    .unwrap();
    assert_eq!(config.cluster_cidrs, vec![cidr("10.0.0.0/8")]);
    assert!(config.masquerade_all);
    assert_eq!(config.ignored, ["mode"]);
}

#[test]
fn fields_that_do_not_apply_are_listed_when_set() {
    let config = parse_body(
        r"
mode: ipvs
ipvs: {scheduler: rr, strictARP: true, tcpTimeout: 0s}
nftables: {masqueradeAll: true}
featureGates: {SomeGate: true}
logging: {verbosity: 4, options: {json: {splitStream: true}}}
",
    )
    .unwrap();
    assert_eq!(
        config.ignored,
        [
            "featureGates",
            "ipvs.scheduler",
            "ipvs.strictARP",
            "logging.options.json.splitStream",
            "mode",
            "nftables.masqueradeAll",
        ]
    );
    // nftables.masqueradeAll is kube-proxy's nftables mode, not ours.
    assert!(!config.masquerade_all);
}

#[test]
fn unknown_fields_are_refused_with_their_path() {
    for (body, path) in [
        ("clusterCidr: 10.0.0.0/8\n", "clusterCidr"),
        (
            "iptables: {masqueradeBits: 14}\n",
            "iptables.masqueradeBits",
        ),
        (
            "logging: {options: {text: {color: true}}}\n",
            "logging.options.text.color",
        ),
    ] {
        match parse_body(body) {
            Err(ConfigError::UnknownField { path: found }) => assert_eq!(found, path),
            other => panic!("{body}: expected unknown field {path}, got {other:?}"),
        }
    }
}

#[test]
fn another_api_version_or_kind_is_refused() {
    for text in [
        "apiVersion: kubeproxy.config.k8s.io/v1beta1\nkind: KubeProxyConfiguration\n",
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeletConfiguration\n",
        "kind: KubeProxyConfiguration\n",
        "apiVersion: v1\nkind: ConfigMap\ndata: {}\n",
    ] {
        assert!(
            matches!(parse(text), Err(ConfigError::WrongType { .. })),
            "{text}"
        );
    }
    assert!(matches!(parse("- a\n- b\n"), Err(ConfigError::NotAnObject)));
    assert!(matches!(parse("{"), Err(ConfigError::Syntax(_))));
}

#[test]
fn bad_values_are_refused_naming_the_field() {
    for (body, field) in [
        ("clusterCIDR: 10.244.0.0\n", "clusterCIDR"),
        ("clusterCIDR: 10.244.0.0/33\n", "clusterCIDR"),
        ("nodePortAddresses: [everywhere]\n", "nodePortAddresses"),
        ("iptables: {masqueradeBit: 32}\n", "iptables.masqueradeBit"),
        ("iptables: {masqueradeBit: -1}\n", "iptables.masqueradeBit"),
        ("iptables: {minSyncPeriod: 5}\n", "iptables.minSyncPeriod"),
        ("iptables: {minSyncPeriod: 1d}\n", "iptables.minSyncPeriod"),
        (
            "healthzBindAddress: localhost:10256\n",
            "healthzBindAddress",
        ),
    ] {
        match parse_body(body) {
            Err(ConfigError::Invalid { field: found, .. }) => assert_eq!(found, field, "{body}"),
            other => panic!("{body}: expected invalid {field}, got {other:?}"),
        }
    }
    assert!(matches!(
        parse_body("iptables: 5\n"),
        Err(ConfigError::NotAnObjectField { .. })
    ));
}

#[test]
fn go_durations_parse_as_go_does() {
    for (text, expected) in [
        ("0", Duration::ZERO),
        ("0s", Duration::ZERO),
        ("1s", Duration::from_secs(1)),
        ("500ms", Duration::from_millis(500)),
        ("1m30s", Duration::from_secs(90)),
        ("1.5h", Duration::from_mins(90)),
        ("2h45m0.5s", Duration::from_millis(9_900_500)),
        ("10us", Duration::from_micros(10)),
        ("10\u{b5}s", Duration::from_micros(10)),
        ("7ns", Duration::from_nanos(7)),
        (".5s", Duration::from_millis(500)),
    ] {
        assert_eq!(parse_go_duration(text), Ok(expected), "{text}");
    }
    for text in [
        "",
        "1",
        "s",
        "1x",
        "-1s",
        "1.2.3s",
        "1..s",
        "99999999999999h",
    ] {
        assert!(parse_go_duration(text).is_err(), "{text}");
    }
}

#[test]
fn a_missing_file_is_named() {
    let error = load(Path::new("/nonexistent/config.conf")).unwrap_err();
    assert!(
        matches!(&error, ConfigError::Read { path, .. } if path == Path::new("/nonexistent/config.conf")),
        "{error:?}"
    );
}
