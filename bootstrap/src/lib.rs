//! Trust and enrollment for perch: creating an org and maintaining its
//! trust document. (Enrollment and the provisioner service come next.)
#![forbid(unsafe_code)]

pub mod nats;
pub mod org;
pub mod token;
