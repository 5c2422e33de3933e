//! Swarm state -> desired mesh services: the pure core of the Docker provider.
//!
//! A task is routable iff all of these hold:
//! - its `DesiredState` is `running` (the orchestrator has not told it to stop: a stopping
//!   task drops out ~2 s before it gets SIGTERM, while it still serves);
//! - its `Status.State` is `running` (with a HEALTHCHECK, only once healthy);
//! - its node is `ready` and not being drained (a drained node's tasks are also told to
//!   shut down, but the node's state is seen first sometimes);
//! - meshd has an address to dial it at (`[discovery.docker] address`): its overlay address
//!   on the network meshd reaches it on (`mesh.network` when set, else a network meshd's own
//!   container is attached to, else its only non-ingress network), or `NodeAddr:PublishedPort`
//!   of its host-mode publish of the target port (meshd on the host network); `auto` takes the
//!   overlay address when meshd shares a network with the task, else the host port;
//! - its ID was never seen stopping or vanished ([`Tracker`] keeps a bounded set of retired
//!   IDs): a task's desired state only moves forward, so a lagging manager's answer that
//!   shows an old task as running again must not bring it back.
//!
//! Each backend carries its task's ID (`BackendConfig::id`): Swarm hands a stopped task's
//! overlay address to a new task, and the control plane must see a new backend there, not
//! the old one with its health and ejection state.
//!
//! Invariant: no I/O and no clock (a `mesh.tls=terminate` service's certificate is read
//! by the loader the provider gives, [`Tracker::loading_certs`]). Everything is decided from one [`Snapshot`] (one poll of
//! `/services`, `/tasks`, `/nodes`) and the tracker's memory of earlier ones, so it is
//! tested from recorded engine answers.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use super::api::{NetworkAttachment, Node, Service, Task};
use super::labels::{self, LabelError};
use crate::config::tls::Terminate;
use crate::config::{defaults, BackendConfig, Protocol, ServiceConfig, TaskAddress};

/// How many retired task IDs are remembered (oldest forgotten first). Swarm keeps 5 old
/// tasks per slot by default; this covers thousands of slots' worth of churn, far longer
/// than any stale answer can lag.
pub const RETIRED_CAPACITY: usize = 8192;

/// One poll's answers.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub services: Vec<Service>,
    pub tasks: Vec<Task>,
    pub nodes: Vec<Node>,
}

/// What meshd's own container is attached to: network IDs and names. `None` when meshd
/// does not run in a container of this engine (or cannot tell).
pub type OwnNetworks = BTreeSet<String>;

/// The outcome of one snapshot.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Desired {
    /// Sorted by name; each one's backends sorted by address.
    pub services: Vec<ServiceConfig>,
    /// One line each: labels that do not parse (service skipped), unknown labels, tasks
    /// meshd cannot reach, ports claimed twice.
    pub warnings: Vec<String>,
    /// Opted-in Swarm services in a rolling update or rollback, with the update order
    /// ("web (start-first)"): poll faster while any is.
    pub updating: Vec<String>,
    /// Tasks of opted-in services told to stop that still run (Swarm signals them ~2-3 s
    /// later on an overlay network): poll faster while there are any.
    pub stopping: usize,
}

/// Reads a terminating Swarm service's certificate and key (`mesh.tls.cert`,
/// `mesh.tls.key`): the error is one line naming the file.
pub type CertLoader =
    Box<dyn FnMut(&Path, &Path) -> Result<Arc<Terminate>, String> + Send + Sync + 'static>;

/// Memory across snapshots: which task IDs must never be routed to again.
pub struct Tracker {
    retired: Retired,
    /// Tasks with `DesiredState=running` in the previous snapshot.
    running: HashSet<String>,
    /// `[discovery.docker] address`: which address of a task is dialled.
    address: TaskAddress,
    /// Loads `mesh.tls=terminate` certificates; `None`: such services are skipped.
    certs: Option<CertLoader>,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker")
            .field("running", &self.running.len())
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker::new(RETIRED_CAPACITY)
    }
}

impl Tracker {
    pub fn new(capacity: usize) -> Tracker {
        Tracker {
            retired: Retired::new(capacity),
            running: HashSet::new(),
            address: TaskAddress::default(),
            certs: None,
        }
    }

    /// The same tracker, loading `mesh.tls=terminate` certificates with `load`.
    pub fn loading_certs(mut self, load: CertLoader) -> Tracker {
        self.certs = Some(load);
        self
    }

    /// The same tracker, dialling tasks at the address `mode` says.
    pub fn dialling(mut self, mode: TaskAddress) -> Tracker {
        self.address = mode;
        self
    }

    /// True if task `id` was seen stopping or vanished.
    pub fn is_retired(&self, id: &str) -> bool {
        self.retired.contains(id)
    }

    /// Retires task `id` for good before any answer of `/tasks` says so: its container was
    /// seen stopping (a local `kill`, `die` or `stop` event). The next [`Tracker::observe`]
    /// leaves it out.
    pub fn retire(&mut self, id: &str) {
        self.retired.insert(id);
        self.running.remove(id);
    }

    /// The mesh services `snap` asks for: `defaults` (the `[defaults]` template) with
    /// each opted-in Swarm service's labels, its routable tasks as backends.
    pub fn observe(
        &mut self,
        snap: &Snapshot,
        defaults: &ServiceConfig,
        own: Option<&OwnNetworks>,
    ) -> Desired {
        // Retire every task told to stop, and every task that was running last time and is
        // no longer in the answer at all.
        let present: HashSet<&str> = snap.tasks.iter().map(|t| t.id.as_str()).collect();
        for t in &snap.tasks {
            if t.desired_state != "running" {
                self.retired.insert(&t.id);
            }
        }
        for id in &self.running {
            if !present.contains(id.as_str()) {
                self.retired.insert(id);
            }
        }
        self.running = snap
            .tasks
            .iter()
            .filter(|t| t.desired_state == "running" && !self.retired.contains(&t.id))
            .map(|t| t.id.clone())
            .collect();

        let nodes: HashMap<&str, &Node> = snap.nodes.iter().map(|n| (n.id.as_str(), n)).collect();
        let mut tasks: HashMap<&str, Vec<&Task>> = HashMap::new();
        for t in &snap.tasks {
            tasks.entry(t.service_id.as_str()).or_default().push(t);
        }

        // The older of two services claiming a name or port keeps it.
        let mut services: Vec<&Service> = snap.services.iter().collect();
        services.sort_by_cached_key(|s| (created_key(&s.created_at), s.id.clone()));

        let mut out = Desired::default();
        let mut claimed: Vec<(String, ServiceConfig)> = Vec::new();
        for svc in services {
            let name = &svc.spec.name;
            let mesh = match labels::parse(name, &svc.spec.labels) {
                Ok(None) => continue,
                Ok(Some(m)) => m,
                Err(e) => {
                    out.warnings.push(skipped(&e));
                    continue;
                }
            };
            out.warnings.extend(mesh.warnings.iter().cloned());
            let mut made = match labels::services(name, &mesh, defaults) {
                Ok(m) => m,
                Err(e) => {
                    out.warnings.push(skipped(&e));
                    continue;
                }
            };
            if let Some((cert, key)) = &mesh.tls_files {
                let loaded = match &mut self.certs {
                    Some(load) => load(cert, key),
                    None => Err("this meshd loads no certificates for Swarm services".into()),
                };
                match loaded {
                    Ok(t) => {
                        for m in &mut made {
                            if let Some(tls) = &mut m.config.tls {
                                tls.terminate = Some(t.clone());
                            }
                        }
                    }
                    Err(e) => {
                        let e = LabelError {
                            service: name.clone(),
                            label: labels::TLS_CERT.into(),
                            value: cert.display().to_string(),
                            problem: e,
                        };
                        out.warnings.push(skipped(&e));
                        continue;
                    }
                }
            }
            if let Some(u) = &svc.update_status {
                if matches!(u.state.as_str(), "updating" | "rollback_started") {
                    let order = svc
                        .spec
                        .update_config
                        .as_ref()
                        .map_or("stop-first", |c| c.order.as_str());
                    out.updating.push(format!("{name} ({}, {order})", u.state));
                }
            }

            let via = match (&mesh.network, own) {
                (Some(n), _) => Via::Named(n),
                (None, Some(own)) => Via::Shared(own),
                (None, None) => Via::NonIngress,
            };
            // The running tasks meshd routes to, each with what it can be reached on.
            let mut reach: Vec<Reach<'_>> = Vec::new();
            let mut task_networks: BTreeSet<&str> = BTreeSet::new();
            let mut ambiguous: BTreeSet<&str> = BTreeSet::new();
            let mut not_shared: Option<&str> = None;
            for t in tasks.get(svc.id.as_str()).map_or(&[][..], |v| v) {
                if t.desired_state != "running" && t.status.state == "running" {
                    out.stopping += 1;
                }
                let node = nodes.get(t.node_id.as_str());
                if t.desired_state != "running"
                    || t.status.state != "running"
                    || self.retired.contains(&t.id)
                    || !node.is_some_and(|n| node_ok(n))
                {
                    continue;
                }
                let overlay = match via.address(t) {
                    Pick::Addr(ip, att) => {
                        if let (Via::Named(_), Some(own)) = (&via, own) {
                            if !own.contains(&att.network.id)
                                && !own.contains(&att.network.spec.name)
                            {
                                not_shared = Some(&att.network.spec.name);
                            }
                        }
                        Some(ip)
                    }
                    Pick::Ambiguous(nets) => {
                        ambiguous.extend(nets);
                        None
                    }
                    Pick::None => None,
                };
                task_networks.extend(
                    t.networks_attachments
                        .iter()
                        .map(|a| a.network.spec.name.as_str()),
                );
                reach.push(Reach {
                    task: t,
                    overlay,
                    node: node.and_then(|n| n.address()),
                });
            }
            if let Some(net) = not_shared {
                out.warnings.push(format!(
                    "service {name:?}: mesh.network={net:?} but meshd is not attached to that network: \
                     attach meshd to it, or it cannot reach the tasks"
                ));
            }
            if !ambiguous.is_empty() && self.address != TaskAddress::HostPort {
                out.warnings.push(format!(
                    "service {name:?}: its tasks are on several networks ({}) and meshd cannot tell \
                     which one it shares with them: set the label mesh.network",
                    ambiguous.into_iter().collect::<Vec<_>>().join(", ")
                ));
            }
            // Whether an overlay address found on the task's only non-ingress network
            // (meshd could not tell its own networks) ranks below a host-mode port.
            let overlay_is_a_guess = matches!(via, Via::NonIngress);

            let mut unreachable_warned = false;
            'ports: for m in made {
                for (owner, c) in &claimed {
                    let clash = if c.name == m.config.name {
                        Some(format!("the mesh service name {:?}", c.name))
                    } else if c.protocol != m.config.protocol {
                        // 53/tcp and 53/udp are different ports.
                        None
                    } else {
                        c.listen
                            .iter()
                            .find(|a| m.config.listen.iter().any(|b| overlaps(**a, *b)))
                            .and_then(|a| share_by_name(c, &m.config, a.port()).err())
                    };
                    if let Some(what) = clash {
                        out.warnings.push(format!(
                            "service {name:?}: {what} is already taken by service {owner:?}: \
                             change the label mesh.publish (or the service name); skipped"
                        ));
                        continue 'ports;
                    }
                }
                // Address -> the task that holds it. Two running tasks never share an
                // address; should a lagging answer show it, the first one listed keeps it.
                // (task ID, node ID) by address.
                let mut addrs: BTreeMap<SocketAddr, (Arc<str>, Arc<str>)> = BTreeMap::new();
                let mut unreachable = 0usize;
                for r in &reach {
                    match r.dial(
                        self.address,
                        m.target,
                        m.config.protocol,
                        overlay_is_a_guess,
                    ) {
                        Some(a) => {
                            addrs.entry(a).or_insert_with(|| {
                                (
                                    Arc::from(r.task.id.as_str()),
                                    Arc::from(r.task.node_id.as_str()),
                                )
                            });
                        }
                        None => unreachable += 1,
                    }
                }
                if unreachable > 0 && !unreachable_warned {
                    unreachable_warned = true;
                    out.warnings.push(self.unreachable(
                        name,
                        &via,
                        unreachable,
                        &task_networks,
                        m.target,
                    ));
                }
                let mut config = m.config;
                config.backends = addrs
                    .into_iter()
                    .map(|(addr, (id, node))| BackendConfig {
                        addr,
                        weight: defaults::WEIGHT,
                        id: Some(id),
                        // Which of them are this node's is for each meshd to say (the
                        // provider marks them before the control plane sees them).
                        node: Some(node),
                        local: false,
                    })
                    .collect();
                claimed.push((name.clone(), config));
            }
        }
        let mut list: Vec<ServiceConfig> = claimed.into_iter().map(|(_, c)| c).collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        out.services = list;
        out
    }

    /// The warning for running tasks meshd has no address for.
    fn unreachable(
        &self,
        name: &str,
        via: &Via<'_>,
        count: usize,
        networks: &BTreeSet<&str>,
        target: u16,
    ) -> String {
        let nets = if networks.is_empty() {
            "none".to_owned()
        } else {
            networks.iter().copied().collect::<Vec<_>>().join(", ")
        };
        let host_port = format!(
            "no host-mode published port for target port {target} (--publish mode=host,target={target})"
        );
        match (self.address, via) {
            (TaskAddress::HostPort, _) => format!(
                "service {name:?}: {count} running task(s) have {host_port}: address = \"host_port\" \
                 needs one (or set address = \"auto\" and attach meshd to the tasks' network)"
            ),
            (_, Via::Named(n)) => format!(
                "service {name:?}: {count} running task(s) have no address on network {n:?} \
                 (mesh.network; their networks: {nets}): fix the label mesh.network"
            ),
            (TaskAddress::Overlay, _) => format!(
                "service {name:?}: {count} running task(s) have no address on a network meshd is \
                 attached to (their networks: {nets}): attach the service and meshd to one shared \
                 overlay network"
            ),
            (TaskAddress::Auto, _) => format!(
                "service {name:?}: {count} running task(s) have no address on a network meshd is \
                 attached to (their networks: {nets}) and {host_port}: attach the service and \
                 meshd to one shared overlay network, or publish the target port in host mode"
            ),
        }
    }
}

fn skipped(e: &LabelError) -> String {
    format!("{e}; service skipped")
}

/// A node whose tasks may get traffic: up, and not being drained.
fn node_ok(n: &Node) -> bool {
    n.status.state == "ready" && n.spec.availability != "drain"
}

/// Whether mesh services `a` and `b`, both on `port`, may share it: only when both are
/// TLS services routed by server name on the same address, read the same PROXY sources
/// and claim no name (nor the default) twice. `Err` says what clashes.
fn share_by_name(a: &ServiceConfig, b: &ServiceConfig, port: u16) -> Result<(), String> {
    let (Some(ta), Some(tb)) = (&a.tls, &b.tls) else {
        return Err(format!("port {port}"));
    };
    if a.listen != b.listen {
        return Err(format!(
            "port {port} (TLS services share a port only on the same mesh.listen address)"
        ));
    }
    if a.accept_proxy != b.accept_proxy {
        return Err(format!(
            "port {port} (TLS services sharing a port need the same mesh.accept_proxy)"
        ));
    }
    if let Some(n) = tb.sni.iter().find(|n| ta.sni.contains(n)) {
        return Err(format!("the server name {n} on port {port}"));
    }
    if ta.sni_default && tb.sni_default {
        return Err(format!("mesh.sni_default on port {port}"));
    }
    Ok(())
}

/// Two listen addresses that cannot both be bound (the config validator's rule).
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// `CreatedAt` made comparable as text: the fraction of a second padded to 9 digits (Go
/// trims trailing zeros).
fn created_key(s: &str) -> String {
    let s = s.trim_end_matches('Z');
    match s.split_once('.') {
        Some((secs, frac)) => format!("{secs}.{frac:0<9}"),
        None => format!("{s}.000000000"),
    }
}

/// How to choose a task's address.
enum Via<'a> {
    /// `mesh.network`: the attachment whose network has this ID or name.
    Named(&'a str),
    /// An attachment to a network meshd's container is on.
    Shared(&'a OwnNetworks),
    /// meshd cannot tell its own networks: the task's only non-ingress network.
    NonIngress,
}

enum Pick<'t> {
    Addr(IpAddr, &'t NetworkAttachment),
    /// Several candidate networks (names).
    Ambiguous(Vec<&'t str>),
    None,
}

/// A routable task and what it can be dialled at.
struct Reach<'t> {
    task: &'t Task,
    /// Its overlay address on the network chosen by [`Via`].
    overlay: Option<IpAddr>,
    /// Its node's address, for a host-mode published port.
    node: Option<IpAddr>,
}

impl Reach<'_> {
    /// Where to dial the task's `target` port, per `[discovery.docker] address`.
    fn dial(
        &self,
        mode: TaskAddress,
        target: u16,
        protocol: Protocol,
        overlay_is_a_guess: bool,
    ) -> Option<SocketAddr> {
        let overlay = self.overlay.map(|ip| SocketAddr::new(ip, target));
        let host = || self.host_port(target, protocol);
        match mode {
            TaskAddress::Overlay => overlay,
            TaskAddress::HostPort => host(),
            TaskAddress::Auto if overlay_is_a_guess => host().or(overlay),
            TaskAddress::Auto => overlay.or_else(host),
        }
    }

    /// `NodeAddr:PublishedPort` of the task's host-mode publish of `target` over
    /// `protocol` (a service may publish 53/tcp and 53/udp on different node ports).
    fn host_port(&self, target: u16, protocol: Protocol) -> Option<SocketAddr> {
        let node = self.node?;
        let want = match protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        };
        let p = self.task.status.port_status.ports.iter().find(|p| {
            p.publish_mode == "host"
                && p.protocol.eq_ignore_ascii_case(want)
                && p.target_port == u32::from(target)
        })?;
        let port = u16::try_from(p.published_port).ok().filter(|&p| p != 0)?;
        Some(SocketAddr::new(node, port))
    }
}

impl Via<'_> {
    fn address<'t>(&self, t: &'t Task) -> Pick<'t> {
        let candidates: Vec<&NetworkAttachment> = t
            .networks_attachments
            .iter()
            .filter(|a| match self {
                Via::Named(n) => a.network.id == *n || a.network.spec.name == *n,
                Via::Shared(own) => {
                    !is_ingress(a)
                        && (own.contains(&a.network.id) || own.contains(&a.network.spec.name))
                }
                Via::NonIngress => !is_ingress(a),
            })
            .filter(|a| first_ip(a).is_some())
            .collect();
        match candidates.as_slice() {
            [] => Pick::None,
            [a] => first_ip(a).map_or(Pick::None, |ip| Pick::Addr(ip, a)),
            several => match self {
                // Several networks shared with meshd: any of them reaches the task.
                Via::Shared(_) | Via::Named(_) => {
                    first_ip(several[0]).map_or(Pick::None, |ip| Pick::Addr(ip, several[0]))
                }
                Via::NonIngress => Pick::Ambiguous(
                    several
                        .iter()
                        .map(|a| a.network.spec.name.as_str())
                        .collect(),
                ),
            },
        }
    }
}

fn is_ingress(a: &NetworkAttachment) -> bool {
    a.network.spec.ingress || a.network.spec.name == "ingress"
}

/// The attachment's address: its first IPv4 one, else its first IPv6 one. Addresses are
/// CIDR strings ("10.0.1.5/24").
fn first_ip(a: &NetworkAttachment) -> Option<IpAddr> {
    let ips = a
        .addresses
        .iter()
        .filter_map(|cidr| cidr.split('/').next()?.trim().parse::<IpAddr>().ok());
    let mut v6 = None;
    for ip in ips {
        if ip.is_ipv4() {
            return Some(ip);
        }
        v6.get_or_insert(ip);
    }
    v6
}

/// One line per difference between two service lists, for the log.
pub fn changes(old: &[ServiceConfig], new: &[ServiceConfig]) -> Vec<String> {
    let old_by: BTreeMap<&str, &ServiceConfig> = old.iter().map(|s| (s.name.as_str(), s)).collect();
    let new_by: BTreeMap<&str, &ServiceConfig> = new.iter().map(|s| (s.name.as_str(), s)).collect();
    let mut out = Vec::new();
    let listen = |s: &ServiceConfig| {
        s.listen
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    for (name, s) in &new_by {
        match old_by.get(name) {
            None => out.push(format!(
                "service {name:?} added: listen {}, {} endpoint(s)",
                listen(s),
                s.backends.len()
            )),
            Some(o) => {
                let before: BTreeSet<SocketAddr> = o.backends.iter().map(|b| b.addr).collect();
                let after: BTreeSet<SocketAddr> = s.backends.iter().map(|b| b.addr).collect();
                if before != after {
                    let added: Vec<String> =
                        after.difference(&before).map(ToString::to_string).collect();
                    let removed: Vec<String> =
                        before.difference(&after).map(ToString::to_string).collect();
                    out.push(format!(
                        "service {name:?}: {} -> {} endpoint(s){}{}",
                        before.len(),
                        after.len(),
                        if added.is_empty() {
                            String::new()
                        } else {
                            format!(", added {}", added.join(" "))
                        },
                        if removed.is_empty() {
                            String::new()
                        } else {
                            format!(", removed (draining) {}", removed.join(" "))
                        },
                    ));
                }
                let old_ids: HashMap<SocketAddr, Option<&str>> = o
                    .backends
                    .iter()
                    .map(|b| (b.addr, b.id.as_deref()))
                    .collect();
                let replaced: Vec<String> = s
                    .backends
                    .iter()
                    .filter_map(|b| {
                        let old = *old_ids.get(&b.addr)?;
                        (old != b.id.as_deref()).then(|| {
                            format!(
                                "{} (task {} -> {})",
                                b.addr,
                                short_id(old),
                                short_id(b.id.as_deref())
                            )
                        })
                    })
                    .collect();
                if !replaced.is_empty() {
                    out.push(format!(
                        "service {name:?}: a new task reuses an address: {}",
                        replaced.join(" ")
                    ));
                }
                let mut o2 = (*o).clone();
                o2.backends.clone_from(&s.backends);
                if o2 != **s {
                    out.push(format!(
                        "service {name:?}: settings changed (labels), listen {}",
                        listen(s)
                    ));
                }
            }
        }
    }
    for name in old_by.keys().filter(|n| !new_by.contains_key(*n)) {
        out.push(format!(
            "service {name:?} removed: its listener closes, its endpoints drain"
        ));
    }
    out
}

/// A task ID as `docker service ps` shows it (12 characters), or `-`.
fn short_id(id: Option<&str>) -> &str {
    id.map_or("-", |id| id.get(..12).unwrap_or(id))
}

/// A bounded set of task IDs, forgetting the oldest first.
#[derive(Debug)]
struct Retired {
    order: VecDeque<String>,
    set: HashSet<String>,
    capacity: usize,
}

impl Retired {
    fn new(capacity: usize) -> Retired {
        Retired {
            order: VecDeque::new(),
            set: HashSet::new(),
            capacity: capacity.max(1),
        }
    }

    fn contains(&self, id: &str) -> bool {
        self.set.contains(id)
    }

    fn insert(&mut self, id: &str) {
        if self.set.contains(id) {
            return;
        }
        if self.order.len() >= self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        self.order.push_back(id.to_owned());
        self.set.insert(id.to_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CheckKind, Config};

    macro_rules! fixture {
        ($name:literal) => {
            include_str!(concat!("../../../tests/fixtures/docker/", $name))
        };
    }

    const NODES: &str = fixture!("nodes.json");

    fn snap(services: &str, tasks: &str) -> Snapshot {
        Snapshot {
            services: serde_json::from_str(services).unwrap(),
            tasks: serde_json::from_str(tasks).unwrap(),
            nodes: serde_json::from_str(NODES).unwrap(),
        }
    }

    fn defaults() -> ServiceConfig {
        Config::parse(std::path::Path::new("mesh.toml"), "[discovery.docker]\n")
            .unwrap()
            .defaults
    }

    /// The recorded service's tasks (IDs) as a map: version name (v1, v2, v3) -> tasks.
    fn version_of(t: &Task) -> String {
        // The recorded tasks run `meshd backend --listen 0.0.0.0:80 --name vN --mode http`;
        // the version is not in the API object we decode, so find it in the fixture by ID.
        for f in [
            fixture!("tasks-steady.json"),
            fixture!("tasks-start-first.json"),
            fixture!("tasks-scale-down.json"),
        ] {
            let v: serde_json::Value = serde_json::from_str(f).unwrap();
            for x in v.as_array().unwrap() {
                if x["ID"] == t.id.as_str() {
                    return x["Spec"]["ContainerSpec"]["Args"][4]
                        .as_str()
                        .unwrap()
                        .to_string();
                }
            }
        }
        panic!("task {} not in the fixtures", t.id)
    }

    fn ip(t: &Task) -> IpAddr {
        first_ip(&t.networks_attachments[0]).unwrap()
    }

    fn backends(d: &Desired) -> Vec<String> {
        d.services[0]
            .backends
            .iter()
            .map(|b| b.addr.to_string())
            .collect()
    }

    #[test]
    fn steady_service_all_tasks_routable() {
        let s = snap(fixture!("services.json"), fixture!("tasks-steady.json"));
        let d = Tracker::default().observe(&s, &defaults(), None);
        assert_eq!(d.warnings, Vec::<String>::new());
        assert!(d.updating.is_empty());
        assert_eq!(d.services.len(), 1);
        let svc = &d.services[0];
        assert_eq!(svc.name, "meshfix-web");
        assert_eq!(svc.listen, vec!["0.0.0.0:8080".parse().unwrap()]);
        assert_eq!(svc.health.check, CheckKind::Http);
        let mut want: Vec<SocketAddr> =
            s.tasks.iter().map(|t| SocketAddr::new(ip(t), 80)).collect();
        want.sort();
        let got: Vec<SocketAddr> = svc.backends.iter().map(|b| b.addr).collect();
        assert_eq!(got, want);
        assert!(svc.backends.iter().all(|b| b.weight == 100));
    }

    #[test]
    fn each_backend_carries_its_task_id() {
        let s = snap(fixture!("services.json"), fixture!("tasks-steady.json"));
        let d = Tracker::default().observe(&s, &defaults(), None);
        let want: BTreeMap<SocketAddr, &str> = s
            .tasks
            .iter()
            .map(|t| (SocketAddr::new(ip(t), 80), t.id.as_str()))
            .collect();
        let got: BTreeMap<SocketAddr, &str> = d.services[0]
            .backends
            .iter()
            .map(|b| (b.addr, b.id.as_deref().unwrap()))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn a_new_task_on_a_stopped_tasks_address_is_a_new_backend() {
        let d = defaults();
        let mut tr = Tracker::default();
        let steady = snap(fixture!("services.json"), fixture!("tasks-steady.json"));
        let before = tr.observe(&steady, &d, None).services;
        // The first task stops and vanishes; Swarm gives its address to a new task.
        let mut next = steady.clone();
        let old = next.tasks[0].id.clone();
        next.tasks[0].id = "newtask0000000000000000001".into();
        let after = tr.observe(&next, &d, None).services;
        assert!(tr.is_retired(&old));
        let addr = SocketAddr::new(ip(&next.tasks[0]), 80);
        let b = after[0].backends.iter().find(|b| b.addr == addr).unwrap();
        assert_eq!(b.id.as_deref(), Some("newtask0000000000000000001"));
        assert_ne!(before, after, "the provider sends the change");
        assert_eq!(
            changes(&before, &after),
            [format!(
                "service \"meshfix-web\": a new task reuses an address: {addr} (task {} -> newtask00000)",
                &old[..12]
            )]
        );
    }

    #[test]
    fn stop_first_update_drops_the_stopping_task_at_once() {
        let s = snap(
            fixture!("services-stop-first.json"),
            fixture!("tasks-stop-first.json"),
        );
        let stopping: Vec<&Task> = s
            .tasks
            .iter()
            .filter(|t| t.desired_state == "shutdown" && t.status.state == "running")
            .collect();
        assert_eq!(
            stopping.len(),
            1,
            "the recording caught one task being stopped"
        );
        let d = Tracker::default().observe(&s, &defaults(), None);
        assert_eq!(d.updating, vec!["meshfix-web (updating, stop-first)"]);
        let b = backends(&d);
        assert_eq!(b.len(), 2);
        assert!(!b.contains(&format!("{}:80", ip(stopping[0]))));
    }

    #[test]
    fn stopping_tasks_are_counted_and_a_retired_one_leaves_at_once() {
        let d = defaults();
        let steady = snap(fixture!("services.json"), fixture!("tasks-steady.json"));
        let stopping = snap(
            fixture!("services-stop-first.json"),
            fixture!("tasks-stop-first.json"),
        );
        assert_eq!(Tracker::default().observe(&steady, &d, None).stopping, 0);
        assert_eq!(Tracker::default().observe(&stopping, &d, None).stopping, 1);
        // A container event retires a task the engine still shows running.
        let mut tr = Tracker::default();
        assert_eq!(backends(&tr.observe(&steady, &d, None)).len(), 3);
        tr.retire(&steady.tasks[2].id);
        let b = backends(&tr.observe(&steady, &d, None));
        assert_eq!(b.len(), 2);
        assert!(!b.contains(&format!("{}:80", ip(&steady.tasks[2]))));
    }

    #[test]
    fn start_first_update_routes_only_running_tasks_never_old_ones() {
        let s = snap(
            fixture!("services-start-first.json"),
            fixture!("tasks-start-first.json"),
        );
        let d = Tracker::default().observe(&s, &defaults(), None);
        assert_eq!(d.updating, vec!["meshfix-web (updating, start-first)"]);
        let want: BTreeSet<String> = s
            .tasks
            .iter()
            .filter(|t| t.desired_state == "running" && t.status.state == "running")
            .map(|t| format!("{}:80", ip(t)))
            .collect();
        assert_eq!(want.len(), 3, "two v2 tasks and the first v3 one");
        assert_eq!(backends(&d).into_iter().collect::<BTreeSet<_>>(), want);
        // The v1 tasks (long stopped) and the v2 task being replaced are not routed.
        for t in &s.tasks {
            if t.desired_state != "running" {
                assert!(!backends(&d).contains(&format!("{}:80", ip(t))));
            }
        }
        let versions: BTreeSet<String> = s
            .tasks
            .iter()
            .filter(|t| backends(&d).contains(&format!("{}:80", ip(t))))
            .map(version_of)
            .collect();
        assert_eq!(versions, ["v2", "v3"].map(String::from).into());
    }

    #[test]
    fn scale_down_drops_tasks_being_removed() {
        let s = snap(
            fixture!("services-scale-down.json"),
            fixture!("tasks-scale-down.json"),
        );
        let removing = s
            .tasks
            .iter()
            .filter(|t| t.desired_state == "remove")
            .count();
        assert_eq!(removing, 2);
        let d = Tracker::default().observe(&s, &defaults(), None);
        assert_eq!(backends(&d).len(), 1);
    }

    #[test]
    fn a_retired_task_never_comes_back() {
        let mut tr = Tracker::default();
        let d = defaults();
        let steady = snap(fixture!("services.json"), fixture!("tasks-steady.json"));
        assert_eq!(backends(&tr.observe(&steady, &d, None)).len(), 3);
        // The update begins: one task is told to stop.
        let stopping = snap(
            fixture!("services-stop-first.json"),
            fixture!("tasks-stop-first.json"),
        );
        assert_eq!(backends(&tr.observe(&stopping, &d, None)).len(), 2);
        // A lagging manager answers with the old state again: still 2.
        assert_eq!(backends(&tr.observe(&steady, &d, None)).len(), 2);

        // A task that vanishes from the answer is retired too.
        let mut tr = Tracker::default();
        let mut s = steady.clone();
        tr.observe(&s, &d, None);
        let gone = s.tasks.remove(0);
        assert_eq!(backends(&tr.observe(&s, &d, None)).len(), 2);
        assert!(tr.is_retired(&gone.id));
        assert_eq!(backends(&tr.observe(&steady, &d, None)).len(), 2);
    }

    #[test]
    fn transient_conditions_do_not_retire() {
        let d = defaults();
        let mut tr = Tracker::default();
        let steady = snap(fixture!("services.json"), fixture!("tasks-steady.json"));
        // The node goes down (missed heartbeats), then comes back.
        let mut down = steady.clone();
        down.nodes[0].status.state = "down".into();
        assert!(backends(&tr.observe(&down, &d, None)).is_empty());
        assert_eq!(backends(&tr.observe(&steady, &d, None)).len(), 3);
        // Paused nodes keep their tasks; drained ones do not.
        let mut paused = steady.clone();
        paused.nodes[0].spec.availability = "pause".into();
        assert_eq!(backends(&tr.observe(&paused, &d, None)).len(), 3);
        let mut drained = steady.clone();
        drained.nodes[0].spec.availability = "drain".into();
        assert!(backends(&tr.observe(&drained, &d, None)).is_empty());
        // A node missing from the answer: its tasks wait.
        let mut unknown = steady.clone();
        unknown.nodes.clear();
        assert!(backends(&tr.observe(&unknown, &d, None)).is_empty());
        // A task not yet running (starting) is not routed, then is.
        let mut starting = steady.clone();
        starting.tasks[0].status.state = "starting".into();
        assert_eq!(backends(&tr.observe(&starting, &d, None)).len(), 2);
        assert_eq!(backends(&tr.observe(&steady, &d, None)).len(), 3);
    }

    #[test]
    fn retired_set_is_bounded() {
        let mut r = Retired::new(3);
        for id in ["a", "b", "c", "d", "b"] {
            r.insert(id);
        }
        assert!(!r.contains("a"));
        assert!(r.contains("b") && r.contains("c") && r.contains("d"));
        assert_eq!(r.order.len(), 3);
        assert_eq!(r.set.len(), 3);
    }

    /// The steady fixture with each task also attached to a second network ("back",
    /// 10.0.9.x) and to the ingress network.
    fn two_networks() -> Snapshot {
        let mut s = snap(fixture!("services.json"), fixture!("tasks-steady.json"));
        for (i, t) in s.tasks.iter_mut().enumerate() {
            let mut ingress = t.networks_attachments[0].clone();
            ingress.network.id = "ingressid".into();
            ingress.network.spec.name = "ingress".into();
            ingress.network.spec.ingress = true;
            ingress.addresses = vec![format!("10.255.0.{}/16", i + 2)];
            let mut back = t.networks_attachments[0].clone();
            back.network.id = "backid".into();
            back.network.spec.name = "back".into();
            back.addresses = vec![
                format!("fd00::{}/64", i + 2),
                format!("10.0.9.{}/24", i + 2),
            ];
            t.networks_attachments.insert(0, ingress);
            t.networks_attachments.push(back);
        }
        s
    }

    #[test]
    fn network_choice() {
        let d = defaults();
        let s = two_networks();
        // Without knowing its own networks, meshd cannot pick: a warning, no backends.
        let out = Tracker::default().observe(&s, &d, None);
        assert!(backends(&out).is_empty());
        assert!(
            out.warnings
                .iter()
                .any(|w| w.contains("several networks (back, meshfix)")
                    && w.contains("mesh.network")),
            "{:?}",
            out.warnings
        );
        // meshd's container is on "back": that one.
        let own: OwnNetworks = ["backid".to_string(), "back".to_string()].into();
        let out = Tracker::default().observe(&s, &d, Some(&own));
        assert_eq!(out.warnings, Vec::<String>::new());
        assert_eq!(
            backends(&out),
            ["10.0.9.2:80", "10.0.9.3:80", "10.0.9.4:80"]
        );
        // mesh.network names one (by name or ID).
        for label in [
            "meshfix",
            s.tasks[0].networks_attachments[1].network.id.as_str(),
        ] {
            let mut s2 = s.clone();
            s2.services[0]
                .spec
                .labels
                .insert("mesh.network".into(), label.into());
            let out = Tracker::default().observe(&s2, &d, None);
            assert_eq!(out.warnings, Vec::<String>::new());
            assert!(
                backends(&out).iter().all(|b| b.starts_with("10.0.3.")),
                "{out:?}"
            );
            // ... and meshd is not on it: still used, but said.
            let out = Tracker::default().observe(&s2, &d, Some(&own));
            assert_eq!(backends(&out).len(), 3);
            assert!(out.warnings[0].contains("meshd is not attached to that network"));
        }
        // meshd shares no network with the tasks.
        let other: OwnNetworks = ["elsewhere".to_string()].into();
        let out = Tracker::default().observe(&s, &d, Some(&other));
        assert!(backends(&out).is_empty());
        assert_eq!(
            out.warnings,
            [
                r#"service "meshfix-web": 3 running task(s) have no address on a network meshd is attached to (their networks: back, ingress, meshfix) and no host-mode published port for target port 80 (--publish mode=host,target=80): attach the service and meshd to one shared overlay network, or publish the target port in host mode"#
            ]
        );
        // A task without addresses yet (Addresses null).
        let mut s3 = snap(fixture!("services.json"), fixture!("tasks-steady.json"));
        s3.tasks[0].networks_attachments[0].addresses.clear();
        let out = Tracker::default().observe(&s3, &d, None);
        assert_eq!(backends(&out).len(), 2);
        assert_eq!(out.warnings.len(), 1);
    }

    /// The steady fixture with each task publishing its port 80 in host mode on 3000N
    /// (as `--publish mode=host,target=80` shows it once Docker picked a port), and a UDP
    /// publish of the same target that must not be taken for it.
    fn host_published() -> Snapshot {
        let mut s = snap(fixture!("services.json"), fixture!("tasks-steady.json"));
        for (i, t) in s.tasks.iter_mut().enumerate() {
            let port = |protocol: &str, published| super::super::api::PortConfig {
                protocol: protocol.into(),
                target_port: 80,
                published_port: published,
                publish_mode: "host".into(),
            };
            t.status.port_status.ports = vec![port("udp", 40000), port("tcp", 30001 + i as u32)];
        }
        s
    }

    fn with_address(mode: TaskAddress) -> Tracker {
        Tracker::default().dialling(mode)
    }

    #[test]
    fn host_mode_published_ports() {
        let d = defaults();
        let s = host_published();
        let overlay = ["10.0.3.2:80", "10.0.3.3:80", "10.0.3.4:80"];
        let host = ["192.0.2.2:30001", "192.0.2.2:30002", "192.0.2.2:30003"];
        let meshfix: OwnNetworks = ["meshfix".to_string()].into();
        let host_net: OwnNetworks = ["host".to_string()].into();
        // auto: the overlay when meshd shares it with the tasks ...
        let out = with_address(TaskAddress::Auto).observe(&s, &d, Some(&meshfix));
        assert_eq!(backends(&out), overlay);
        assert!(out.warnings.is_empty(), "{:?}", out.warnings);
        // ... the node's published port when meshd runs on the host network ...
        let out = with_address(TaskAddress::Auto).observe(&s, &d, Some(&host_net));
        assert_eq!(backends(&out), host);
        assert!(out.warnings.is_empty(), "{:?}", out.warnings);
        // ... and when meshd cannot tell its networks (not in a container): an overlay
        // address it only guessed ranks below a published port.
        let out = with_address(TaskAddress::Auto).observe(&s, &d, None);
        assert_eq!(backends(&out), host);
        // Each backend is still its task.
        let ids: Vec<_> = out.services[0]
            .backends
            .iter()
            .map(|b| b.id.clone())
            .collect();
        assert!(ids.iter().all(Option::is_some), "{ids:?}");
        // host_port: only published ports, whatever meshd shares.
        let out = with_address(TaskAddress::HostPort).observe(&s, &d, Some(&meshfix));
        assert_eq!(backends(&out), host);
        // overlay: never a published port.
        let out = with_address(TaskAddress::Overlay).observe(&s, &d, Some(&host_net));
        assert!(backends(&out).is_empty());
        assert!(out.warnings[0].contains("no address on a network meshd is attached to"));

        // A task whose publish is of another port, or not yet published (0), is unreachable
        // in host_port mode, and said so once.
        let mut s2 = s.clone();
        s2.tasks[0].status.port_status.ports[1].target_port = 443;
        s2.tasks[1].status.port_status.ports[1].published_port = 0;
        let out = with_address(TaskAddress::HostPort).observe(&s2, &d, None);
        assert_eq!(backends(&out), ["192.0.2.2:30003"]);
        assert_eq!(
            out.warnings,
            [
                r#"service "meshfix-web": 2 running task(s) have no host-mode published port for target port 80 (--publish mode=host,target=80): address = "host_port" needs one (or set address = "auto" and attach meshd to the tasks' network)"#
            ]
        );
        // auto falls back to the overlay address for them.
        let out = with_address(TaskAddress::Auto).observe(&s2, &d, None);
        assert_eq!(
            backends(&out),
            ["10.0.3.2:80", "10.0.3.4:80", "192.0.2.2:30003"]
        );
    }

    #[test]
    fn node_address_falls_back_to_the_manager_address() {
        let d = defaults();
        let mut s = host_published();
        s.nodes[0].status.addr = "0.0.0.0".into();
        let out = with_address(TaskAddress::HostPort).observe(&s, &d, None);
        assert_eq!(backends(&out).len(), 3);
        assert!(backends(&out).iter().all(|b| b.starts_with("192.0.2.2:")));
        // No usable address at all: unreachable, not 0.0.0.0.
        s.nodes[0].manager_status = None;
        let out = with_address(TaskAddress::HostPort).observe(&s, &d, None);
        assert!(backends(&out).is_empty());
        assert_eq!(out.warnings.len(), 1);
    }

    #[test]
    fn bad_labels_skip_only_that_service() {
        let d = defaults();
        let mut s = snap(fixture!("services.json"), fixture!("tasks-steady.json"));
        let mut bad = s.services[0].clone();
        bad.id = "other".into();
        bad.spec.name = "web".into();
        bad.spec
            .labels
            .insert("mesh.publish".into(), "80:abc".into());
        s.services.push(bad);
        let out = Tracker::default().observe(&s, &d, None);
        assert_eq!(out.services.len(), 1);
        assert_eq!(
            out.warnings,
            [
                r#"service "web": label mesh.publish="80:abc": expected PUBLISHED:TARGET ports, e.g. 8080:80 (several: 8080:80,8443:443; UDP: 53:53/udp); service skipped"#
            ]
        );
        // Unlabelled services are ignored.
        s.services[1].spec.labels.clear();
        let out = Tracker::default().observe(&s, &d, None);
        assert_eq!(out.services.len(), 1);
        assert!(out.warnings.is_empty());
    }

    #[test]
    fn the_older_service_keeps_a_port() {
        let d = defaults();
        let mut s = snap(fixture!("services.json"), fixture!("tasks-steady.json"));
        let mut newer = s.services[0].clone();
        newer.id = "zzz".into();
        newer.spec.name = "aaa-newer".into();
        // Same second, fewer fraction digits: still later.
        let created = &s.services[0].created_at;
        let (secs, _) = created.split_once('.').unwrap();
        newer.created_at = format!("{secs}.9Z");
        s.services[0].created_at = format!("{secs}.1Z");
        s.services.insert(0, newer);
        let out = Tracker::default().observe(&s, &d, None);
        assert_eq!(out.services.len(), 1);
        assert_eq!(out.services[0].name, "meshfix-web");
        assert_eq!(
            out.warnings,
            [
                r#"service "aaa-newer": port 8080 is already taken by service "meshfix-web": change the label mesh.publish (or the service name); skipped"#
            ]
        );
        assert!(created_key("2026-01-01T00:00:00.1Z") < created_key("2026-01-01T00:00:00.17Z"));
    }

    /// `mesh.tls=terminate`: the certificate comes from the provider's loader; without
    /// one, or when it fails, the service is skipped and said so.
    #[test]
    fn a_terminating_service_gets_its_certificate_from_the_loader() {
        let d = defaults();
        let mut s = snap(fixture!("services.json"), fixture!("tasks-steady.json"));
        let l = &mut s.services[0].spec.labels;
        l.insert("mesh.publish".into(), "8443:80".into());
        l.insert("mesh.tls".into(), "terminate".into());
        l.insert("mesh.tls.cert".into(), "/run/secrets/web.pem".into());
        l.insert("mesh.tls.key".into(), "/run/secrets/web.key".into());
        let out = Tracker::default().observe(&s, &d, None);
        assert!(out.services.is_empty());
        assert_eq!(
            out.warnings,
            [
                r#"service "meshfix-web": label mesh.tls.cert="/run/secrets/web.pem": this meshd loads no certificates for Swarm services; service skipped"#
            ]
        );
        let out = Tracker::default()
            .loading_certs(Box::new(|c, _| {
                Err(format!("{}: cannot read", c.display()))
            }))
            .observe(&s, &d, None);
        assert!(out.services.is_empty());
        assert!(out.warnings[0].contains("/run/secrets/web.pem: cannot read; service skipped"));

        let (pem, key) = crate::config::tls::testing::self_signed("web.test");
        let loaded =
            Arc::new(Terminate::load(pem, key, Vec::new(), Default::default()).expect("loads"));
        let given = loaded.clone();
        let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = asked.clone();
        let out = Tracker::default()
            .loading_certs(Box::new(move |c, k| {
                seen.lock().unwrap().push((c.to_owned(), k.to_owned()));
                Ok(given.clone())
            }))
            .observe(&s, &d, None);
        assert_eq!(out.services.len(), 1, "{:?}", out.warnings);
        let tls = out.services[0].tls.as_ref().unwrap();
        assert!(tls.sni_default);
        assert!(Arc::ptr_eq(tls.terminate.as_ref().unwrap(), &loaded));
        assert_eq!(
            *asked.lock().unwrap(),
            [(
                std::path::PathBuf::from("/run/secrets/web.pem"),
                std::path::PathBuf::from("/run/secrets/web.key")
            )]
        );
    }

    /// Swarm services labelled `mesh.tls` share a published port by server name; a name
    /// (or the default) claimed twice is the usual clash, so is a plain service on it.
    #[test]
    fn tls_services_share_a_port_by_server_name() {
        let d = defaults();
        let mut s = snap(fixture!("services.json"), fixture!("tasks-steady.json"));
        let tls = |svc: &mut Service, id: &str, name: &str, sni: &[(&str, &str)]| {
            svc.id = id.into();
            svc.spec.name = name.into();
            let l = &mut svc.spec.labels;
            l.insert("mesh.publish".into(), "8443:80".into());
            l.insert("mesh.tls".into(), "passthrough".into());
            for (k, v) in sni {
                l.insert((*k).into(), (*v).into());
            }
        };
        let base = s.services[0].clone();
        let mut b = base.clone();
        let mut c = base.clone();
        let mut e = base.clone();
        let mut plain = base.clone();
        tls(
            &mut s.services[0],
            base.id.as_str(),
            "meshfix-web",
            &[("mesh.sni", "a.test")],
        );
        tls(
            &mut b,
            "b",
            "b-web",
            &[("mesh.sni", "b.test"), ("mesh.sni_default", "true")],
        );
        tls(&mut c, "c", "c-web", &[("mesh.sni", "c.test,A.test")]);
        tls(&mut e, "e", "e-web", &[("mesh.sni_default", "true")]);
        plain.id = "p".into();
        plain.spec.name = "p-web".into();
        plain
            .spec
            .labels
            .insert("mesh.publish".into(), "8443:80".into());
        // Newer services come later: the older one keeps what is claimed twice.
        for (i, svc) in [&mut b, &mut c, &mut e, &mut plain].into_iter().enumerate() {
            svc.created_at = format!("2030-01-01T00:00:0{i}Z");
        }
        s.services.extend([b, c, e, plain]);
        let out = Tracker::default().observe(&s, &d, None);
        let names: Vec<&str> = out.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["b-web", "meshfix-web"]);
        // The fixture's tasks belong to meshfix-web; both carry their routing keys.
        assert_eq!(out.services[1].backends.len(), 3);
        let sni = |i: usize| {
            out.services[i]
                .tls
                .as_ref()
                .map(|t| (t.sni.clone(), t.sni_default))
        };
        assert_eq!(sni(0), Some((vec!["b.test".to_string()], true)));
        assert_eq!(sni(1), Some((vec!["a.test".to_string()], false)));
        assert_eq!(
            out.warnings,
            [
                r#"service "c-web": the server name a.test on port 8443 is already taken by service "meshfix-web": change the label mesh.publish (or the service name); skipped"#,
                r#"service "e-web": mesh.sni_default on port 8443 is already taken by service "b-web": change the label mesh.publish (or the service name); skipped"#,
                r#"service "p-web": port 8443 is already taken by service "meshfix-web": change the label mesh.publish (or the service name); skipped"#,
            ]
        );
    }

    /// `53:53,53:53/udp`: the same published port over both protocols is two services,
    /// not a clash (the real engine test found the clash).
    #[test]
    fn a_port_over_tcp_and_udp_makes_two_services() {
        let d = defaults();
        let mut s = snap(fixture!("services.json"), fixture!("tasks-steady.json"));
        s.services[0]
            .spec
            .labels
            .insert("mesh.publish".into(), "5353:80,5353:80/udp".into());
        // (The fixture's mesh.health=http cannot check a UDP service: refused with it.)
        s.services[0].spec.labels.remove("mesh.health");
        s.services[0].spec.labels.remove("mesh.health.path");
        let out = Tracker::default().observe(&s, &d, None);
        assert!(out.warnings.is_empty(), "{:?}", out.warnings);
        let got: Vec<(&str, Protocol, usize)> = out
            .services
            .iter()
            .map(|s| (s.name.as_str(), s.protocol, s.backends.len()))
            .collect();
        assert_eq!(
            got,
            [
                ("meshfix-web-5353", Protocol::Tcp, 3),
                ("meshfix-web-5353-udp", Protocol::Udp, 3)
            ]
        );
    }

    #[test]
    fn several_ports_make_several_services() {
        let d = defaults();
        let mut s = snap(fixture!("services.json"), fixture!("tasks-steady.json"));
        s.services[0]
            .spec
            .labels
            .insert("mesh.publish".into(), "8080:80,8443:443".into());
        let out = Tracker::default().observe(&s, &d, None);
        let names: Vec<&str> = out.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["meshfix-web-8080", "meshfix-web-8443"]);
        assert!(out.services[1]
            .backends
            .iter()
            .all(|b| b.addr.port() == 443));
        assert_eq!(out.services[1].backends.len(), 3);
    }

    #[test]
    fn change_lines() {
        let d = defaults();
        let mut tr = Tracker::default();
        let a = tr
            .observe(
                &snap(fixture!("services.json"), fixture!("tasks-steady.json")),
                &d,
                None,
            )
            .services;
        let b = tr
            .observe(
                &snap(
                    fixture!("services-stop-first.json"),
                    fixture!("tasks-stop-first.json"),
                ),
                &d,
                None,
            )
            .services;
        assert_eq!(changes(&a, &a), Vec::<String>::new());
        let added = changes(&[], &a);
        assert_eq!(
            added,
            [r#"service "meshfix-web" added: listen 0.0.0.0:8080, 3 endpoint(s)"#]
        );
        let c = changes(&a, &b);
        assert_eq!(c.len(), 1);
        assert!(
            c[0].starts_with(
                r#"service "meshfix-web": 3 -> 2 endpoint(s), removed (draining) 10.0.3."#
            ),
            "{c:?}"
        );
        assert_eq!(
            changes(&a, &[]),
            [r#"service "meshfix-web" removed: its listener closes, its endpoints drain"#]
        );
    }
}
