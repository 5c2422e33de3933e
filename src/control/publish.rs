//! Publishing: turning the control plane's entries into the next `RoutingTable`
//! generation and `Status` snapshot.
//!
//! A publish is planned on the control task (`Control::plan`: each dirty service's eligible
//! backends and effective weights, `ServiceTable::prepare` reusing the previous selector or
//! whole table when nothing a connection sees changed). Selectors that must be built (a
//! Maglev build takes milliseconds) are built by `Plan::finish` on a blocking thread, one
//! generation at a time, and stored back in order by `publish_built` (in place when a
//! changed service has no usable backend left in the published table). A change that holds
//! no table (a rejected reload, a failed discovery poll) publishes the status alone.

use std::sync::Arc;
use std::time::Instant;

use tokio::task::JoinHandle;

use super::lifecycle::sources_label;
use super::status::{BackendStatus, ServiceStatus, Status};
use super::{AdminReply, Control};
use crate::table::slots::Slots;
use crate::table::sni::SniRoutes;
use crate::table::{Candidate, Prepared, RoutingTable, ServiceState, ServiceTable};

/// A table generation on its way: planned on the control task (eligible backends, status,
/// which selectors can be reused: cheap), finished where the selectors are built (off the
/// runtime thread when any must be), published back on the control task.
///
/// It holds only what changed: the last generation's slots (shared, `Slots`), the slots to
/// empty and the services to rewrite. A poll that changes 10 of 1,000 services costs those
/// 10 services and one pointer per 32 slots, not a walk of every service's table.
pub(super) struct Plan {
    /// The last generation's tables and status entries, by slot.
    tables: Slots<Option<Arc<ServiceTable>>>,
    statuses: Slots<Option<Arc<ServiceStatus>>>,
    /// Slots freed since (their services purged): emptied before `services` are written,
    /// so a slot freed and taken again in one plan holds its new service.
    cleared: Vec<usize>,
    /// Each service whose table or status entry this plan rewrites.
    services: Vec<Planned>,
    /// The SNI listeners' routes.
    sni: Vec<Arc<SniRoutes>>,
    /// Complete but for the services and the generation.
    status: Status,
    replies: Vec<AdminReply>,
}

pub(super) struct Planned {
    state: Arc<ServiceState>,
    /// Index in `Control::services` when planned (a hint: services may be removed before
    /// the plan is published).
    index: usize,
    /// Not removed: the table routes to it.
    routed: bool,
    table: Prepared,
    /// Its new status entry but for `eligible` (known once the table is finished).
    status: ServiceStatus,
}

/// A finished plan, ready to publish.
pub(super) struct Built {
    table: RoutingTable,
    /// `(Planned::index, table, status)` of each planned service (`table` is the one it
    /// had when only its status was rebuilt).
    fresh: Vec<(usize, Arc<ServiceTable>, Arc<ServiceStatus>)>,
    status: Status,
    replies: Vec<AdminReply>,
}

impl Plan {
    fn needs_build(&self) -> bool {
        self.services.iter().any(|p| p.table.needs_build())
    }

    /// Builds the selectors that need it: the expensive part of a publish.
    fn finish(self) -> Built {
        let Plan {
            mut tables,
            mut statuses,
            cleared,
            services,
            sni,
            mut status,
            replies,
        } = self;
        for slot in cleared {
            tables.set(slot, None);
            statuses.set(slot, None);
        }
        let mut fresh = Vec::with_capacity(services.len());
        for p in services {
            let t = p.table.finish();
            tables.set(p.state.slot, p.routed.then(|| t.clone()));
            let st = Arc::new(ServiceStatus {
                eligible: t.backends.len(),
                ..p.status
            });
            statuses.set(p.state.slot, Some(st.clone()));
            fresh.push((p.index, t, st));
        }
        status.services = statuses;
        Built {
            table: RoutingTable {
                generation: 0,
                services: tables,
                sni,
            },
            fresh,
            status,
            replies,
        }
    }
}

impl Control {
    /// The generation that will hold a change made now: the next plan's.
    pub(super) fn next_generation(&self) -> u64 {
        self.generation + 1 + u64::from(self.building)
    }

    /// Publishes a new generation if anything changed: at once when every selector can be
    /// reused, else returns the blocking task that builds them.
    pub(super) fn publish_if_dirty(&mut self) -> Option<JoinHandle<Built>> {
        // An operator's reply waits for a published generation: never leave one parked
        // because nothing is dirty (e.g. its service was purged meanwhile).
        if self.generation > 0
            && !self.force_publish
            && self.admin_replies.is_empty()
            && !self.services.iter().any(|s| s.dirty)
        {
            return None;
        }
        self.force_publish = false;
        // A backend leaves service immediately (its state is an atomic the published table
        // reads), but a new table built off-thread arrives later. If a changed service has
        // no usable backend left in the published table (say its only backend was
        // replaced by a reload), every connection would be turned away until then: build
        // that table here and now instead.
        let urgent = self.services.iter().any(|s| {
            s.dirty
                && s.table
                    .as_ref()
                    .is_some_and(|t| !t.backends.iter().any(|b| b.is_usable()))
        });
        let plan = self.plan();
        if urgent || !plan.needs_build() {
            self.publish_built(plan.finish());
            return None;
        }
        Some(crate::sys::spawn_background(move || plan.finish()))
    }

    /// Stores a status snapshot with the counters as they are now and the published
    /// services as they are: no new table, the generation stays.
    pub(super) fn publish_status(&mut self) {
        self.status_dirty = false;
        let current = self.status.load();
        self.status.store(Arc::new(Status {
            generation: current.generation,
            services: current.services.clone(),
            reloads_ok: self.reloads_ok,
            reloads_err: self.reloads_err,
            last_reload: self.last_reload.clone(),
            discovery_errors: self.discovery_errors.clone(),
            sni: current.sni.clone(),
        }));
    }

    /// Builds and stores a new table generation and status snapshot, here and now (the
    /// first table, before meshd reports ready).
    pub fn publish(&mut self) {
        let plan = self.plan();
        self.publish_built(plan.finish());
    }

    /// The next generation's inputs: each dirty service's eligible backends (reusing its
    /// selector, or its whole table, when nothing a connection sees changed) and status
    /// entry; every other slot is shared with the last generation as it is.
    fn plan(&mut self) -> Plan {
        let now = Instant::now();
        self.status_dirty = false; // the counters go out with this plan
        let mut planned = Vec::new();
        let sni = &self.sni;
        for (index, s) in self.services.iter_mut().enumerate() {
            let fresh = s.dirty || s.table.is_none();
            // A clean service's table and status entry are the ones published: left in
            // their slots, not rebuilt (a poll that changes 10 of 1,000 services costs 10
            // services' work).
            if !fresh && s.status.is_some() {
                continue;
            }
            let weights: Vec<u32> = s
                .backends
                .iter()
                .map(|b| b.effective_weight(s.config.slow_start, now))
                .collect();
            let table = match &s.table {
                Some(t) if !fresh => Prepared::unchanged(t.clone()),
                previous => {
                    let candidates: Vec<Candidate> = s
                        .backends
                        .iter()
                        .zip(&weights)
                        .filter(|(b, _)| !b.kept_drained())
                        .map(|(b, &w)| Candidate {
                            backend: b.backend.clone(),
                            weight: w,
                            local: b.is_local(),
                        })
                        .collect();
                    ServiceTable::prepare(
                        s.state.clone(),
                        s.config.clone(),
                        &candidates,
                        previous.as_ref(),
                    )
                }
            };
            s.dirty = false;
            let status = ServiceStatus {
                state: s.state.clone(),
                config: s.config.clone(),
                metrics: s.metrics.clone(),
                listeners: s
                    .listeners
                    .iter()
                    .map(|(_, a, _)| *a)
                    .chain(
                        // Its share of the SNI listeners.
                        s.config
                            .listen
                            .iter()
                            .filter(|a| {
                                s.config.tls.is_some()
                                    && !s.removed
                                    && sni.iter().any(|l| l.addr == **a)
                            })
                            .copied(),
                    )
                    .collect(),
                backends: s
                    .backends
                    .iter()
                    .zip(&weights)
                    .map(|(b, &w)| BackendStatus {
                        backend: b.backend.clone(),
                        metrics: b.metrics.clone(),
                        weight: b.weight,
                        weight_override: b.weight_override,
                        effective_weight: if b.backend.is_usable() { w } else { 0 },
                        sources: sources_label(b.sources),
                        drain: b.drain,
                        slow_start_until: b
                            .up_since
                            .map(|u| u + s.config.slow_start)
                            .filter(|t| *t > now),
                        ejected: b.backend.is_ejected(),
                        local: b.is_local(),
                    })
                    .collect(),
                eligible: 0,
            };
            planned.push(Planned {
                state: s.state.clone(),
                index,
                routed: !s.removed,
                table,
                status,
            });
        }
        let (tables, statuses) = {
            let (t, st) = (self.table.load(), self.status.load());
            (t.services.clone(), st.services.clone())
        };
        Plan {
            tables,
            statuses,
            cleared: std::mem::take(&mut self.cleared_slots),
            services: planned,
            sni: self.sni_routes.clone(),
            // Counters as of the plan: a reload counted here is in this generation's table.
            status: Status {
                generation: 0,
                services: Slots::default(),
                reloads_ok: self.reloads_ok,
                reloads_err: self.reloads_err,
                last_reload: self.last_reload.clone(),
                discovery_errors: self.discovery_errors.clone(),
                sni: self.sni.iter().map(|l| l.stats.clone()).collect(),
            },
            replies: std::mem::take(&mut self.admin_replies),
        }
    }

    /// Stores a finished plan as the next generation; its services' entries keep the
    /// tables (the next plan compares against them).
    pub(super) fn publish_built(&mut self, built: Built) {
        let Built {
            mut table,
            fresh,
            mut status,
            replies,
        } = built;
        for (index, t, st) in fresh {
            let entry = match self.services.get_mut(index) {
                Some(s) if Arc::ptr_eq(&s.state, &t.state) => Some(s),
                _ => self
                    .services
                    .iter_mut()
                    .find(|s| Arc::ptr_eq(&s.state, &t.state)),
            };
            if let Some(s) = entry {
                s.table = Some(t);
                s.status = Some(st);
            }
        }
        self.generation += 1;
        table.generation = self.generation;
        status.generation = self.generation;
        self.table.store(table);
        self.status.store(Arc::new(status));
        for reply in replies {
            let _ = reply.send(Ok(()));
        }
        self.start_accept_loops();
    }
}
