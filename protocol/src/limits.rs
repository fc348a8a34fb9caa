//! Bounds on everything read from untrusted input. Nothing is allocated from
//! a length field until it has been checked against one of these.

/// Default payload chunk size: one chunk travels as one NATS message, well
/// under nats-server's default `max_payload` of 1 MiB.
pub const DEFAULT_CHUNK_SIZE: u32 = 256 * 1024;
/// Smallest chunk size a bundle may declare.
pub const MIN_CHUNK_SIZE: u32 = 1024;
/// Largest chunk size a bundle may declare (nats-server's hard ceiling for
/// `max_payload` is 64 MiB; 8 MiB keeps per-chunk memory modest on a drone).
pub const MAX_CHUNK_SIZE: u32 = 8 * 1024 * 1024;
/// Largest encoded manifest. 1 M chunk hashes fit (a 256 GiB image at 256 KiB).
pub const MAX_MANIFEST_LEN: u32 = 40 * 1024 * 1024;
/// Largest encoded signature block.
pub const MAX_SIGNATURES_LEN: u32 = 64 * 1024;
/// Most signatures one bundle or trust document may carry.
pub const MAX_SIGNATURES: usize = 64;
/// Longest name, display version, target or org string.
pub const MAX_LABEL_LEN: usize = 128;
/// Most compatible targets in one manifest.
pub const MAX_TARGETS: usize = 64;
/// Largest encoded trust document body.
pub const MAX_TRUST_BODY_LEN: u32 = 64 * 1024;
/// Most release or issuing keys in one trust document.
pub const MAX_TRUST_KEYS: usize = 64;
