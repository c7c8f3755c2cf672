//! Transports: where requests come from and where their answers go, at the edge
//! of the daemon. A transport receives messages, routes each to a
//! [`service::Route`](crate::service::Route), parses it with
//! [`message::parse`](crate::message::parse) and submits it to the service with a
//! reply handle of its own ([`pool::Reply`](crate::pool::Reply)); the reply handle
//! turns the outcome into bytes with [`message::envelope`](crate::message::envelope)
//! and sends them back its own way. The service and its worker pools know nothing
//! of transports, so another one (stdin, HTTP) is a module beside `mqtt`:
//! `lines` is `annotate`'s (lines of a file or stdin, answers in input order).
//!
//! `broker` is the embedded MQTT broker (`[broker.embedded]`, cargo feature
//! `broker`): not a transport of its own but a broker in the process, which the
//! `mqtt` transport connects to like any other.

#[cfg(feature = "broker")]
pub mod broker;
pub mod lines;
pub mod mqtt;

/// What the process asks of a running transport, from outside its I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Take nothing new, finish what was taken, say goodbye, return.
    Shutdown,
    /// Read the configuration again and apply it without dropping the connection.
    Reload,
}
