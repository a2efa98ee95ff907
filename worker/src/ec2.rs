//! The parent check of a worker on EC2: the parent endpoint is alive while
//! its instance is; `DescribeInstanceStatus` says so, not the endpoint itself, so a node that
//! is merely slow or restarting is not abandoned.
//!
//! When the parent's instance is gone (shutting down, stopped, terminated, or unknown to EC2)
//! the worker re-parents to a running endpoint instance of its cluster (tags `hashq:cluster`,
//! `hashq:role=endpoint`, and `hashq:node-id` naming a member); when no endpoint instance of
//! its cluster runs, the worker stops ([`crate::ExitReason::Orphaned`]). Each decision needs
//! two checks in a row that agree, so one odd answer moves nothing. An EC2 API that cannot be
//! reached changes nothing either: the worker keeps its parent, and still exits by the
//! no-endpoint rule if the cluster stops answering.
//!
//! Credentials come from the SDK's default chain (the worker instance's profile); the SDK
//! configuration is `hashq-aws`'s and the tag keys are `hashq-proto`'s, shared with the node's
//! `ec2` launcher.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_sdk_ec2::types::{Filter, InstanceStateName};
use hashq_aws::Patience;
use hashq_proto::ec2::{ROLE_ENDPOINT, TAG_CLUSTER, TAG_NODE_ID, TAG_ROLE};
use hashq_proto::NodeId;
use tracing::{debug, info, warn};

use crate::config::Ec2Parent;

/// Checks in a row that must agree before the worker re-parents or stops.
const AGREEING_CHECKS: u32 = 2;

/// What one look at the parent's instance found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParentState {
    /// Pending or running.
    Alive,
    /// Shutting down, stopping, stopped, terminated, or unknown to EC2.
    Gone,
    /// The EC2 API did not answer usefully; nothing is concluded.
    Unknown(String),
}

/// What the worker should do after a check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    Reparent {
        node: NodeId,
        instance: String,
    },
    /// No endpoint instance of the cluster runs.
    Orphaned,
}

/// The EC2 parent check, shared by the worker's sessions.
pub struct Ec2ParentCheck {
    client: aws_sdk_ec2::Client,
    cluster: String,
    /// Endpoint instances by node id, learned from the launcher and from tags.
    instances: Mutex<HashMap<NodeId, String>>,
    /// Consecutive checks that found the parent gone / no endpoint instance.
    gone: Mutex<(u32, u32)>,
}

impl Ec2ParentCheck {
    /// Builds the EC2 client; `parent` is the launching node and its instance.
    pub async fn new(config: &Ec2Parent, parent: Option<NodeId>) -> Arc<Self> {
        let sdk = hashq_aws::sdk_config(
            config.region.as_deref(),
            config.endpoint_url.as_deref(),
            Patience::PARENT_CHECK,
        )
        .await;
        let mut instances = HashMap::new();
        if let Some(parent) = parent {
            instances.insert(parent, config.parent_instance.clone());
        }
        Arc::new(Ec2ParentCheck {
            client: aws_sdk_ec2::Client::new(&sdk),
            cluster: config.cluster.clone(),
            instances: Mutex::new(instances),
            gone: Mutex::new((0, 0)),
        })
    }

    fn instances(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, String>> {
        self.instances.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The state of one instance, by `DescribeInstanceStatus` (all states included).
    pub async fn instance_state(&self, instance: &str) -> ParentState {
        let answer = self
            .client
            .describe_instance_status()
            .instance_ids(instance)
            .include_all_instances(true)
            .send()
            .await;
        match answer {
            Ok(out) => {
                let state = out
                    .instance_statuses()
                    .iter()
                    .find(|s| s.instance_id() == Some(instance))
                    .and_then(|s| s.instance_state())
                    .and_then(|s| s.name());
                match state {
                    Some(InstanceStateName::Pending | InstanceStateName::Running) => {
                        ParentState::Alive
                    }
                    Some(_) | None => ParentState::Gone,
                }
            }
            Err(e) if e.code() == Some("InvalidInstanceID.NotFound") => ParentState::Gone,
            Err(e) => ParentState::Unknown(DisplayErrorContext(&e).to_string()),
        }
    }

    /// The running (or starting) endpoint instances of the cluster with their node ids.
    pub async fn endpoint_instances(&self) -> Result<Vec<(NodeId, String)>, String> {
        let filter = |name: &str, values: &[&str]| {
            Filter::builder()
                .name(name)
                .set_values(Some(values.iter().map(|v| v.to_string()).collect()))
                .build()
        };
        let mut pages = self
            .client
            .describe_instances()
            .filters(filter(&format!("tag:{TAG_CLUSTER}"), &[&self.cluster]))
            .filters(filter(&format!("tag:{TAG_ROLE}"), &[ROLE_ENDPOINT]))
            .filters(filter("instance-state-name", &["pending", "running"]))
            .into_paginator()
            .send();
        let mut found = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| DisplayErrorContext(&e).to_string())?;
            for instance in page.reservations().iter().flat_map(|r| r.instances()) {
                let node = instance
                    .tags()
                    .iter()
                    .find(|t| t.key() == Some(TAG_NODE_ID))
                    .and_then(|t| t.value())
                    .and_then(|v| v.parse::<NodeId>().ok());
                if let (Some(node), Some(id)) = (node, instance.instance_id()) {
                    found.push((node, id.to_string()));
                }
            }
        }
        found.sort();
        Ok(found)
    }

    /// One check of `parent`: keep it, move to another member's endpoint instance, or stop.
    /// `members` are the node ids the cluster told the worker; `spread` picks among several
    /// candidates, so the orphans of one endpoint do not all land on the same new parent.
    pub async fn check(&self, parent: NodeId, members: &[NodeId], spread: u64) -> Verdict {
        let known = self.instances().get(&parent).cloned();
        let state = match known {
            Some(instance) => self.instance_state(&instance).await,
            // Adopted by a node whose instance it has not met yet: look it up by tag.
            None => match self.endpoint_instances().await {
                Ok(endpoints) => {
                    let mut map = self.instances();
                    for (node, instance) in &endpoints {
                        map.insert(*node, instance.clone());
                    }
                    if endpoints.iter().any(|(node, _)| *node == parent) {
                        ParentState::Alive
                    } else {
                        ParentState::Gone
                    }
                }
                Err(e) => ParentState::Unknown(e),
            },
        };
        match state {
            ParentState::Alive => {
                *self.gone.lock().unwrap_or_else(|p| p.into_inner()) = (0, 0);
                return Verdict::Keep;
            }
            ParentState::Unknown(e) => {
                debug!(error = %e, "parent check inconclusive: the EC2 API did not answer");
                return Verdict::Keep;
            }
            ParentState::Gone => {}
        }
        let parent_gone = {
            let mut gone = self.gone.lock().unwrap_or_else(|p| p.into_inner());
            gone.0 += 1;
            gone.0
        };
        if parent_gone < AGREEING_CHECKS {
            return Verdict::Keep;
        }
        let endpoints = match self.endpoint_instances().await {
            Ok(endpoints) => endpoints,
            Err(e) => {
                debug!(error = %e, "cannot list endpoint instances; keeping the parent for now");
                return Verdict::Keep;
            }
        };
        let candidates: Vec<&(NodeId, String)> = endpoints
            .iter()
            .filter(|(node, _)| *node != parent && members.contains(node))
            .collect();
        if candidates.is_empty() {
            let mut gone = self.gone.lock().unwrap_or_else(|p| p.into_inner());
            gone.1 += 1;
            if gone.1 >= AGREEING_CHECKS {
                return Verdict::Orphaned;
            }
            return Verdict::Keep;
        }
        let (node, instance) = candidates[(spread % candidates.len() as u64) as usize].clone();
        self.instances().insert(node, instance.clone());
        *self.gone.lock().unwrap_or_else(|p| p.into_inner()) = (0, 0);
        Verdict::Reparent { node, instance }
    }
}

/// Logs a verdict worth logging.
pub fn log_verdict(parent: NodeId, verdict: &Verdict) {
    match verdict {
        Verdict::Keep => {}
        Verdict::Reparent { node, instance } => warn!(
            old = parent,
            new = node,
            %instance,
            "the parent's instance is gone; re-parenting"
        ),
        Verdict::Orphaned => info!("no endpoint instance of the cluster is running"),
    }
}
