//! Everything the daemon sends goes through two tasks, so that the session's loop
//! never waits on the client's queue: the publisher (each message's answer, then
//! its acknowledgement) and the outbox (the session's own requests, in order:
//! subscriptions, status, the goodbye).

use std::sync::Arc;
use std::time::Instant;

use rumqttc::v5::mqttbytes::v5::{Publish, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::AsyncClient;
use tokio::sync::mpsc;

use super::status::Stats;

/// The slot a taken message holds until its outcome is out. Dropping it (the
/// outcome handed to the client, or the message dropped unanswered) tells the
/// session that the slot is free.
pub struct Ticket(mpsc::UnboundedSender<()>);

impl Ticket {
    pub fn new(done: &mpsc::UnboundedSender<()>) -> Ticket {
        Ticket(done.clone())
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

/// One message's outcome on its way out.
pub struct Delivery {
    /// What to publish first; `None` for a message no route takes (only acknowledged).
    pub answer: Option<Answer>,
    /// The input, to acknowledge (its payload already dropped).
    pub ack: Publish,
    pub ticket: Ticket,
    pub received: Instant,
}

pub struct Answer {
    pub topic: String,
    pub payload: Vec<u8>,
    /// `None` for a result, the error code otherwise.
    pub error: Option<&'static str>,
    /// An MQTT 5 request's correlation data and user properties, echoed.
    pub properties: Option<PublishProperties>,
}

/// A received message, as kept until its acknowledgement: the packet id, not the
/// payload.
pub fn ack_token(publish: Publish) -> Publish {
    Publish {
        topic: Default::default(),
        payload: Default::default(),
        properties: None,
        ..publish
    }
}

/// Publishes each outcome at QoS 1, then acknowledges its input: the order that
/// makes delivery at-least-once.
pub async fn publish(
    client: AsyncClient,
    mut deliveries: mpsc::UnboundedReceiver<Delivery>,
    stats: Arc<Stats>,
) {
    while let Some(delivery) = deliveries.recv().await {
        if let Some(answer) = delivery.answer {
            let handed = match answer.properties {
                None => {
                    client
                        .publish(answer.topic, QoS::AtLeastOnce, false, answer.payload)
                        .await
                }
                Some(properties) => {
                    client
                        .publish_with_properties(
                            answer.topic,
                            QoS::AtLeastOnce,
                            false,
                            answer.payload,
                            properties,
                        )
                        .await
                }
            };
            if let Err(e) = handed {
                log::error!(
                    "cannot hand a result to the MQTT client: {e}; input left unacknowledged"
                );
                continue;
            }
            stats.record(
                answer.error,
                delivery.received.elapsed().as_secs_f64() * 1e3,
            );
        }
        if let Err(e) = client.ack(&delivery.ack).await {
            log::error!("cannot acknowledge an input: {e}");
        }
        drop(delivery.ticket);
    }
}

/// The session's own requests.
pub enum Control {
    Subscribe(Vec<String>),
    Unsubscribe(Vec<String>),
    /// The retained status; `ready`: tell systemd once it is handed over.
    Status {
        payload: Vec<u8>,
        ready: bool,
    },
    /// `offline` (retained), then DISCONNECT.
    Leave {
        offline: Vec<u8>,
    },
    Disconnect,
}

/// Carries out the session's requests in the order given.
pub async fn outbox(
    client: AsyncClient,
    status_topic: String,
    mut requests: mpsc::UnboundedReceiver<Control>,
) {
    while let Some(request) = requests.recv().await {
        let handed = match request {
            Control::Subscribe(filters) => {
                let mut ok = Ok(());
                for f in filters {
                    ok = ok.and(client.subscribe(f, QoS::AtLeastOnce).await);
                }
                ok
            }
            Control::Unsubscribe(filters) => {
                let mut ok = Ok(());
                for f in filters {
                    ok = ok.and(client.unsubscribe(f).await);
                }
                ok
            }
            Control::Status { payload, ready } => {
                let ok = client
                    .publish(status_topic.clone(), QoS::AtLeastOnce, true, payload)
                    .await;
                if ok.is_ok() && ready {
                    crate::systemd::notify("READY=1\nSTATUS=connected to the broker");
                }
                ok
            }
            Control::Leave { offline } => {
                let ok = client
                    .publish(status_topic.clone(), QoS::AtLeastOnce, true, offline)
                    .await;
                ok.and(client.disconnect().await)
            }
            Control::Disconnect => client.disconnect().await,
        };
        if let Err(e) = handed {
            log::warn!("MQTT client: {e}");
        }
    }
}
