"use strict";
// The admin page: read-only figures from /api/admin/stats, put on the page with textContent only; sign-out.

const $ = (id) => document.getElementById(id);
const percent = (x) => (x === null || x === undefined ? "–" : `${(100 * x).toFixed(1)} %`);
const number = (x) => (x === null || x === undefined ? "–" : x.toFixed(3));

function table(element, header, rows) {
  const head = document.createElement("tr");
  for (const title of header) {
    const cell = document.createElement("th");
    cell.textContent = title;
    head.append(cell);
  }
  element.replaceChildren(head);
  for (const row of rows) {
    const line = document.createElement("tr");
    for (const value of row) {
      const cell = document.createElement("td");
      cell.textContent = String(value);
      line.append(cell);
    }
    element.append(line);
  }
}

async function load() {
  const minLabels = Math.max(1, parseInt($("min-labels").value, 10) || 1);
  $("export-link").href = `/api/admin/export?min_labels=${minLabels}`;
  const response = await fetch(`/api/admin/stats?min_labels=${minLabels}`, {credentials: "same-origin"});
  const stats = await response.json();
  if (!response.ok) throw new Error(stats.error || response.statusText);

  const totals = $("totals");
  totals.replaceChildren();
  for (const [name, value] of [["pairs", stats.pairs], ["answers", stats.answers],
                               ["pairs with answers", stats.pairs_with_answers],
                               ["pairs complete", stats.pairs_complete], ["undone answers", stats.undone_answers]]) {
    const term = document.createElement("dt");
    term.textContent = name;
    const detail = document.createElement("dd");
    detail.textContent = String(value);
    const item = document.createElement("div");
    item.append(term, detail);
    totals.append(item);
  }
  const a = stats.agreement;
  $("agreement").textContent = a.pairs
    ? `Pairs with two or more answers: ${a.pairs}. Two answers to the same pair agree ` +
      `${percent(a.pairwise)} of the time; Fleiss' kappa ${number(a.fleiss_kappa)}.`
    : "No pair has two answers yet.";
  table($("labellers"), ["labeller", "answers", "a", "b", "tie", "both bad", "picked left", "agrees with others", "last answer"],
        stats.labellers.map((p) => [p.name + (p.admin ? " (admin)" : ""), p.answers, p.a, p.b, p.tie, p.both_bad,
                                    percent(p.left_rate), percent(p.agreement),
                                    p.last_answer ? new Date(p.last_answer * 1000).toLocaleString() : "–"]));
  table($("models"), ["model", "wins", "losses", "tie", "both bad", "win rate"],
        stats.models.map((m) => [m.model, m.wins, m.losses, m.tie, m.both_bad,
                                 percent(m.wins + m.losses ? m.wins / (m.wins + m.losses) : null)]));
  const e = stats.export;
  const reasons = Object.entries(e.skipped).filter(([, n]) => n).map(([why, n]) => `${n} ${why.replace(/_/g, " ")}`);
  $("export-summary").textContent = `${e.exported} of ${e.pairs} pairs would be exported` +
    (reasons.length ? `; skipped: ${reasons.join(", ")}.` : ".");
}

function refresh() {
  load().catch((error) => {
    $("status").textContent = error.message;
    $("status").className = "error";
  });
}

async function signOut() {
  const me = await (await fetch("/api/me", {credentials: "same-origin"})).json();
  const response = await fetch("/api/logout", {method: "POST", credentials: "same-origin", body: "{}",
                                               headers: {"Content-Type": "application/json", "X-CSRF-Token": me.csrf}});
  if (!response.ok) throw new Error((await response.json()).error || response.statusText);
  showSignedOut("To come back, open a new sign-in link.");
}

document.addEventListener("DOMContentLoaded", () => {
  $("min-labels").addEventListener("change", refresh);
  $("sign-out").addEventListener("click", () => signOut().catch((error) => {
    $("status").textContent = error.message;
    $("status").className = "error";
  }));
  refresh();
});
