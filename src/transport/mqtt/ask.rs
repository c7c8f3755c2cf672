//! `anotador ask`: the client side of the daemon's MQTT 5 request/response. Each
//! request is published (QoS 1) with a response topic and correlation data; the
//! daemon answers on that topic, when its route's `responses` allows it, with the
//! same correlation data and the same JSON envelope as every other answer.
//!
//! Requests are pipelined (`in_flight` at a time) and printed in input order. The
//! input is read on a thread of its own, so a slow terminal never stalls the MQTT
//! connection (pings and acknowledgements go through the same loop).

use std::collections::BTreeMap;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::mpsc;

#[derive(Debug, thiserror::Error)]
pub enum AskError {
    #[error("cannot reach the broker at {address}: {reason} (is `anotador run` running, or the broker it uses?)")]
    Connect { address: String, reason: String },
    #[error("the broker refused the subscription to the response topic {topic}: {reason}")]
    Subscribe { topic: String, reason: String },
    #[error("no answer within {} s for {waiting} request(s): is a daemon serving {topic}, and does its route allow the response topic {reply_to} (`responses` in [[routes]])?", timeout.as_secs_f64())]
    Timeout {
        waiting: usize,
        topic: String,
        reply_to: String,
        timeout: Duration,
    },
    #[error("the connection to the broker failed: {0}")]
    Connection(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Where and how to ask.
#[derive(Debug, Clone)]
pub struct Ask {
    pub host: String,
    pub port: u16,
    /// The topic a daemon's route takes requests on.
    pub topic: String,
    /// The response topic: it must match the route's `responses`.
    pub reply_to: String,
    pub client_id: String,
    /// How long to wait for the next answer.
    pub timeout: Duration,
    /// Requests published and not yet answered, at most.
    pub in_flight: usize,
}

/// Sends every payload of `requests` and hands each answer (the daemon's JSON
/// envelope) to `answer`, in the order of the requests. Returns how many were
/// answered.
pub fn ask(
    settings: &Ask,
    requests: Box<dyn Iterator<Item = std::io::Result<Vec<u8>>> + Send>,
    answer: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
) -> Result<usize, AskError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Input on its own thread: a blocking read must not stop the MQTT loop.
    let (tx, rx) = mpsc::channel(settings.in_flight.max(1));
    std::thread::Builder::new()
        .name("ask-input".into())
        .spawn(move || {
            for request in requests {
                if tx.blocking_send(request).is_err() {
                    return;
                }
            }
        })?;
    runtime.block_on(run(settings, rx, answer))
}

async fn run(
    settings: &Ask,
    mut requests: mpsc::Receiver<std::io::Result<Vec<u8>>>,
    answer: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
) -> Result<usize, AskError> {
    let in_flight = settings.in_flight.max(1);
    let mut opts = MqttOptions::new(&settings.client_id, &settings.host, settings.port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_clean_start(true);
    // Answers can be larger than the default cap (results of long texts).
    opts.set_max_packet_size(Some(64 << 20));
    let (client, mut eventloop) = AsyncClient::new(opts, in_flight + 8);
    let address = format!("{}:{}", settings.host, settings.port);
    // The client is polled by a task of its own: a poll dropped halfway (by a
    // select! arm that lost) could lose a request it had taken from the queue.
    let (events_tx, mut events) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let event = eventloop.poll().await.map_err(|e| e.to_string());
            let failed = event.is_err();
            if events_tx.send(event).is_err() || failed {
                return;
            }
        }
    });

    // Connect and subscribe to the response topic before the first request, so
    // that no answer can come before anyone listens.
    client
        .try_subscribe(&settings.reply_to, QoS::AtLeastOnce)
        .map_err(|e| AskError::Connection(e.to_string()))?;
    let connect_by = tokio::time::Instant::now() + settings.timeout;
    loop {
        let event = tokio::time::timeout_at(connect_by, events.recv())
            .await
            .map_err(|_| AskError::Connect {
                address: address.clone(),
                reason: "timed out".into(),
            })?
            .unwrap_or_else(|| Err("closed".into()))
            .map_err(|reason| AskError::Connect {
                address: address.clone(),
                reason,
            })?;
        if let Event::Incoming(Packet::SubAck(ack)) = event {
            match ack.return_codes.first() {
                Some(rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(_)) => break,
                other => {
                    return Err(AskError::Subscribe {
                        topic: settings.reply_to.clone(),
                        reason: format!("{other:?}"),
                    })
                }
            }
        }
    }

    let mut next = 0u64; // the next request's number (its correlation data)
    let mut printed = 0u64; // answers handed out, in order
    let mut waiting: BTreeMap<u64, Option<Vec<u8>>> = BTreeMap::new();
    let mut input_done = false;
    let mut deadline = tokio::time::Instant::now() + settings.timeout;
    while !(input_done && waiting.is_empty()) {
        tokio::select! {
            request = requests.recv(), if !input_done && waiting.len() < in_flight => {
                match request {
                    None => input_done = true,
                    Some(payload) => {
                        let properties = PublishProperties {
                            response_topic: Some(settings.reply_to.clone()),
                            correlation_data: Some(next.to_string().into_bytes().into()),
                            ..Default::default()
                        };
                        client
                            .try_publish_with_properties(
                                &settings.topic,
                                QoS::AtLeastOnce,
                                false,
                                payload?,
                                properties,
                            )
                            .map_err(|e| AskError::Connection(e.to_string()))?;
                        if waiting.is_empty() {
                            deadline = tokio::time::Instant::now() + settings.timeout;
                        }
                        waiting.insert(next, None);
                        next += 1;
                    }
                }
            }
            event = events.recv() => {
                let event = event
                    .unwrap_or_else(|| Err("closed".into()))
                    .map_err(AskError::Connection)?;
                let Event::Incoming(Packet::Publish(publish)) = event else { continue };
                let number = publish
                    .properties
                    .as_ref()
                    .and_then(|p| p.correlation_data.as_ref())
                    .and_then(|c| std::str::from_utf8(c).ok()?.parse::<u64>().ok());
                // Anything else on the response topic (a stale answer of an
                // earlier run, say) is not ours.
                let Some(slot) = number.and_then(|n| waiting.get_mut(&n)) else { continue };
                *slot = Some(publish.payload.to_vec());
                deadline = tokio::time::Instant::now() + settings.timeout;
                while let Some(entry) = waiting.first_entry() {
                    if entry.get().is_none() {
                        break;
                    }
                    answer(entry.remove().as_deref().unwrap_or_default())?;
                    printed += 1;
                }
            }
            _ = tokio::time::sleep_until(deadline), if !waiting.is_empty() => {
                return Err(AskError::Timeout {
                    waiting: waiting.values().filter(|a| a.is_none()).count(),
                    topic: settings.topic.clone(),
                    reply_to: settings.reply_to.clone(),
                    timeout: settings.timeout,
                });
            }
        }
    }
    // Best effort: the answers are out already.
    let _ = client.try_disconnect();
    let goodbye = tokio::time::Instant::now() + Duration::from_millis(500);
    while let Ok(Some(Ok(event))) = tokio::time::timeout_at(goodbye, events.recv()).await {
        if matches!(event, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
            break;
        }
    }
    Ok(printed as usize)
}
