//! The Docker Engine API objects meshd reads, as its own serde types.
//!
//! Only the fields a router needs. Every struct takes `#[serde(default)]` and ignores
//! unknown fields, and every field also accepts `null` (Go encodes a nil map or slice as
//! `null`): an engine newer or older than the one these were recorded from still decodes.
//!
//! Why not bollard: its generated `Task` type has no `NetworksAttachments` (the task's
//! addresses on each network, the one thing a router dials), and it pins an API version
//! the engine may not serve. These types are checked against answers recorded from a real
//! engine (`tests/fixtures/docker/`).

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer};

/// `null` -> the default, anything else as usual.
fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// `GET /version` (unversioned path: it is how the API version is found).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct Version {
    /// The engine's release, e.g. "20.10.24".
    #[serde(deserialize_with = "nullable")]
    pub version: String,
    /// The newest API version the engine serves, e.g. "1.41".
    #[serde(deserialize_with = "nullable")]
    pub api_version: String,
    /// The oldest API version it still serves, e.g. "1.12".
    #[serde(rename = "MinAPIVersion", deserialize_with = "nullable")]
    pub min_api_version: String,
}

/// `GET /info`, only what meshd uses: which Swarm node this engine is (workers answer
/// too).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct Info {
    #[serde(deserialize_with = "nullable")]
    pub swarm: InfoSwarm,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct InfoSwarm {
    /// Empty when the engine is in no swarm.
    #[serde(rename = "NodeID", deserialize_with = "nullable")]
    pub node_id: String,
}

/// One element of `GET /services`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct Service {
    #[serde(rename = "ID", deserialize_with = "nullable")]
    pub id: String,
    /// RFC 3339, e.g. "2026-11-22T01:32:58.614577234Z": the older of two services that
    /// publish the same port keeps it.
    #[serde(deserialize_with = "nullable")]
    pub created_at: String,
    #[serde(deserialize_with = "nullable")]
    pub spec: ServiceSpec,
    #[serde(deserialize_with = "nullable")]
    pub endpoint: Endpoint,
    /// Absent until the service's first update.
    #[serde(deserialize_with = "nullable")]
    pub update_status: Option<UpdateStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct ServiceSpec {
    #[serde(deserialize_with = "nullable")]
    pub name: String,
    /// Service labels (`docker service create --label`, compose `deploy.labels`): where the
    /// `mesh.*` opt-in lives.
    #[serde(deserialize_with = "nullable")]
    pub labels: BTreeMap<String, String>,
    #[serde(deserialize_with = "nullable")]
    pub task_template: TaskTemplate,
    #[serde(deserialize_with = "nullable")]
    pub update_config: Option<UpdateConfig>,
    #[serde(deserialize_with = "nullable")]
    pub endpoint_spec: Option<EndpointSpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct TaskTemplate {
    #[serde(deserialize_with = "nullable")]
    pub networks: Vec<NetworkAttachmentConfig>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct NetworkAttachmentConfig {
    /// The network's ID (or name, as the client sent it).
    #[serde(deserialize_with = "nullable")]
    pub target: String,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct UpdateConfig {
    /// "stop-first" (the default) or "start-first".
    #[serde(deserialize_with = "nullable")]
    pub order: String,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct EndpointSpec {
    /// "vip" (the default) or "dnsrr". meshd dials task addresses either way.
    #[serde(deserialize_with = "nullable")]
    pub mode: String,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct Endpoint {
    #[serde(rename = "VirtualIPs", deserialize_with = "nullable")]
    pub virtual_ips: Vec<VirtualIp>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct VirtualIp {
    #[serde(rename = "NetworkID", deserialize_with = "nullable")]
    pub network_id: String,
    /// CIDR, e.g. "10.0.1.9/24".
    #[serde(deserialize_with = "nullable")]
    pub addr: String,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct UpdateStatus {
    /// "updating", "paused", "completed", "rollback_started", "rollback_paused",
    /// "rollback_completed".
    #[serde(deserialize_with = "nullable")]
    pub state: String,
    #[serde(deserialize_with = "nullable")]
    pub message: String,
}

/// One element of `GET /tasks`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct Task {
    #[serde(rename = "ID", deserialize_with = "nullable")]
    pub id: String,
    #[serde(rename = "ServiceID", deserialize_with = "nullable")]
    pub service_id: String,
    /// Empty until the task is scheduled.
    #[serde(rename = "NodeID", deserialize_with = "nullable")]
    pub node_id: String,
    /// Replicated services only (0 for global ones).
    #[serde(deserialize_with = "nullable")]
    pub slot: u64,
    /// What the orchestrator wants: "running", or "shutdown"/"remove" once it is being
    /// stopped (never back to "running": a restart is a new task with a new ID).
    #[serde(deserialize_with = "nullable")]
    pub desired_state: String,
    #[serde(deserialize_with = "nullable")]
    pub status: TaskStatus,
    #[serde(deserialize_with = "nullable")]
    pub networks_attachments: Vec<NetworkAttachment>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct TaskStatus {
    /// "new" ... "starting", "running", "complete", "shutdown", "failed", "rejected", ...
    #[serde(deserialize_with = "nullable")]
    pub state: String,
    #[serde(deserialize_with = "nullable")]
    pub message: String,
    #[serde(rename = "Err", deserialize_with = "nullable")]
    pub err: String,
    /// The task's host-mode published ports (`--publish mode=host,...`): set once the
    /// container runs; a publish without a published port gets one picked by Docker.
    #[serde(deserialize_with = "nullable")]
    pub port_status: PortStatus,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct PortStatus {
    #[serde(deserialize_with = "nullable")]
    pub ports: Vec<PortConfig>,
}

/// One published port of a task.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct PortConfig {
    /// "tcp", "udp" or "sctp".
    #[serde(deserialize_with = "nullable")]
    pub protocol: String,
    #[serde(deserialize_with = "nullable")]
    pub target_port: u32,
    /// The port on the task's node (0 when none was published).
    #[serde(deserialize_with = "nullable")]
    pub published_port: u32,
    /// "host" (on the task's node only) or "ingress" (the routing mesh).
    #[serde(deserialize_with = "nullable")]
    pub publish_mode: String,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct NetworkAttachment {
    #[serde(deserialize_with = "nullable")]
    pub network: Network,
    /// CIDR strings, e.g. "10.0.1.5/24".
    #[serde(deserialize_with = "nullable")]
    pub addresses: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct Network {
    #[serde(rename = "ID", deserialize_with = "nullable")]
    pub id: String,
    #[serde(deserialize_with = "nullable")]
    pub spec: NetworkSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct NetworkSpec {
    #[serde(deserialize_with = "nullable")]
    pub name: String,
    /// The routing-mesh network (IPVS): never the one meshd dials tasks on.
    #[serde(deserialize_with = "nullable")]
    pub ingress: bool,
}

/// One element of `GET /nodes`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct Node {
    #[serde(rename = "ID", deserialize_with = "nullable")]
    pub id: String,
    #[serde(deserialize_with = "nullable")]
    pub spec: NodeSpec,
    #[serde(deserialize_with = "nullable")]
    pub status: NodeStatus,
    #[serde(deserialize_with = "nullable")]
    pub description: NodeDescription,
    /// Managers only.
    #[serde(deserialize_with = "nullable")]
    pub manager_status: Option<ManagerStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct ManagerStatus {
    /// The manager's swarm address, "IP:2377".
    #[serde(deserialize_with = "nullable")]
    pub addr: String,
}

impl Node {
    /// The address other nodes reach this node on: `Status.Addr`, or, when that says
    /// 0.0.0.0 (a manager that was given `--advertise-addr` by interface can report it so),
    /// the IP of `ManagerStatus.Addr`.
    pub fn address(&self) -> Option<std::net::IpAddr> {
        let ip = self.status.addr.trim().parse::<std::net::IpAddr>().ok();
        match ip {
            Some(ip) if !ip.is_unspecified() => Some(ip),
            _ => self
                .manager_status
                .as_ref()
                .and_then(|m| m.addr.parse::<std::net::SocketAddr>().ok())
                .map(|a| a.ip())
                .filter(|ip| !ip.is_unspecified()),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct NodeSpec {
    /// "active", "pause" or "drain".
    #[serde(deserialize_with = "nullable")]
    pub availability: String,
    /// "manager" or "worker".
    #[serde(deserialize_with = "nullable")]
    pub role: String,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct NodeStatus {
    /// "unknown", "down", "ready" or "disconnected". A dead node turns "down" only after
    /// ~15 s of missed heartbeats; connect retry covers that window.
    #[serde(deserialize_with = "nullable")]
    pub state: String,
    /// The node's address ("10.0.0.5"), as other nodes see it.
    #[serde(deserialize_with = "nullable")]
    pub addr: String,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct NodeDescription {
    #[serde(deserialize_with = "nullable")]
    pub hostname: String,
}

/// `GET /containers/{id}/json`, for meshd's own container: which networks meshd is on.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct Container {
    #[serde(rename = "Id", deserialize_with = "nullable")]
    pub id: String,
    #[serde(deserialize_with = "nullable")]
    pub network_settings: NetworkSettings,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct NetworkSettings {
    /// By network name.
    #[serde(deserialize_with = "nullable")]
    pub networks: BTreeMap<String, ContainerNetwork>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct ContainerNetwork {
    #[serde(rename = "NetworkID", deserialize_with = "nullable")]
    pub network_id: String,
}

/// One line of the `GET /events` stream (only its kind matters: events are triggers).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Event {
    #[serde(rename = "Type", deserialize_with = "nullable")]
    pub kind: String,
    #[serde(rename = "Action", deserialize_with = "nullable")]
    pub action: String,
    #[serde(rename = "Actor", deserialize_with = "nullable")]
    pub actor: Actor,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
pub struct Actor {
    #[serde(rename = "ID", deserialize_with = "nullable")]
    pub id: String,
    #[serde(deserialize_with = "nullable")]
    pub attributes: BTreeMap<String, String>,
}

/// The body of an error answer: `{"message": "..."}`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct ErrorBody {
    #[serde(deserialize_with = "nullable")]
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    const TASKS: &str = include_str!("../../../tests/fixtures/docker/tasks-start-first.json");
    const SERVICES: &str = include_str!("../../../tests/fixtures/docker/services-stop-first.json");
    const NODES: &str = include_str!("../../../tests/fixtures/docker/nodes.json");
    const VERSION: &str = include_str!("../../../tests/fixtures/docker/version.json");
    const EVENTS: &str = include_str!("../../../tests/fixtures/docker/events.jsonl");

    #[test]
    fn decodes_recorded_answers() {
        let v: Version = serde_json::from_str(VERSION).unwrap();
        assert_eq!(v.api_version, "1.41");
        assert_eq!(v.min_api_version, "1.12");

        let s: Vec<Service> = serde_json::from_str(SERVICES).unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].spec.name, "meshfix-web");
        assert_eq!(s[0].spec.labels["mesh.publish"], "8080:80");
        assert_eq!(s[0].spec.task_template.networks.len(), 1);
        assert_eq!(
            s[0].spec.update_config.as_ref().unwrap().order,
            "stop-first"
        );
        assert_eq!(s[0].spec.endpoint_spec.as_ref().unwrap().mode, "dnsrr");
        assert_eq!(s[0].update_status.as_ref().unwrap().state, "updating");

        let t: Vec<Task> = serde_json::from_str(TASKS).unwrap();
        let stopping = t
            .iter()
            .find(|t| t.desired_state == "shutdown" && t.status.state == "running")
            .unwrap();
        assert_eq!(stopping.service_id, s[0].id);
        assert!(stopping.slot >= 1);
        let att = &stopping.networks_attachments[0];
        assert_eq!(att.network.spec.name, "meshfix");
        assert!(!att.network.spec.ingress);
        assert!(att.addresses[0].starts_with("10.") && att.addresses[0].ends_with("/24"));

        let n: Vec<Node> = serde_json::from_str(NODES).unwrap();
        assert_eq!(n[0].status.state, "ready");
        assert_eq!(n[0].spec.availability, "active");
        assert_eq!(n[0].spec.role, "manager");

        let kinds: Vec<String> = EVENTS
            .lines()
            .map(|l| serde_json::from_str::<Event>(l).unwrap().kind)
            .collect();
        assert!(kinds.iter().any(|k| k == "service"));
    }

    #[test]
    fn nulls_and_unknown_fields_are_tolerated() {
        let t: Task = serde_json::from_str(
            r#"{"ID":"a","NetworksAttachments":null,"Status":{"State":"running","New":1},
                "Slot":null,"Whatever":{"x":[1]}}"#,
        )
        .unwrap();
        assert_eq!(t.id, "a");
        assert!(t.networks_attachments.is_empty());
        assert_eq!(t.slot, 0);
        let s: Service =
            serde_json::from_str(r#"{"Spec":{"Labels":null},"UpdateStatus":null}"#).unwrap();
        assert!(s.spec.labels.is_empty());
        assert!(s.update_status.is_none());
    }
}
