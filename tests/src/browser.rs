//! A WebDriver harness for the console's browser tests: Debian's headless
//! Chromium, driven through Debian's chromedriver with fantoccini (plain
//! HTTP on loopback, so no TLS). `cargo xtask setup` installs both.
//!
//! Every call takes a CSS selector and returns `Result<_, String>` whose
//! error names the selector, so a failing test says what it was looking at.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::elements::Element;
use fantoccini::wd::Capabilities;
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{json, Value};

/// Debian's chromium (package `chromium`).
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// Debian's chromedriver (package `chromium-driver`).
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// The tallest window [`Browser::screenshot`] grows to for a full page.
const MAX_SHOT_HEIGHT: u32 = 4000;
/// How often the waits look again.
const POLL: Duration = Duration::from_millis(50);

/// Both binaries are installed. Tests that need them should fail (not
/// skip) without them, saying that `cargo xtask setup` installs them.
pub fn available() -> bool {
    Path::new(CHROMIUM).is_file() && Path::new(CHROMEDRIVER).is_file()
}

/// chromedriver in its own process group (with the chromium it starts),
/// and the scratch directory holding chromium's profile and the driver's
/// log. Dropping it kills the whole group, then removes the directory.
struct Driver {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Driver {
    fn log_path(&self) -> PathBuf {
        self.dir.path().join("chromedriver.log")
    }

    /// The end of chromedriver's log, for error messages.
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // chromedriver leaves chromium (and its zygote, renderers, GPU
        // process) running if it dies alone: kill the group it leads.
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).stderr(Stdio::null()).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The browser's processes are not our children: wait (briefly) for
        // the group to be gone, so the profile is not removed under them.
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(2) {
            let alive = Command::new("kill")
                .args(["-0", "--", &group])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !alive {
                break;
            }
            std::thread::sleep(POLL);
        }
    }
}

/// A headless Chromium session. Chromedriver and the browser are killed
/// when it is dropped, even if a test fails; [`close`](Self::close) ends
/// the session politely first.
pub struct Browser {
    client: Client,
    // Declared after `client`: dropped (killed) after it.
    driver: Driver,
    /// The window's outer size minus the viewport's (the window chrome).
    chrome: (u32, u32),
    /// The viewport size asked for.
    size: (u32, u32),
}

impl Browser {
    /// The module's [`available`], for callers that only import `Browser`.
    pub fn available() -> bool {
        self::available()
    }

    /// Starts chromedriver on a free loopback port and a headless Chromium
    /// session whose viewport (`document.documentElement.clientWidth` and
    /// `clientHeight`) is `width` x `height` CSS pixels.
    pub async fn start(width: u32, height: u32) -> Result<Browser, String> {
        if !available() {
            return Err(format!(
                "{CHROMIUM} or {CHROMEDRIVER} is missing: `cargo xtask setup` installs them"
            ));
        }
        let driver = spawn_driver()?;
        wait_listening(&driver).await?;

        let profile = driver.dir.path().join("profile");
        let mut caps = Capabilities::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": CHROMIUM,
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    // A scrollbar takes 15 px of a page taller than the
                    // window: without this, width would depend on content.
                    "--hide-scrollbars",
                    format!("--user-data-dir={}", profile.display()),
                ],
            }),
        );
        let url = format!("http://127.0.0.1:{}", driver.port);
        let client =
            ClientBuilder::new(HttpConnector::new()).capabilities(caps).connect(&url).await.map_err(|e| {
                format!("new chromium session: {e}\nchromedriver log:\n{}", driver.log_tail())
            })?;

        let mut browser = Browser { client, driver, chrome: (0, 0), size: (width, height) };
        browser.resize(width, height).await?;
        Ok(browser)
    }

    /// Sizes the window so that the viewport is `width` x `height`.
    /// Headless Chromium clamps `--window-size` to 500 px wide, and its
    /// window chrome takes 143 px of the height (Chromium 150): the window
    /// is set through WebDriver (not clamped), the viewport measured, and
    /// the window corrected by the difference.
    pub async fn resize(&mut self, width: u32, height: u32) -> Result<(), String> {
        let mut outer = (width + self.chrome.0, height + self.chrome.1);
        for _ in 0..3 {
            self.client
                .set_window_rect(0, 0, outer.0, outer.1)
                .await
                .map_err(|e| format!("set window rect {outer:?}: {e}"))?;
            let (w, h) = self.viewport().await?;
            if (w, h) == (width, height) {
                self.chrome = (outer.0 - width, outer.1 - height);
                self.size = (width, height);
                return Ok(());
            }
            // Grow the window by what the viewport lacks (never below it).
            outer = (
                (outer.0 + width).saturating_sub(w).max(width),
                (outer.1 + height).saturating_sub(h).max(height),
            );
        }
        let got = self.viewport().await?;
        Err(format!("viewport {got:?} (window {outer:?}), not the {width}x{height} asked for"))
    }

    /// The viewport's size in CSS pixels. Scrollbars are hidden, so this
    /// is also `document.documentElement.clientWidth` and `clientHeight`
    /// on a standards-mode page (the window's inner size is used: in quirks
    /// mode, about:blank's too, `clientHeight` is the document's height).
    pub async fn viewport(&self) -> Result<(u32, u32), String> {
        let v = self.execute("return [window.innerWidth, window.innerHeight];", vec![]).await?;
        match (v[0].as_u64(), v[1].as_u64()) {
            (Some(w), Some(h)) => Ok((w as u32, h as u32)),
            _ => Err(format!("viewport size: {v}")),
        }
    }

    /// The fantoccini client, for anything this harness does not wrap.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Navigates to `url` and waits for it to load.
    pub async fn goto(&self, url: &str) -> Result<(), String> {
        self.client.goto(url).await.map_err(|e| format!("goto {url}: {e}"))
    }

    /// The element `css` matches (the first one), now.
    pub async fn find(&self, css: &str) -> Result<Element, String> {
        self.client.find(Locator::Css(css)).await.map_err(|e| format!("find {css}: {e}"))
    }

    /// Clicks the element `css` matches.
    pub async fn click(&self, css: &str) -> Result<(), String> {
        self.find(css).await?.click().await.map_err(|e| format!("click {css}: {e}"))
    }

    /// The rendered text of the element `css` matches.
    pub async fn text(&self, css: &str) -> Result<String, String> {
        self.find(css).await?.text().await.map_err(|e| format!("text of {css}: {e}"))
    }

    /// Waits until an element matches `css`, and returns it.
    pub async fn wait_for(&self, css: &str, timeout: Duration) -> Result<Element, String> {
        let start = Instant::now();
        loop {
            match self.client.find(Locator::Css(css)).await {
                Ok(e) => return Ok(e),
                Err(e) if !e.is_no_such_element() => return Err(format!("find {css}: {e}")),
                Err(_) if start.elapsed() >= timeout => {
                    return Err(format!("nothing matched {css} within {timeout:?}"));
                }
                Err(_) => tokio::time::sleep(POLL).await,
            }
        }
    }

    /// Waits until the element `css` matches exists and its text contains
    /// `needle`; returns the whole text. On timeout the error says the
    /// text last seen.
    pub async fn wait_text(&self, css: &str, needle: &str, timeout: Duration) -> Result<String, String> {
        let start = Instant::now();
        let mut last = None;
        loop {
            // The element may be replaced between find and text (a re-render).
            if let Ok(e) = self.client.find(Locator::Css(css)).await {
                if let Ok(text) = e.text().await {
                    if text.contains(needle) {
                        return Ok(text);
                    }
                    last = Some(text);
                }
            }
            if start.elapsed() >= timeout {
                let seen = match last {
                    Some(t) => format!("its text was {t:?}"),
                    None => "no element matched".into(),
                };
                return Err(format!("{css}: no text containing {needle:?} within {timeout:?}; {seen}"));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Clears the input `css` matches and types `value` into it (as keys:
    /// the page sees input events).
    pub async fn fill(&self, css: &str, value: &str) -> Result<(), String> {
        let e = self.find(css).await?;
        e.clear().await.map_err(|e| format!("clear {css}: {e}"))?;
        e.send_keys(value).await.map_err(|e| format!("type into {css}: {e}"))
    }

    /// Accepts the JavaScript `confirm()` (or `alert()`) dialog that is
    /// open, or opens within 5 s (a click's handler may take a moment);
    /// returns its message.
    pub async fn accept_confirm(&self) -> Result<String, String> {
        let start = Instant::now();
        loop {
            match self.client.get_alert_text().await {
                Ok(text) => {
                    self.client.accept_alert().await.map_err(|e| format!("accept dialog: {e}"))?;
                    return Ok(text);
                }
                Err(e) if !e.is_no_such_alert() => return Err(format!("dialog text: {e}")),
                Err(_) if start.elapsed() >= Duration::from_secs(5) => {
                    return Err("no dialog opened within 5 s".into());
                }
                Err(_) => tokio::time::sleep(POLL).await,
            }
        }
    }

    /// Runs `js` as a function body (`return` gives the value) with
    /// `args` as `arguments`.
    pub async fn execute(&self, js: &str, args: Vec<Value>) -> Result<Value, String> {
        self.client.execute(js, args).await.map_err(|e| format!("execute {js:?}: {e}"))
    }

    /// Writes a PNG of the whole page to `path`: the window is made as
    /// tall as the document (at most 4000 px) for the shot, then restored.
    pub async fn screenshot(&self, path: &Path) -> Result<(), String> {
        let js = "return Math.max(document.documentElement.scrollHeight, \
                  document.body ? document.body.scrollHeight : 0);";
        let page = self.execute(js, vec![]).await?.as_u64().unwrap_or(0);
        let tall = (page.min(u64::from(MAX_SHOT_HEIGHT)) as u32).max(self.size.1);
        let (w, h) = (self.size.0 + self.chrome.0, self.size.1 + self.chrome.1);
        if tall > self.size.1 {
            self.client
                .set_window_rect(0, 0, w, tall + self.chrome.1)
                .await
                .map_err(|e| format!("grow the window for a screenshot: {e}"))?;
        }
        let png = self.client.screenshot().await.map_err(|e| format!("screenshot: {e}"));
        if tall > self.size.1 {
            self.client.set_window_rect(0, 0, w, h).await.map_err(|e| format!("restore the window: {e}"))?;
        }
        std::fs::write(path, png?).map_err(|e| format!("write {}: {e}", path.display()))
    }

    /// The page's current HTML (the DOM, serialized).
    pub async fn source(&self) -> Result<String, String> {
        self.client.source().await.map_err(|e| format!("page source: {e}"))
    }

    /// Ends the session (the browser quits), then stops chromedriver.
    pub async fn close(self) -> Result<(), String> {
        let Browser { client, driver, .. } = self;
        let closed = client.close().await.map_err(|e| format!("close the session: {e}"));
        drop(driver);
        closed
    }
}

/// Starts chromedriver on a free loopback port, in a new process group.
fn spawn_driver() -> Result<Driver, String> {
    let dir = tempfile::Builder::new()
        .prefix("perch-browser-")
        .tempdir()
        .map_err(|e| format!("browser scratch dir: {e}"))?;
    // Free now; chromedriver takes it a moment later (a start that loses
    // the race fails with chromedriver's log saying so).
    let port = crate::nats::free_port();
    let log = dir.path().join("chromedriver.log");
    let out = std::fs::File::create(&log).map_err(|e| format!("create {}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| format!("{}: {e}", log.display()))?;
    let child = Command::new(CHROMEDRIVER)
        .arg(format!("--port={port}"))
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("start {CHROMEDRIVER}: {e}"))?;
    Ok(Driver { child, port, dir })
}

/// Waits (10 s at most) until chromedriver accepts connections.
async fn wait_listening(driver: &Driver) -> Result<(), String> {
    let start = Instant::now();
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", driver.port)).await.is_ok() {
            return Ok(());
        }
        if start.elapsed() >= Duration::from_secs(10) {
            return Err(format!(
                "chromedriver did not listen on port {} within 10 s\n{}",
                driver.port,
                driver.log_tail()
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A heading, and a button whose click changes a paragraph's text.
    const PAGE: &str = "data:text/html,<!doctype html><title>t</title>\
        <h1 id=h>Perch console</h1>\
        <button id=b onclick=\"document.getElementById('out').textContent='clicked'\">Go</button>\
        <p id=out>waiting</p>\
        <input id=name oninput=\"document.getElementById('echo').textContent=this.value\">\
        <p id=echo></p>\
        <button id=c onclick=\"if(confirm('Sure?'))document.getElementById('out').textContent='confirmed'\">\
        Delete</button>";

    /// 3000 px tall, in standards mode.
    const TALL: &str = "data:text/html,<!doctype html><body style='margin:0'>\
        <div style='height:3000px;background:linear-gradient(red,blue)'>tall</div>";

    async fn round(width: u32, height: u32) {
        assert!(available(), "{CHROMIUM} and {CHROMEDRIVER} are needed: run `cargo xtask setup`");
        let b = Browser::start(width, height).await.unwrap();
        b.goto(PAGE).await.unwrap();
        b.wait_for("#h", Duration::from_secs(5)).await.unwrap();
        assert_eq!(b.text("#h").await.unwrap(), "Perch console");
        assert_eq!(b.text("#out").await.unwrap(), "waiting");
        b.click("#b").await.unwrap();
        let t = b.wait_text("#out", "clicked", Duration::from_secs(5)).await.unwrap();
        assert_eq!(t, "clicked");
        let err = b.wait_text("#out", "never", Duration::from_millis(200)).await.unwrap_err();
        assert!(err.contains("\"clicked\""), "{err}");

        b.fill("#name", "drone-7").await.unwrap();
        b.wait_text("#echo", "drone-7", Duration::from_secs(5)).await.unwrap();
        b.click("#c").await.unwrap();
        assert_eq!(b.accept_confirm().await.unwrap(), "Sure?");
        b.wait_text("#out", "confirmed", Duration::from_secs(5)).await.unwrap();

        let w = b.execute("return document.documentElement.clientWidth;", vec![]).await.unwrap();
        assert_eq!(w.as_u64(), Some(u64::from(width)), "clientWidth at {width}");
        assert_eq!(b.viewport().await.unwrap(), (width, height));

        let dir = tempfile::tempdir().unwrap();
        let shot = dir.path().join("page.png");
        b.screenshot(&shot).await.unwrap();
        let png = std::fs::read(&shot).unwrap();
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
        assert!(png.len() > 1000, "{} bytes", png.len());
        // The shot is as wide as the viewport (IHDR width, big-endian).
        assert_eq!(u32::from_be_bytes(png[16..20].try_into().unwrap()), width);
        // The window is back to the viewport asked for.
        assert_eq!(b.viewport().await.unwrap(), (width, height));
        assert!(b.source().await.unwrap().contains("Perch console"));

        // A page taller than the window: hidden scrollbars leave its width
        // alone, and the shot has the whole page.
        b.goto(TALL).await.unwrap();
        let w = b.execute("return document.documentElement.clientWidth;", vec![]).await.unwrap();
        assert_eq!(w.as_u64(), Some(u64::from(width)), "clientWidth of a tall page at {width}");
        b.screenshot(&shot).await.unwrap();
        let png = std::fs::read(&shot).unwrap();
        assert_eq!(u32::from_be_bytes(png[16..20].try_into().unwrap()), width);
        assert_eq!(u32::from_be_bytes(png[20..24].try_into().unwrap()), 3000);
        assert_eq!(b.viewport().await.unwrap(), (width, height));
        b.close().await.unwrap();
    }

    #[tokio::test]
    async fn narrow_and_wide() {
        round(420, 700).await;
        round(1280, 800).await;
    }
}
