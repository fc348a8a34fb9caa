//! A command whose output goes to a pipe that closed (`perch bundle
//! inspect F | head -1`) stops quietly, as every Unix tool does.
//!
//! Rust starts programs with SIGPIPE ignored, so a write to a closed pipe
//! returns EPIPE and `println!` panics on it. Putting the signal back to
//! its default makes the kernel end the process instead, which is what
//! the shell expects (status 141, no message). Only for one-shot commands:
//! a daemon (the agent's `run`, the provisioner) keeps SIGPIPE ignored so
//! that a closed log pipe cannot kill it.
//!
//! The one `unsafe` in perch-support: `signal(2)` is unsafe in nix because
//! a handler could break async-signal safety. Setting the default action
//! installs no handler, so nothing runs in signal context.
#![allow(unsafe_code)]

/// Restores the default action for SIGPIPE (see the module docs).
pub fn die_on_closed_pipe() {
    use nix::sys::signal::{signal, SigHandler, Signal};
    // SAFETY: SigDfl installs no handler; the previous disposition (ignore)
    // is not needed. Called from main before any thread starts.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
}
