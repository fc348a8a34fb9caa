//! The operator's connection to the fleet's NATS (in perch-net, which
//! perch-bootstrap's registry commands share).

pub use perch_net::operator::{ConnectError, Target};
