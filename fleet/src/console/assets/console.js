// perch console: confirmations, and live updates from /events.
//
// The server sends a "changed" event every half second at most, whose
// data names what changed: "d:ID" for a device, "r:ID" for a rollout.
// Each page fetches again only the part that shows what changed: the
// fleet page its rows on screen, the device page its body, the rollouts
// page the list, the enrollment page the pending list, the fleet page
// also its counts. Nothing polls.
"use strict";

document.addEventListener("submit", (e) => {
  const msg = e.target.dataset && e.target.dataset.confirm;
  if (msg && !window.confirm(msg)) e.preventDefault();
});

const live = document.getElementById("live");
function setLive(text, cls) {
  if (!live) return;
  live.textContent = text;
  live.className = "live " + cls;
}

// Replaces element `sel` with the same element from `html`.
function swap(sel, html) {
  const old = document.querySelector(sel);
  if (!old) return;
  const t = document.createElement("template");
  t.innerHTML = html;
  const fresh = t.content.querySelector(sel);
  if (fresh) old.replaceWith(fresh);
}

async function get(url) {
  const r = await fetch(url, { credentials: "same-origin", cache: "no-store" });
  if (r.status === 401) { location.reload(); throw new Error("logged out"); }
  if (!r.ok) throw new Error(url + ": " + r.status);
  return r.text();
}

// One refresh of a kind at a time; a change meanwhile asks for one more.
function serial(fn) {
  let running = false, again = false;
  return async function run() {
    if (running) { again = true; return; }
    running = true;
    try { await fn(); } catch (e) { console.warn(e); }
    running = false;
    if (again) { again = false; run(); }
  };
}

const changedRows = new Set();
const refreshRows = serial(async () => {
  const ids = [...changedRows];
  changedRows.clear();
  if (!ids.length) return;
  const q = ids.map((id) => "id=" + encodeURIComponent(id)).join("&");
  const t = document.createElement("template");
  t.innerHTML = "<table><tbody>" + (await get("/fleet/rows?" + q)) + "</tbody></table>";
  for (const row of t.content.querySelectorAll("tr[data-device]")) {
    const old = document.querySelector('#fleet tr[data-device="' + CSS.escape(row.dataset.device) + '"]');
    if (old) old.replaceWith(row);
  }
});

const refreshSummary = serial(async () => swap("#summary", await get("/fleet/summary")));

const device = document.getElementById("device-body");
const refreshDevice = serial(async () => {
  swap("#device-body", await get("/device/" + encodeURIComponent(device.dataset.device) + "/body"));
});
const refreshRollouts = serial(async () => swap("#rollouts-body", await get("/rollouts/body")));
const refreshPending = serial(async () => swap("#pending-section", await get("/enrollment/pending")));

function changed(words) {
  const devices = [], rollouts = [];
  for (const w of words.split(" ")) {
    if (w.startsWith("d:")) devices.push(w.slice(2));
    else if (w.startsWith("r:")) rollouts.push(w.slice(2));
  }
  if (document.getElementById("fleet")) {
    let unseen = false;
    for (const id of devices) {
      if (document.querySelector('#fleet tr[data-device="' + CSS.escape(id) + '"]')) changedRows.add(id);
      else unseen = true;
    }
    refreshRows();
    if (devices.length) refreshSummary();
    const newer = document.getElementById("newer");
    if (unseen && newer) newer.hidden = false;
  }
  if (device && devices.includes(device.dataset.device)) refreshDevice();
  if (document.getElementById("rollouts-body") && (rollouts.length || devices.length)) refreshRollouts();
  if (document.getElementById("pending-section") && devices.length) refreshPending();
}

if (live && window.EventSource) {
  const es = new EventSource("/events");
  es.onopen = () => setLive("live", "on");
  es.onerror = () => setLive("reconnecting", "off");
  es.addEventListener("changed", (e) => changed(e.data));
  es.addEventListener("reload", () => location.reload());
}
