// Backout status page: polls the JSON API every second and renders it.
// Plain DOM, no framework, no build step. Every value from the API is set as
// text (never as HTML): event payloads and error messages are untrusted.
"use strict";

(function () {
  const POLL_MS = 1000;
  const HEALTH_EVERY = 5; // polls between two /health checks
  const TERMINAL = new Set(["planned", "completed", "completed_with_warnings", "failed", "rejected"]);
  const STATE_LABELS = {
    completed_with_warnings: "completed with warnings",
  };

  // ------------------------------------------------------------------ helpers

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = value;
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false || child === "") continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  async function getJSON(url) {
    const response = await fetch(url, { cache: "no-store", headers: { Accept: "application/json" } });
    let body = null;
    try {
      body = await response.json();
    } catch (_) {
      body = null;
    }
    if (!response.ok) {
      const error = new Error((body && body.error) || `${response.status} ${response.statusText}`);
      error.status = response.status;
      throw error;
    }
    return body;
  }

  function stateLabel(state) {
    return STATE_LABELS[state] || state;
  }

  function badge(state, extra) {
    return el("span", { class: `badge state-${state}${extra ? " " + extra : ""}` }, stateLabel(state));
  }

  function shortId(id) {
    return id.length > 13 ? id.slice(0, 8) + "…" : id;
  }

  function when(text) {
    if (!text) return "";
    const then = new Date(text);
    if (Number.isNaN(then.getTime())) return text;
    const seconds = Math.round((Date.now() - then.getTime()) / 1000);
    if (seconds < 5) return "just now";
    if (seconds < 60) return `${seconds}s ago`;
    if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
    if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
    return then.toLocaleString();
  }

  function time(text) {
    return el("time", { datetime: text, title: text }, when(text));
  }

  function cell(label, ...content) {
    return el("td", { "data-label": label }, ...content);
  }

  function emptyRow(columns, message) {
    return el("tr", { class: "empty" }, el("td", { colspan: columns }, message));
  }

  // A rollback's progress: compensations done (applied or skipped) of those planned.
  function progressOf(r) {
    const done = (r.applied || 0) + (r.skipped || 0);
    const total = r.planned || 0;
    let percent = total ? Math.floor((done * 100) / total) : 0;
    if (!total && TERMINAL.has(r.state)) percent = 100;
    return { done, total, percent };
  }

  function progressText(r) {
    const p = progressOf(r);
    if (!p.total) return r.state === "rejected" ? "rejected: nothing to do" : "no compensations planned";
    return `${p.done} of ${p.total} compensations done (${p.percent}%)`;
  }

  function progressBar(r) {
    const p = progressOf(r);
    const fill = el("span", { class: "fill" });
    fill.style.width = `${p.percent}%`;
    const bar = el(
      "div",
      {
        class: `progress state-${r.state}${r.failed ? " has-failures" : ""}`,
        role: "progressbar",
        "aria-label": "compensations done",
        "aria-valuemin": 0,
        "aria-valuemax": p.total,
        "aria-valuenow": p.done,
        "aria-valuetext": progressText(r),
      },
      fill,
    );
    return bar;
  }

  function countsLine(r) {
    const parts = [];
    if (r.confirmed) parts.push(`${r.confirmed} confirmed`);
    if (r.running) parts.push(`${r.running} running`);
    if (r.failed) parts.push(`${r.failed} failed`);
    if (r.skipped) parts.push(`${r.skipped} skipped`);
    if (r.blocked) parts.push(`${r.blocked} blocked`);
    if (r.manual) parts.push(`${r.manual} manual`);
    if (r.uncovered) parts.push(`${r.uncovered} uncovered`);
    if (r.late) parts.push(`${r.late} late`);
    return parts.join(" · ");
  }

  // ------------------------------------------------------------------ overview

  function rollbackCard(r) {
    const who = [r.requested_by && `by ${r.requested_by}`, r.created_at && when(r.created_at)]
      .filter(Boolean)
      .join(" · ");
    return el(
      "article",
      { class: `card state-${r.state}`, "data-rollback-id": r.rollback_id },
      el(
        "div",
        { class: "card-head" },
        el("a", { class: "rollback-link", href: `/rollbacks/${encodeURIComponent(r.rollback_id)}`, title: r.rollback_id }, shortId(r.rollback_id)),
        r.dry_run ? el("span", { class: "tag" }, "dry run") : null,
        badge(r.state),
      ),
      el("div", { class: "deployment", title: r.deployment_id || "" }, r.deployment_id || "(deployment not resolved yet)"),
      progressBar(r),
      el("div", { class: "progress-text" }, progressText(r)),
      countsLine(r) ? el("div", { class: "muted small" }, countsLine(r)) : null,
      r.error ? el("div", { class: "error-text small" }, r.error) : null,
      el("div", { class: "muted small" }, who),
      r.reason ? el("div", { class: "reason small", title: r.reason }, r.reason) : null,
    );
  }

  function renderRollbacks(list) {
    const box = document.getElementById("rollbacks");
    if (!list.length) {
      box.replaceChildren(el("p", { class: "muted" }, "No rollbacks yet. Start one with `backout rollback`, POST /api/rollbacks or an Alertmanager alert."));
      return;
    }
    box.replaceChildren(...list.map(rollbackCard));
  }

  function renderDeployments(list) {
    const body = document.querySelector("#deployments tbody");
    if (!list.length) {
      body.replaceChildren(emptyRow(7, "No deployments tracked yet."));
      return;
    }
    body.replaceChildren(
      ...list.map((d) => {
        const types = Object.entries(d.by_type || {})
          .map(([type, n]) => `${type} ×${n}`)
          .join(", ");
        return el(
          "tr",
          {},
          cell("Deployment", el("code", {}, d.deployment_id)),
          cell("Service", d.service),
          cell("Version", d.service_version),
          el("td", { class: "num", "data-label": "Events" }, d.events),
          cell("Event types", el("span", { class: "small" }, types)),
          cell("First event", time(d.first_event_at)),
          cell("Last event", time(d.last_event_at)),
        );
      }),
    );
  }

  function renderDeadLetters(list) {
    const body = document.querySelector("#dead-letters tbody");
    if (!list.length) {
      body.replaceChildren(emptyRow(3, "No dead letters."));
      return;
    }
    body.replaceChildren(
      ...list.map((d) =>
        el(
          "tr",
          {},
          cell("Recorded", time(d.recorded_at)),
          cell("Source", el("code", {}, `${d.topic || "(compensation)"} [${d.partition}] @${d.offset}`)),
          cell("Error", el("span", { class: "error-text small" }, d.error)),
        ),
      ),
    );
  }

  async function pollOverview() {
    const [rollbacks, deployments, deadLetters] = await Promise.all([
      getJSON("/api/rollbacks?limit=50"),
      getJSON("/api/deployments"),
      getJSON("/api/dead-letters?limit=50"),
    ]);
    renderRollbacks(rollbacks);
    renderDeployments(deployments);
    renderDeadLetters(deadLetters);
  }

  // -------------------------------------------------------------------- detail

  function renderHead(r) {
    const head = el(
      "div",
      { class: `detail-head state-${r.state}`, "data-rollback-id": r.rollback_id },
      el("h1", {}, "Rollback ", el("code", { class: "break" }, r.rollback_id)),
      el("p", {}, badge(r.state, "large"), r.dry_run ? el("span", { class: "tag" }, "dry run") : null, " ",
        el("span", { class: "deployment" }, r.deployment_id || "")),
      progressBar(r),
      el("div", { class: "progress-text" }, progressText(r)),
      el(
        "p",
        { class: "muted small" },
        [r.requested_by && `requested by ${r.requested_by}`, r.created_at && `started ${when(r.created_at)}`,
          r.finished_at && `finished ${when(r.finished_at)}`].filter(Boolean).join(" · "),
      ),
      r.reason ? el("p", { class: "reason" }, r.reason) : null,
    );
    document.getElementById("rollback-head").replaceChildren(head);
    document.getElementById("rollback-error").replaceChildren(
      r.error ? el("div", { class: "error-box", role: "status" }, r.error) : "",
    );
    const counts = [
      ["planned", r.planned], ["applied", r.applied], ["confirmed", r.confirmed], ["failed", r.failed],
      ["skipped", r.skipped], ["pending", r.pending], ["running", r.running], ["blocked", r.blocked],
      ["manual", r.manual], ["uncovered", r.uncovered], ["late", r.late],
    ];
    document.getElementById("rollback-counts").replaceChildren(
      ...counts.map(([name, n]) =>
        el("div", { class: `count count-${name}${n ? "" : " zero"}` }, el("strong", {}, n || 0), el("span", {}, name)),
      ),
    );
  }

  function renderManual(r) {
    const box = document.getElementById("manual-actions");
    if (!r.manual_actions.length) {
      box.replaceChildren(el("p", { class: "muted" }, "None: every tracked effect has an automatic compensation or needs nothing."));
      return;
    }
    box.replaceChildren(
      el(
        "ul",
        { class: "manual-list" },
        ...r.manual_actions.map((m) =>
          el(
            "li",
            { class: "manual" },
            el("div", { class: "instruction" }, m.detail || "Undo this effect by hand."),
            el("div", { class: "muted small" },
              `${m.event_type} v${m.schema_version} from ${m.service}`, m.saga ? ` (saga ${m.saga})` : "",
              " · event ", el("code", {}, m.event_id), m.occurred_at ? ` · ${when(m.occurred_at)}` : ""),
          ),
        ),
      ),
    );
  }

  function renderUncovered(r) {
    const box = document.getElementById("uncovered");
    if (!r.uncovered_types.length) {
      box.replaceChildren(el("p", { class: "muted" }, "None."));
      return;
    }
    box.replaceChildren(
      el("p", { class: "muted small" }, "No saga declares these event types: their effects were not undone. Add a compensation, an `ignore` or an `irreversible` declaration."),
      el("ul", { class: "uncovered-list" },
        ...r.uncovered_types.map((u) => el("li", {}, el("code", {}, u.event_type), ` — ${u.events} event${u.events === 1 ? "" : "s"}`))),
    );
  }

  function note(c) {
    if (c.state === "failed") return el("span", { class: "error-text" }, c.last_error || "failed", el("br"),
      el("code", { class: "hint" }, `backout retry ${c.idempotency_key}`));
    if (c.state === "skipped") return `skipped: ${c.skip_reason || ""}`;
    if (c.state === "applied" && c.confirm_type) return `waiting for ${c.confirm_type}`;
    if (c.state === "blocked") return "waits for a failed compensation it depends on";
    if (c.last_error) return el("span", { class: "muted" }, `last error: ${c.last_error}`);
    return c.late ? "late event" : "";
  }

  function renderCompensations(r) {
    const body = document.querySelector("#compensations tbody");
    document.getElementById("compensations-note").textContent =
      r.compensations_total > r.compensations.length ? `(first ${r.compensations.length} of ${r.compensations_total})` : `(${r.compensations_total}, in plan order)`;
    if (!r.compensations.length) {
      body.replaceChildren(emptyRow(6, "Nothing to compensate."));
      return;
    }
    body.replaceChildren(
      ...r.compensations.map((c, index) =>
        el(
          "tr",
          { class: `comp state-${c.state}`, "data-key": c.idempotency_key },
          el("td", { class: "num", "data-label": "#" }, index + 1),
          cell("Step", c.step.startsWith(`${c.saga}.`) ? c.step : `${c.saga}.${c.step}`),
          cell("Event", c.event_type, " ", el("code", { class: "small", title: c.event_id }, shortId(c.event_id))),
          cell("State", badge(c.state)),
          el("td", { class: "num", "data-label": "Attempts" }, c.attempts),
          cell("Note", note(c)),
        ),
      ),
    );
  }

  async function pollDetail(id) {
    let r;
    try {
      r = await getJSON(`/api/rollbacks/${encodeURIComponent(id)}`);
    } catch (error) {
      if (error.status === 404) {
        document.getElementById("rollback-head").replaceChildren(
          el("h1", {}, "Rollback ", el("code", {}, id)),
          el("p", { class: "error-box" }, "No such rollback (yet): a signal may still be on its way."),
        );
        return;
      }
      throw error;
    }
    document.title = `Backout · ${stateLabel(r.state)} · ${r.deployment_id || r.rollback_id}`;
    renderHead(r);
    renderManual(r);
    renderUncovered(r);
    renderCompensations(r);
    const signal = document.getElementById("signal-json");
    const text = JSON.stringify(r.signal, null, 2);
    if (signal.textContent !== text) signal.textContent = text;
  }

  // ---------------------------------------------------------------------- loop

  async function pollHealth() {
    const box = document.getElementById("health");
    try {
      const response = await fetch("/health", { cache: "no-store" });
      const body = await response.json();
      box.dataset.state = response.ok ? "ok" : "bad";
      const checks = Object.entries(body.checks || {}).map(([k, v]) => `${k}: ${v}`).join("\n");
      box.textContent = response.ok ? "healthy" : body.status;
      box.title = checks || body.status;
    } catch (error) {
      box.dataset.state = "bad";
      box.textContent = "unreachable";
      box.title = String(error);
    }
  }

  function showBanner(message) {
    const banner = document.getElementById("banner");
    banner.hidden = !message;
    banner.textContent = message || "";
  }

  function sleep(ms) {
    return new Promise((resolve) => setTimeout(resolve, ms));
  }

  async function main() {
    const match = window.location.pathname.match(/^\/rollbacks\/([^/]+)\/?$/);
    const rollbackId = match ? decodeURIComponent(match[1]) : null;
    document.getElementById(rollbackId ? "detail" : "overview").hidden = false;
    let tick = 0;
    for (;;) {
      if (!document.hidden || tick === 0) {
        try {
          if (tick % HEALTH_EVERY === 0) pollHealth();
          await (rollbackId ? pollDetail(rollbackId) : pollOverview());
          showBanner(null);
          document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
        } catch (error) {
          showBanner(`Cannot read the API: ${error.message}. Retrying every second.`);
        }
        tick += 1;
      }
      await sleep(POLL_MS);
    }
  }

  document.addEventListener("DOMContentLoaded", main);
})();
