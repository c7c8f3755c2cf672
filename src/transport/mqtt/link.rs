//! The task that polls the MQTT client. rumqttc's event loop must be polled
//! without pause (pings, acknowledgements and results all go through it), and a
//! poll must not be dropped halfway (a request already taken from the client's
//! queue would be lost with it), so it runs alone: it forwards what the session
//! needs to know and, after a failure, waits to be told to connect again. The
//! session decides when; waiting here costs nothing and races nothing.

use rumqttc::v5::mqttbytes::v5::Publish;
use rumqttc::v5::{Event, EventLoop, Incoming};
use rumqttc::Outgoing;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// What the client did, as far as the session cares.
pub enum Polled {
    ConnAck { session_present: bool },
    Publish(Publish),
    DisconnectSent,
    Failed(String),
}

pub struct Link {
    pub events: mpsc::Receiver<Polled>,
    reconnect: mpsc::UnboundedSender<()>,
    task: JoinHandle<()>,
}

impl Link {
    pub fn spawn(eventloop: EventLoop) -> Link {
        let (tx, events) = mpsc::channel(64);
        let (reconnect, go) = mpsc::unbounded_channel();
        let task = tokio::spawn(drive(eventloop, tx, go));
        Link {
            events,
            reconnect,
            task,
        }
    }

    /// After a failure: connect again now.
    pub fn reconnect(&self) {
        let _ = self.reconnect.send(());
    }

    pub fn stop(self) {
        self.task.abort();
    }
}

async fn drive(
    mut eventloop: EventLoop,
    events: mpsc::Sender<Polled>,
    mut go: mpsc::UnboundedReceiver<()>,
) {
    loop {
        let polled = match eventloop.poll().await {
            Ok(Event::Incoming(Incoming::ConnAck(ack))) => Polled::ConnAck {
                session_present: ack.session_present,
            },
            Ok(Event::Incoming(Incoming::Publish(publish))) => Polled::Publish(publish),
            Ok(Event::Outgoing(Outgoing::Disconnect)) => Polled::DisconnectSent,
            Ok(_) => continue,
            Err(e) => Polled::Failed(e.to_string()),
        };
        let failed = matches!(polled, Polled::Failed(_));
        if events.send(polled).await.is_err() {
            return;
        }
        if failed && go.recv().await.is_none() {
            return;
        }
    }
}
