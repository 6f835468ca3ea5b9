//! Whether the source the agent reads answers, and what it holds: the
//! manifests or the API server, read with the agent's own source and model.

use std::{fs, time::Duration};

use super::{
    Check, Context, Status,
    snapshot::{self, Built, Snapshot},
};
use crate::report::chain;

pub(super) async fn source(cx: &Context<'_>) -> (Check, Option<Snapshot>) {
    const NAME: &str = "source";
    let args = &cx.args.source;
    let model = cx.args.model.clone();
    let built = match args.build().await {
        Ok(built) => built,
        Err(error) => {
            return (
                Check::problem(
                    NAME,
                    Status::Fail,
                    chain(&error),
                    "pass --manifests DIR, or --kubeconfig FILE for the API server",
                ),
                None,
            );
        }
    };
    let (what, source): (String, Box<dyn crate::source::Source>) = match built {
        Built::Manifests(dir, source) => {
            if let Err(error) = fs::read_dir(&dir) {
                return (
                    Check::problem(
                        NAME,
                        Status::Fail,
                        format!(
                            "cannot read the manifest directory {}: {error}",
                            dir.display()
                        ),
                        format!(
                            "make {} a readable directory, or pass the agent's --manifests",
                            dir.display()
                        ),
                    ),
                    None,
                );
            }
            (format!("manifests in {}", dir.display()), Box::new(source))
        }
        Built::Kube(source) => {
            let node = args.node_name().unwrap_or_default();
            if let Some(check) = kube_access(&source.client(), &node).await {
                return (check, None);
            }
            ("the API server".to_owned(), Box::new(source))
        }
    };
    let snapshot = match snapshot::take(source, model).await {
        Ok(snapshot) => snapshot,
        Err(error) => {
            return (
                Check::problem(
                    NAME,
                    Status::Fail,
                    format!("{what}: {}", chain(&error)),
                    "fix the source's error above; the agent names it in /healthz's body (sourceError) and its metrics (source_failing)",
                ),
                None,
            );
        }
    };
    let check = source_verdict(&what, &snapshot);
    (check, Some(snapshot))
}

/// The source check once the source was read.
fn source_verdict(what: &str, snapshot: &Snapshot) -> Check {
    const NAME: &str = "source";
    let frontends = snapshot.model.desired().frontends.len();
    let problems: Vec<String> = snapshot
        .model
        .problems()
        .iter()
        .map(ToString::to_string)
        .collect();
    if let Some(error) = &snapshot.error {
        Check::problem(
            NAME,
            Status::Warn,
            format!("{what}: {frontends} frontends; last error: {error}"),
            "fix the source's error; the agent retries by itself",
        )
    } else if !snapshot.complete {
        Check::problem(
            NAME,
            Status::Warn,
            format!(
                "{what}: {frontends} frontends, but some files do not parse (named in the warnings above); the agent keeps their last good contents"
            ),
            "fix or remove the files that do not parse",
        )
    } else if problems.is_empty() {
        Check::ok(NAME, format!("{what}: {frontends} frontends"))
    } else {
        Check::problem(
            NAME,
            Status::Warn,
            format!(
                "{what}: {frontends} frontends; {} objects or ports are skipped",
                problems.len()
            ),
            "fix the objects named below; the rest is served",
        )
        .with_details(problems)
    }
}

/// Whether the API server answers, and lets this client list what the
/// agent watches: `None` when all is well.
async fn kube_access(client: &kube::Client, node: &str) -> Option<Check> {
    use k8s_openapi::api::{
        core::v1::{Node, Service},
        discovery::v1::EndpointSlice,
    };
    use kube::{Api, api::ListParams};
    const NAME: &str = "source";
    let params = ListParams::default().limit(1);
    let timeout = Duration::from_secs(5);
    let answers = [
        (
            "list services",
            tokio::time::timeout(timeout, Api::<Service>::all(client.clone()).list(&params))
                .await
                .map(|r| r.map(drop)),
        ),
        (
            "list endpointslices",
            tokio::time::timeout(
                timeout,
                Api::<EndpointSlice>::all(client.clone()).list(&params),
            )
            .await
            .map(|r| r.map(drop)),
        ),
        (
            "get the Node",
            tokio::time::timeout(timeout, Api::<Node>::all(client.clone()).get(node))
                .await
                .map(|r| r.map(drop)),
        ),
    ];
    for (what, answer) in answers {
        let evidence = match answer {
            Ok(Ok(())) => continue,
            Err(_) => format!("the API server did not answer {what} within {timeout:?}"),
            Ok(Err(kube::Error::Api(status))) if status.code == 403 => {
                return Some(Check::problem(
                    NAME,
                    Status::Fail,
                    format!("not authorised to {what}: {}", status.message),
                    "grant the ClusterRole of deploy/rbac.yaml: `kubectl apply -k deploy/` (get, list, watch on services, nodes and endpointslices)",
                ));
            }
            Ok(Err(kube::Error::Api(status))) if status.code == 404 && what == "get the Node" => {
                return Some(Check::problem(
                    NAME,
                    Status::Fail,
                    format!("there is no Node {node:?}"),
                    "pass the node's name as --hostname-override (or NODE_NAME)",
                ));
            }
            Ok(Err(error)) => format!("cannot {what}: {}", chain(&error)),
        };
        return Some(Check::problem(
            NAME,
            Status::Fail,
            evidence,
            "check the API server's address in the kubeconfig and that this node reaches it",
        ));
    }
    None
}
