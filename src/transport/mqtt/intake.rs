//! Intake: a received message routed by its topic to one of the service's routes,
//! parsed and validated, then handed to a worker with a reply handle that knows
//! where its answer goes; a bad payload is answered here, on the route's error topic.

use std::time::Instant;

use rumqttc::v5::mqttbytes::v5::Publish;
use serde_json::Map;
use tokio::sync::mpsc;

use super::publisher::{ack_token, Answer, Delivery, Ticket};
use crate::config::Config;
use crate::error::Result;
use crate::message::{self, Request, Source};
use crate::pool::{Closed, Health, Reply};
use crate::routing::{Filter, Template};
use crate::service::{Models, Next, Service};
use crate::tasks::{Annotation, Annotator};

/// The MQTT side of a route: which topics, and where its answers go.
struct Route {
    filter: Filter,
    output: Template,
    errors: Template,
    /// The route's key in `[models]`, for the `{model}` placeholder.
    model: String,
}

/// Everything needed to take a message: routes, the service, the payload cap.
pub struct Intake {
    routes: Vec<Route>,
    service: Service<Answered>,
    name: String,
    max_payload_bytes: usize,
    deliveries: mpsc::UnboundedSender<Delivery>,
}

impl Intake {
    /// Starts the service's worker pools for `config`'s routes.
    pub fn start(
        config: &Config,
        models: Models,
        health: &std::sync::Arc<Health>,
        deliveries: mpsc::UnboundedSender<Delivery>,
    ) -> Result<Intake> {
        let service = Service::start(models, config, config.daemon.queue, health)?;
        Ok(Intake {
            routes: routes(config),
            service,
            name: config.daemon.name.clone(),
            max_payload_bytes: config.daemon.max_payload_bytes,
            deliveries,
        })
    }

    pub fn models(&self) -> &Models {
        &self.service.models
    }

    /// What to subscribe to.
    pub fn subscriptions(&self) -> Vec<String> {
        self.routes
            .iter()
            .map(|r| r.filter.subscription().to_string())
            .collect()
    }

    /// Switches to a reloaded configuration between two messages; returns the
    /// worker pools it replaced, closed.
    pub fn switch(&mut self, next: Next<Answered>) -> Vec<Closed> {
        self.routes = routes(&next.config);
        self.service.replace(next)
    }

    /// Stops the workers: what they hold is left unacknowledged.
    pub fn stop(self) -> Vec<Closed> {
        self.service.stop()
    }

    /// Routes, parses and validates one message; hands it to its model's workers,
    /// or its error straight to the publisher.
    pub fn take(&self, publish: Publish, received: Instant, ticket: Ticket) {
        // MQTT topics are UTF-8 by the protocol; a broker that sent anything else
        // gets the replacement character rather than a crash.
        let topic = String::from_utf8_lossy(&publish.topic).into_owned();
        let matched = self
            .routes
            .iter()
            .enumerate()
            .find_map(|(i, r)| r.filter.captures(&topic).map(|c| (i, r, c)));
        let Some((index, route, captures)) = matched else {
            log::warn!("message on {topic} matches no route; acknowledged and dropped");
            let _ = self.deliveries.send(Delivery {
                answer: None,
                ack: ack_token(publish),
                ticket,
                received,
            });
            return;
        };
        let served = &self.service.routes()[index];
        let render = |t: &Template| t.render(&topic, &captures, &route.model, &self.name);
        let (output, errors) = (render(&route.output), render(&route.errors));
        let task = served.annotator.task();
        let parsed = message::parse(
            &publish.payload,
            served.format,
            task,
            self.max_payload_bytes,
        );
        let ack = ack_token(publish);
        match parsed {
            Err((id, error)) => {
                log::debug!("bad payload on {topic}: {}", error.code());
                let source = Source {
                    model: &served.annotator.bundle().name,
                    task,
                    topic: Some(&topic),
                };
                let payload = message::envelope(source, id.as_ref(), &Map::new(), Err(&error));
                let _ = self.deliveries.send(Delivery {
                    answer: Some(Answer {
                        topic: errors,
                        payload,
                        error: Some(error.code()),
                    }),
                    ack,
                    ticket,
                    received,
                });
            }
            Ok(request) => self.service.submit(
                index,
                request,
                Answered {
                    topic,
                    output,
                    errors,
                    ack,
                    ticket,
                    received,
                    deliveries: self.deliveries.clone(),
                },
            ),
        }
    }
}

fn routes(config: &Config) -> Vec<Route> {
    config
        .routes
        .iter()
        .map(|r| Route {
            filter: r.filter.clone(),
            output: r.output.clone(),
            errors: r.errors.clone(),
            model: r.model.clone(),
        })
        .collect()
}

/// The reply handle of a message handed to a worker: where its result or error
/// goes, and what to acknowledge after.
pub struct Answered {
    topic: String,
    output: String,
    errors: String,
    ack: Publish,
    ticket: Ticket,
    received: Instant,
    deliveries: mpsc::UnboundedSender<Delivery>,
}

impl Reply for Answered {
    fn send(self, annotator: &Annotator, request: &Request, outcome: Result<Annotation>) {
        let Answered {
            topic,
            output,
            errors,
            ack,
            ticket,
            received,
            deliveries,
        } = self;
        let source = Source {
            model: &annotator.bundle().name,
            task: annotator.task(),
            topic: Some(&topic),
        };
        let payload =
            message::envelope(source, request.id.as_ref(), &request.meta, outcome.as_ref());
        let (topic, error) = match &outcome {
            Ok(_) => (output, None),
            Err(e) => (errors, Some(e.code())),
        };
        let _ = deliveries.send(Delivery {
            answer: Some(Answer {
                topic,
                payload,
                error,
            }),
            ack,
            ticket,
            received,
        });
    }
}
