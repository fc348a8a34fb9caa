//! The files a Choria call makes in `STATE/choria/`: a downloaded bundle
//! and an enrollment token, one per call, and the download itself.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::last_line;

/// A fresh path in `STATE/choria/` for one call (`KIND-PID-REQUESTID.EXT`:
/// each call is its own process, so two never share one), with any file a
/// killed call left there removed.
pub(super) fn path(state_dir: &Path, request_id: &str, kind: &str, ext: &str) -> Result<PathBuf, String> {
    let id: String = request_id.chars().filter(char::is_ascii_alphanumeric).take(64).collect();
    let dir = state_dir.join("choria");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let file = dir.join(format!("{kind}-{}-{id}.{ext}", std::process::id()));
    let _ = std::fs::remove_file(&file);
    Ok(file)
}

/// Removes every `KIND-*` file in `STATE/choria/`.
pub(super) fn clear(state_dir: &Path, kind: &str) {
    for e in std::fs::read_dir(state_dir.join("choria")).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().starts_with(&format!("{kind}-")) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// How long a download may take: under the DDL's 600 s, so that the reply
/// still says why.
const DOWNLOAD_TIME: &str = "540";

/// Downloads `url` into `file` with the node's curl, never more than `max`
/// bytes whatever the server says (curl's own `--max-filesize` trusts a
/// Content-Length): curl writes to a pipe, and the copy stops past `max`.
pub(super) fn download(url: &str, file: &Path, max: u64) -> Result<(), String> {
    let mut child = Command::new("curl")
        .args(["--fail", "--silent", "--show-error", "--location", "--proto", "=http,https"])
        .args(["--connect-timeout", "30", "--max-time", DOWNLOAD_TIME, "--output", "-", "--"])
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("it needs curl on the node's PATH: {e}"))?;
    let copied = (|| -> std::io::Result<u64> {
        let mut out = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(file)?;
        let stdout = child.stdout.take().ok_or_else(|| std::io::Error::other("no pipe from curl"))?;
        let n = std::io::copy(&mut std::io::Read::take(stdout, max.saturating_add(1)), &mut out)?;
        out.sync_all()?;
        Ok(n)
    })();
    if !matches!(copied, Ok(n) if n <= max) {
        let _ = child.kill();
    }
    let done = child.wait_with_output().map_err(|e| format!("curl: {e}"))?;
    match copied {
        Err(e) => Err(format!("{}: {e}", file.display())),
        Ok(n) if n > max => Err(format!("larger than download_max_bytes ({max})")),
        Ok(_) if !done.status.success() => Err(last_line(&done.stderr)),
        Ok(_) => Ok(()),
    }
}
