//! Intake: a received message routed by its topic to one of the service's routes,
//! parsed and validated, then handed to a worker with a reply handle that knows
//! where its answer goes; a bad payload is answered here, on the route's error topic.

use std::time::Instant;

use rumqttc::v5::mqttbytes::v5::{Publish, PublishProperties};
use serde_json::Map;
use tokio::sync::mpsc;

use super::publisher::{ack_token, Answer, Delivery, Ticket};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::message::{self, Request, Source};
use crate::pool::{Closed, Health, Reply};
use crate::routing::{publishable, Filter, Template};
use crate::service::{Models, Next, Service};
use crate::tasks::{Annotation, Annotator};

/// The MQTT side of a route: which topics, and where its answers go.
struct Route {
    filter: Filter,
    output: Template,
    errors: Template,
    /// The route's key in `[models]`, for the `{model}` placeholder.
    model: String,
    /// The response topics an MQTT 5 request may name; `None`: not a
    /// request/response route, response topics are ignored.
    responses: Option<Filter>,
}

/// Where one message's answer goes: the route's output and error topics, or an
/// allowed response topic (result and error alike), with the request's correlation
/// data and user properties.
struct Destination {
    output: String,
    errors: String,
    properties: Option<PublishProperties>,
}

/// What a request's response topic asks for, against its route's `responses`.
enum Asked {
    /// No response topic, or a route that does not do request/response.
    Routes,
    Reply(String),
    Refused(Error),
}

fn asked(route: &Route, properties: Option<&PublishProperties>) -> Asked {
    let (Some(allowed), Some(topic)) = (
        &route.responses,
        properties.and_then(|p| p.response_topic.as_ref()),
    ) else {
        return Asked::Routes;
    };
    if publishable(topic) && allowed.matches(topic) {
        Asked::Reply(topic.clone())
    } else {
        Asked::Refused(Error::ResponseTopicRefused {
            topic: topic.clone(),
            allowed: allowed.subscription().to_string(),
        })
    }
}

/// The properties a reply carries back: correlation data and user properties
/// (MQTT 5 request/response), nothing else of the request's.
fn echoed(properties: Option<&PublishProperties>) -> PublishProperties {
    PublishProperties {
        correlation_data: properties.and_then(|p| p.correlation_data.clone()),
        user_properties: properties
            .map(|p| p.user_properties.clone())
            .unwrap_or_default(),
        ..Default::default()
    }
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
        let properties = publish.properties.as_ref();
        let mut refused = None;
        let to = match asked(route, properties) {
            Asked::Routes => Destination {
                output: render(&route.output),
                errors: render(&route.errors),
                properties: None,
            },
            Asked::Reply(reply) => Destination {
                output: reply.clone(),
                errors: reply,
                properties: Some(echoed(properties)),
            },
            Asked::Refused(error) => {
                refused = Some(error);
                Destination {
                    output: render(&route.output),
                    errors: render(&route.errors),
                    properties: Some(echoed(properties)),
                }
            }
        };
        let task = served.annotator.task();
        let parsed = message::parse(
            &publish.payload,
            served.format,
            task,
            self.max_payload_bytes,
        );
        let ack = ack_token(publish);
        // A refused response topic is answered on the route's error topic, never
        // run: the payload is parsed only for its id.
        let parsed = match (parsed, refused) {
            (parsed, None) => parsed,
            (Ok(request), Some(error)) => Err((request.id, error)),
            (Err((id, _)), Some(error)) => Err((id, error)),
        };
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
                        topic: to.errors,
                        payload,
                        error: Some(error.code()),
                        properties: to.properties,
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
                    to,
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
            responses: r.responses.clone(),
        })
        .collect()
}

/// The reply handle of a message handed to a worker: where its result or error
/// goes, and what to acknowledge after.
pub struct Answered {
    topic: String,
    to: Destination,
    ack: Publish,
    ticket: Ticket,
    received: Instant,
    deliveries: mpsc::UnboundedSender<Delivery>,
}

impl Reply for Answered {
    fn send(self, annotator: &Annotator, request: &Request, outcome: Result<Annotation>) {
        let Answered {
            topic,
            to,
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
            Ok(_) => (to.output, None),
            Err(e) => (to.errors, Some(e.code())),
        };
        let _ = deliveries.send(Delivery {
            answer: Some(Answer {
                topic,
                payload,
                error,
                properties: to.properties,
            }),
            ack,
            ticket,
            received,
        });
    }
}
