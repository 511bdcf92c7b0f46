//! A `coordination.k8s.io` Lease so that two counter-sync runs never overlap (the CronJob's
//! `concurrencyPolicy: Forbid` does not cover a manual `kubectl create job --from=cronjob/...`),
//! and Kubernetes Events that record each repair.
//!
//! Every write carries the resourceVersion that was read, so of two runs racing for an expired or
//! free Lease exactly one wins; the other gets 409 and stops.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::PostParams;
use kube::{Api, Client};

pub use chatcore::config::LeaseConfig;

/// Outcome of trying to take the Lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquisition {
    Acquired,
    HeldBy(String),
    /// Another run changed the Lease between our read and our write.
    LostRace,
}

pub struct LeaseLock {
    api: Api<Lease>,
    events: Api<Event>,
    settings: LeaseConfig,
}

fn is_status(error: &kube::Error, code: u16) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == code)
}

impl LeaseLock {
    pub fn new(client: Client, settings: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client.clone(), &settings.namespace),
            events: Api::namespaced(client, &settings.namespace),
            settings,
        }
    }

    /// Whether `holder` is an earlier pod of this run's own Job: a Job runs its pods one after
    /// another, so that pod is gone without having given the Lease back (killed, evicted).
    pub fn is_own_predecessor(&self, holder: &str) -> bool {
        self.settings.job.as_deref().is_some_and(|job| {
            holder != self.settings.holder
                && holder
                    .strip_prefix(job)
                    .is_some_and(|suffix| suffix.starts_with('-'))
        })
    }

    /// Renewing at a third of the duration survives two failed renewals.
    pub fn renew_interval(&self) -> Duration {
        self.settings.duration / 3
    }

    fn duration_seconds(&self) -> i32 {
        i32::try_from(self.settings.duration.as_secs()).unwrap_or(i32::MAX)
    }

    /// Takes the Lease when it is free, expired or already ours.
    pub async fn try_acquire(&self, now: Timestamp) -> Result<Acquisition, kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.settings.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.settings.name.clone()),
                    namespace: Some(self.settings.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.held_spec(now, now, 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Acquisition::Acquired),
                Err(error) if is_status(&error, 409) => Ok(Acquisition::LostRace),
                Err(error) => Err(error),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let ours = holder.as_deref() == Some(self.settings.holder.as_str());
        if let Some(holder) = holder.filter(|_| !ours && !expired(&spec, now)) {
            return Ok(Acquisition::HeldBy(holder));
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!ours);
        let acquired_at = if ours {
            spec.acquire_time.map_or(now, |t| t.0)
        } else {
            now
        };
        lease.spec = Some(self.held_spec(acquired_at, now, transitions));
        match self
            .api
            .replace(&self.settings.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(Acquisition::Acquired),
            Err(error) if is_status(&error, 409) => Ok(Acquisition::LostRace),
            Err(error) => Err(error),
        }
    }

    /// Extends the Lease; false when it is no longer ours (another run took it after expiry).
    pub async fn renew(&self, now: Timestamp) -> Result<bool, kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.settings.name).await? else {
            return Ok(false);
        };
        let spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.settings.holder.as_str()) {
            return Ok(false);
        }
        lease.spec = Some(LeaseSpec {
            renew_time: Some(MicroTime(now)),
            ..spec
        });
        match self
            .api
            .replace(&self.settings.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(error) if is_status(&error, 409) => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// Gives the Lease up so the next run need not wait for it to expire.
    pub async fn release(&self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.settings.name).await? else {
            return Ok(());
        };
        let spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.settings.holder.as_str()) {
            return Ok(());
        }
        lease.spec = Some(LeaseSpec {
            holder_identity: None,
            renew_time: None,
            ..spec
        });
        match self
            .api
            .replace(&self.settings.name, &PostParams::default(), &lease)
            .await
        {
            Err(error) if !is_status(&error, 409) => Err(error),
            _ => Ok(()),
        }
    }

    /// Records one repair as a Kubernetes Event on the Lease.
    pub async fn record_repair(&self, now: Timestamp, message: &str) -> Result<(), kube::Error> {
        let event = Event {
            metadata: ObjectMeta {
                generate_name: Some(format!("{}-", self.settings.name)),
                namespace: Some(self.settings.namespace.clone()),
                ..ObjectMeta::default()
            },
            involved_object: ObjectReference {
                api_version: Some("coordination.k8s.io/v1".into()),
                kind: Some("Lease".into()),
                name: Some(self.settings.name.clone()),
                namespace: Some(self.settings.namespace.clone()),
                ..ObjectReference::default()
            },
            reason: Some("CounterRepaired".into()),
            message: Some(message.to_owned()),
            type_: Some("Warning".into()),
            source: Some(EventSource {
                component: Some("counter-sync".into()),
                host: None,
            }),
            reporting_component: Some("counter-sync".into()),
            reporting_instance: Some(self.settings.holder.clone()),
            first_timestamp: Some(Time(now)),
            last_timestamp: Some(Time(now)),
            count: Some(1),
            ..Event::default()
        };
        self.events
            .create(&PostParams::default(), &event)
            .await
            .map(drop)
    }

    fn held_spec(&self, acquired_at: Timestamp, now: Timestamp, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.settings.holder.clone()),
            lease_duration_seconds: Some(self.duration_seconds()),
            acquire_time: Some(MicroTime(acquired_at)),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }
}

/// A Lease nobody renewed within its duration is free to take.
fn expired(spec: &LeaseSpec, now: Timestamp) -> bool {
    let Some(MicroTime(renewed)) = spec.renew_time else {
        return true;
    };
    let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(0)));
    renewed
        .checked_add(duration)
        .map_or(true, |until| until < now)
}
