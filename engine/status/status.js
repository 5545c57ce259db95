// qrelay's status page: polls /status.json every second and fills the page.
// Every value is written with textContent: addresses and remote servers'
// replies come from the network.
"use strict";

const POLL_MS = 1000;

function $(id) { return document.getElementById(id); }

function set(id, value) { $(id).textContent = value; }

function count(n) { return Math.round(n).toLocaleString("en"); }

function rate(n) { return n >= 10 ? n.toFixed(0) : n.toFixed(1); }

function duration(seconds) {
  if (seconds < 1) return "0 s";
  if (seconds < 120) return Math.round(seconds) + " s";
  if (seconds < 7200) return Math.round(seconds / 60) + " min";
  if (seconds < 172800) return (seconds / 3600).toFixed(1) + " h";
  return (seconds / 86400).toFixed(1) + " d";
}

function clock(t) {
  return t ? new Date(t * 1000).toLocaleTimeString("en-GB") : "";
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function fill(tbody, rows, render) {
  const fresh = document.createDocumentFragment();
  for (const r of rows) {
    const tr = document.createElement("tr");
    render(tr, r);
    fresh.appendChild(tr);
  }
  tbody.replaceChildren(fresh);
}

function render(s) {
  const q = s.queue, t = s.totals, r = s.rates;
  set("root", s.root);
  set("updated", "updated " + clock(s.now));
  $("updated").className = "muted";
  if (q.error) {
    // The spool cannot be read: no numbers rather than an empty queue.
    set("updated", "cannot read the queue: " + q.error);
    $("updated").className = "stale";
  }
  set("messages", q.error ? "?" : count(q.messages));
  set("not-preprocessed", q.error ? "?" : count(q.not_preprocessed));
  set("oldest", q.messages && !q.error ? duration(q.oldest_age) : "–");
  const open = Object.entries(q.recipients).map(([k, v]) => k + " " + count(v));
  set("recipients", open.length ? open.join(", ") : "none");
  for (const k of ["received", "tempfail", "delivered", "deferred", "bounced", "sessions"]) {
    set(k, count(t[k]));
  }
  set("sessions-active", count(t.sessions_active));
  for (const k of ["received", "delivered", "deferred", "bounced", "sessions"]) {
    set("rate-" + k, rate(r[k] || 0));
  }
  set("scan", q.summary_age === null ? "" :
      "scanned " + duration(q.summary_age) + " ago in " + q.summary_seconds.toFixed(2) + " s");

  const head = document.createElement("tr");
  for (const h of ["destination", "total", ...q.age_buckets]) {
    const th = document.createElement("th");
    th.textContent = h;
    if (h !== "destination") th.className = "num";
    head.appendChild(th);
  }
  $("shape").tHead.replaceChildren(head);
  fill($("shape").tBodies[0], q.shape, (tr, row) => {
    cell(tr, row.destination);
    cell(tr, count(row.total), "num");
    for (const n of row.ages) cell(tr, n ? count(n) : "", "num");
  });
  fill($("deferred-table").tBodies[0], q.deferred, (tr, row) => {
    cell(tr, row.destination);
    cell(tr, count(row.count), "num");
    cell(tr, clock(row.next_try));
    cell(tr, row.last_error, "text");
  });
  fill($("recent").tBodies[0], s.recent, (tr, row) => {
    cell(tr, clock(row.time));
    cell(tr, row.msgid, "num");
    cell(tr, row.channel);
    cell(tr, row.recipient);
    cell(tr, row.result, row.result);
    cell(tr, row.text, "text");
  });
}

async function poll() {
  try {
    const response = await fetch("/status.json", {cache: "no-store"});
    if (!response.ok) throw new Error("HTTP " + response.status);
    render(await response.json());
  } catch (e) {
    set("updated", "cannot reach qrelay (" + e.message + "); retrying");
    $("updated").className = "stale";
  }
  setTimeout(poll, POLL_MS);
}

poll();
